"""Merge models that share one graph but may differ in group widths and in which groups they occupy.

The models are the deep model and the padded twins of the others (:mod:`fxmerge.hetero.expand`): same
tensor names and group structure, per-model group sizes. Two paths:

* **equal widths** — the same-architecture solvers of :mod:`fxmerge.merge.engine` run on the shared
  spec; the only change is that a space whose groups are *absent* for some models (zero-branch blocks)
  is not matched: the present models keep their units (identity), the absent ones contribute nothing.
* **unequal widths** — elastic zipping (``method="zipit"``): each space's activation correlation over
  the stacked units of the present models is zipped to the space's target width
  (:func:`fxmerge.match.zip_match` with ``target``), so merge[m] is [K, C_m] and unmerge[m] is [C_m, K].

Merged tensors are Σ_m M_out W_m U_inᵀ (:func:`fxmerge.merge.transform.transform_param`) at the target
widths. Tensors without a grouped output axis (heads) are (1/N) Σ_m W_m U_m, the average of the models'
outputs: with elastic zipping a wide model's unmatched units are singletons, and weighting them with the
merge matrix (coefficient 1 instead of 1/N) would change the head's scale per unit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fxmerge.capture.trace import eval_mode
from fxmerge.errors import MergeError
from fxmerge.hetero.counts import mapped_signature
from fxmerge.hetero.graph import run_graph
from fxmerge.hetero.structured import structured_target, zip_structured
from fxmerge.hetero.width import layout_signature
from fxmerge.ir.layout import G, Layout, LFixed, Prod
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching
from fxmerge.merge.features import grouped_axes, probe_points
from fxmerge.merge.options import MergeOptions
from fxmerge.merge.problem import Elastic, Problem, embed, present_identity
from fxmerge.merge.report import space_name
from fxmerge.merge.spaces import Space, find_spaces
from fxmerge.merge.transform import Transforms, apply_layout, transform_param
from fxmerge.stats.batches import iter_inputs
from fxmerge.stats.probes import Probe, SpaceStatistics

__all__ = ["merge_states"]


@dataclass
class _Space:
    """One merge space seen by every model: its key and Space per model, and who takes part."""

    keys: list[Layout]
    spaces: list[Space]
    present: list[int]
    target: int

    @property
    def sizes(self) -> list[int]:
        return [sp.size for sp in self.spaces]


def _corresponding(specs: list[PermutationSpec], absent: list[frozenset[int]], targets: dict[int, int],
                   maps: list[dict[int, int]] | None = None) -> tuple[list[_Space], set[int]]:  # fmt: skip
    """The spaces of model 0 (the reference) and their counterparts in every model. Without ``maps`` the specs have
    the same groups; with them (models whose block counts differ) ``maps[m]`` takes model m's group ids to model
    0's and the spaces of groups whose block counts differ correspond by their outer group."""
    found = [find_spaces(s) for s in specs]
    if maps is None:
        by_sig = [{layout_signature(k): (k, sp) for k, sp in spaces.items()} for spaces, _ in found]
        stuck_sets = [f[1] for f in found]
    else:
        collapse = _count_differs(found, maps)
        by_sig = [{mapped_signature(k, maps[m], collapse): (k, sp) for k, sp in spaces.items()}
                  for m, (spaces, _) in enumerate(found)]  # fmt: skip
        stuck_sets = [{maps[m].get(g, -1 - g) for g in f[1]} for m, f in enumerate(found)]
    stuck = found[0][1]
    if any(set(b) != set(by_sig[0]) for b in by_sig) or any(st != stuck for st in stuck_sets):
        raise MergeError(
            "the models' specs give different merge spaces; they do not share one group structure."
        )
    for gid in sorted(stuck):
        sizes = [s.group(gid if maps is None else _inverse(maps[m], gid)).size for m, s in enumerate(specs)]
        if len(set(sizes)) > 1:
            raise MergeError(f"group g{gid} has sizes {sizes} but lies in a layout no matcher can carry (kept at the "
                             "identity); elastic width cannot change it.")  # fmt: skip
    out = []
    for sig, (key0, _) in by_sig[0].items():
        keys = [b[sig][0] for b in by_sig]
        spaces = [b[sig][1] for b in by_sig]
        groups = set(spaces[0].groups)
        present = [m for m in range(len(specs)) if not groups & absent[m]]
        out.append(_Space(keys, spaces, present or [0], _space_target(key0, spaces, present or [0], targets)))
    return out, stuck


def _count_differs(found: list[tuple[dict[Layout, Space], set[int]]], maps: list[dict[int, int]]) -> set[int]:
    """Outer groups (model 0's ids) whose block counts differ across the models."""
    counts: dict[int, set[int]] = {}
    for m, (spaces, _) in enumerate(found):
        for key in spaces:
            if isinstance(key, Prod) and isinstance(key.outer, G) and key.outer.gid in maps[m]:
                counts.setdefault(maps[m][key.outer.gid], set()).add(key.outer.size)
    return {g for g, c in counts.items() if len(c) > 1}


def _inverse(gmap: dict[int, int], gid: int) -> int:
    return next(o for o, r in gmap.items() if r == gid)


def _space_target(key: Layout, spaces: list[Space], present: list[int], targets: dict[int, int]) -> int:
    sizes = {spaces[m].size for m in present}
    if isinstance(key, G):
        return targets.get(key.gid, max(sizes))
    structured = structured_target(key, [spaces[m].key for m in present], targets)
    if structured is not None:
        return structured
    if len(sizes) != 1:
        raise MergeError(
            f"a structured space (attention heads / grouped channels, groups {spaces[0].groups}) has sizes "
            f"{sorted(sizes)} across models but its blocks cannot be zipped to the target widths {targets}: the blocks "
            "of one space must share one target size, and the model the merge is rebuilt from must have the target "
            "block count."
        )
    return sizes.pop()


def correlations(
    specs: list[PermutationSpec], spaces: list[_Space], data: Any, opts: MergeOptions
) -> dict[int, torch.Tensor]:
    """Pooled within-point Pearson correlation over the stacked units of the present models, per space index
    with probes (the same statistics as the same-architecture merge: :class:`~fxmerge.stats.probes.SpaceStatistics`)."""
    probes = probe_points(specs[0], {s.keys[0]: s.spaces[0] for s in spaces})
    wanted = {
        i: [Probe(node, axes) for node, axes in probes[s.keys[0]]]
        for i, s in enumerate(spaces)
        if s.keys[0] in probes and len(s.present) > 1
    }
    if not wanted:
        return {}
    stats = SpaceStatistics(wanted, {i: spaces[i].present for i in wanted}, {i: spaces[i].sizes for i in wanted},
                            grouped_axes(specs[0]), torch.Generator().manual_seed(opts.seed))  # fmt: skip
    graphs = [s.graph for s in specs]
    with contextlib.ExitStack() as stack:
        for g in graphs:
            stack.enter_context(eval_mode(g.gm))
        batches = tqdm(
            iter_inputs(data), desc="activation statistics", disable=not opts.progress, leave=False
        )
        for b, (args, kwargs) in enumerate(batches):
            if opts.max_batches is not None and b >= opts.max_batches:
                break
            stats.add([run_graph(g, args, kwargs, stats.nodes) for g in graphs])
    return stats.correlations()  # type: ignore[return-value]


def _problem(spec: PermutationSpec, spaces: list[_Space], states: list[dict[str, torch.Tensor]], data: Any,
             specs: list[PermutationSpec], method: Any, opts: MergeOptions, elastic: bool,
             blocks: dict[str, list[list[int]]] | None = None) -> tuple[Problem, list[int]]:  # fmt: skip
    """The engine's problem on the shared spec: spaces some models do not occupy (zero-branch blocks) are pinned
    to present-only identities; with different widths, the spaces are zipped to their targets (elastic)."""
    n = len(states)
    init: Transforms = {}
    for s in spaces:
        init[s.keys[0]] = present_identity(s.sizes, s.present, s.target)
    corr = correlations(specs, spaces, data, opts) if method.needs_data or elastic else {}
    if elastic:
        solvable = [i for i, s in enumerate(spaces) if len(s.present) > 1 and i in corr]
        unmatched = [i for i, s in enumerate(spaces) if len(s.present) > 1 and i not in corr]
        for i in unmatched:
            sizes_p = {spaces[i].sizes[m] for m in spaces[i].present}
            if len(sizes_p) > 1:
                raise MergeError(f"space of groups {spaces[i].spaces[0].groups} has sizes {sorted(sizes_p)} but no "
                                 "activation probe; it cannot be zipped to a common width.")  # fmt: skip
        structured = [i for i in solvable if isinstance(spaces[i].keys[0], Prod)]
        init.update(_structured(spaces, structured, corr, method, blocks))
        solvable = [i for i in solvable if i not in structured]
        el = Elastic({spaces[i].keys[0]: spaces[i].sizes for i in solvable},
                     {spaces[i].keys[0]: spaces[i].present for i in solvable},
                     {spaces[i].keys[0]: spaces[i].target for i in solvable})  # fmt: skip
    else:
        solvable = [i for i, s in enumerate(spaces) if len(s.present) == n]
        unmatched, el = [], None
    act = {spaces[i].keys[0]: corr[i] for i in solvable if i in corr}
    problem = Problem(spec, {spaces[i].keys[0]: spaces[i].spaces[0] for i in solvable}, states, init, act,
                      torch.Generator().manual_seed(opts.seed), opts.progress, elastic=el)  # fmt: skip
    return problem, unmatched


def _structured(spaces: list[_Space], idx: list[int], corr: dict[int, torch.Tensor], method: Any,
                blocks: dict[str, list[list[int]]] | None = None) -> Transforms:  # fmt: skip
    """Structured spaces of an elastic merge (attention heads, GroupNorm groups): the spaces of one outer group
    share one block pairing (or block zip, when their block counts differ) and are zipped block by block
    (:func:`~fxmerge.hetero.structured.zip_structured`). ``blocks``, when given, gets per outer group (model 0's
    id) the merged block of every block of every model (present models only)."""
    alpha = float(getattr(method, "alpha", getattr(method, "zip_alpha", 0.5)))
    beta = float(getattr(method, "beta", getattr(method, "zip_beta", 1.0)))
    fams: dict[int, list[int]] = {}
    for i in idx:
        fams.setdefault(spaces[i].keys[0].outer.gid, []).append(i)  # type: ignore[union-attr]
    out: Transforms = {}
    for members in fams.values():
        present = spaces[members[0]].present
        if any(spaces[i].present != present for i in members):
            raise MergeError(f"the spaces of groups {[spaces[i].spaces[0].groups for i in members]} share blocks "
                             "but not the models taking part; they cannot be zipped together.")  # fmt: skip
        sizes = [[spaces[i].sizes[m] for m in present] for i in members]
        keys = spaces[members[0]].keys
        counts = [keys[m].outer.size for m in present]  # type: ignore[union-attr]
        block_of, cols, value = zip_structured([corr[i] for i in members], sizes, counts,
                                               [spaces[i].target for i in members], alpha=alpha, beta=beta,
                                               target_blocks=keys[0].outer.size)  # type: ignore[union-attr]  # fmt: skip
        if blocks is not None:
            blocks[f"g{keys[0].outer.gid}"] = [b.tolist() for b in block_of]  # type: ignore[union-attr]
        for i, c, sz in zip(members, cols, sizes, strict=True):
            mt = Matching.from_columns(c, sz, spaces[i].target, value, dtype=torch.float64, device=torch.device("cpu"))
            out[spaces[i].keys[0]] = embed(mt, spaces[i].sizes, present)
    return out


def _same_blocks(spaces: list[_Space]) -> bool:
    """Whether every structured space has the same block count in every model."""
    return all(len({k.outer.size for k in s.keys if isinstance(k, Prod)}) <= 1 for s in spaces)


def merge_states(
    models: list[nn.Module],
    specs: list[PermutationSpec],
    *,
    absent: list[frozenset[int]],
    targets: dict[int, int],
    data: Any,
    method: Any,
    opts: MergeOptions,
    base: int = 0,
    head_shares: dict[str, list[torch.Tensor]] | None = None,
    maps: list[dict[int, int]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[Transforms]]:
    """Merged state dict (at the target widths) of models sharing one graph.

    Args:
        models: the models; same tensor names, per-model group sizes given by ``specs``.
        specs: each model's spec, inferred separately (same group structure).
        absent: per model, the group ids it does not take part in.
        targets: group id -> merged width.
        data: batches for activation statistics.
        method: the method object (:mod:`fxmerge.merge.methods`).
        opts: the merge options (seed, progress, max_batches).
        base: model whose non-float tensors (counters) are kept.
        head_shares: when given, filled with each model's share of every head weight reading merged units
            (name -> per model (1/N) W_m U_m, float64), for :func:`~fxmerge.hetero.width.balance_heads`.
        maps: for models whose specs have different groups (different numbers of heads / GroupNorm groups), model
            m's group id -> model 0's (:func:`~fxmerge.hetero.counts.correspond`); ``targets`` and ``absent`` then use
            model 0's ids, and model 0 must have the target block counts.

    Returns:
        (state dict, report, per model its matchings keyed by its own layouts) — the report lists the spaces,
        absent spaces and matching values; the matchings map each model's units onto the merged ones (post-passes
        merge per-unit statistics with them).
    """
    n = len(models)
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    spaces, stuck = _corresponding(specs, absent, targets, maps)
    widths_equal = all(len(set(s.sizes)) == 1 and s.target == s.sizes[0] for s in spaces)
    widths_equal = widths_equal and all(sp.shapes == specs[0].shapes for sp in specs) and _same_blocks(spaces)
    block_zip: dict[str, list[list[int]]] = {}
    problem, unmatched = _problem(specs[0], spaces, states, data, specs, method, opts, not widths_equal, block_zip)
    sol = method.solve(problem)
    tr = sol.transforms
    trs = [{s.keys[m]: tr[s.keys[0]] for s in spaces} for m in range(n)]
    log = {"sweeps": sol.log.sweeps, "sweep_values": sol.log.values}
    if not widths_equal:
        log["identity_spaces"] = unmatched
    merged = _combine(specs, states, trs, base, head_shares)
    report = {
        "spaces": len(spaces),
        "absent_spaces": sum(1 for s in spaces if len(s.present) < n),
        "identity_groups": sorted(stuck),
        "space_values": {_name(s.keys[0]): float(trs[0][s.keys[0]].value) for s in spaces},
        "elastic": not widths_equal,
        "blocks": block_zip,
        **log,
    }
    return merged, report, trs


def has_grouped_output(spec: PermutationSpec, name: str) -> bool:
    """Whether a tensor has an output-role axis carrying a group (else it only reads merged features)."""
    roles = spec.roles.get(name, ["out"] * len(spec.axes[name]))
    return any(
        r == "out" and not isinstance(lay, LFixed) for lay, r in zip(spec.axes[name], roles, strict=True)
    )


def head_param(
    spec: PermutationSpec, name: str, x: torch.Tensor, m: int, n: int, tr: Transforms
) -> torch.Tensor:
    """Model m's share of a tensor without grouped output axis (a head): (1/N) W_m U_m on every grouped axis.

    This averages the models' outputs, f_m ≈ U_m f_merged; singletons of an elastic zip keep weight 1/N.
    """
    out = x
    for a, lay in enumerate(spec.axes[name]):
        out = apply_layout(out, a, lay, m, n, tr, False)
    return out / n


def _combine(specs: list[PermutationSpec], states: list[dict[str, torch.Tensor]], trs: list[Transforms],
             base: int, head_shares: dict[str, list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    n = len(states)
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[base].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
        elif name in specs[0].axes:
            fn = transform_param if has_grouped_output(specs[0], name) else head_param
            parts = [fn(specs[m], name, states[m][name].double(), m, n, trs[m]) for m in range(n)]
            out[name] = sum(parts).to(ref.dtype)
            reads_units = any(not isinstance(lay, LFixed) for lay in specs[0].axes[name])
            if head_shares is not None and fn is head_param and reads_units:
                head_shares[name] = parts
        elif all(s[name].shape == ref.shape for s in states):
            out[name] = (sum(s[name].double() for s in states) / n).to(ref.dtype)
        else:
            out[name] = ref.clone()
    return out


def _name(key: Layout) -> str:
    return space_name(key)
