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
from fxmerge.hetero.graph import run_graph
from fxmerge.hetero.width import layout_signature
from fxmerge.ir.layout import G, Layout, LFixed
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching, zip_match
from fxmerge.merge.api import NEEDS_DATA
from fxmerge.merge.engine import (
    MatchOptions,
    coordinate_descent,
    identity_transforms,
    solve_spaces,
    unit_vectors,
    weight_similarity,
)
from fxmerge.merge.features import probe_points
from fxmerge.merge.spaces import Space, find_spaces
from fxmerge.merge.transform import Transforms, apply_layout, transform_param
from fxmerge.stats import CorrelationAccumulator
from fxmerge.stats.batches import feature_rows, iter_inputs

__all__ = ["EngineOptions", "merge_states"]



@dataclass
class EngineOptions:
    """Matching options shared with :func:`fxmerge.merge`."""

    method: str
    alpha: float = 0.5
    matcher: str = "align"
    seed: int = 0
    zip_alpha: float = 0.5
    zip_beta: float = 1.0
    max_sweeps: int = 30
    patience: int = 5
    max_batches: int | None = None
    progress: bool = False


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


def _corresponding(specs: list[PermutationSpec], absent: list[frozenset[int]], targets: dict[int, int]
                   ) -> tuple[list[_Space], set[int]]:  # fmt: skip
    found = [find_spaces(s) for s in specs]
    by_sig = [{layout_signature(k): (k, sp) for k, sp in spaces.items()} for spaces, _ in found]
    stuck = found[0][1]
    if any(set(b) != set(by_sig[0]) for b in by_sig) or any(f[1] != stuck for f in found):
        raise MergeError("the models' specs give different merge spaces; they do not share one group structure.")
    for gid in sorted(stuck):
        sizes = [s.group(gid).size for s in specs]
        if len(set(sizes)) > 1:
            raise MergeError(f"group g{gid} has sizes {sizes} but lies in a layout no matcher can carry (kept at "
                             "the identity); elastic width cannot change it.")  # fmt: skip
    out = []
    for sig, (key0, _) in by_sig[0].items():
        keys = [b[sig][0] for b in by_sig]
        spaces = [b[sig][1] for b in by_sig]
        groups = set(spaces[0].groups)
        present = [m for m in range(len(specs)) if not groups & absent[m]]
        out.append(_Space(keys, spaces, present or [0], _space_target(key0, spaces, present or [0], targets)))
    return out, stuck


def _space_target(key: Layout, spaces: list[Space], present: list[int], targets: dict[int, int]) -> int:
    sizes = {spaces[m].size for m in present}
    if isinstance(key, G):
        return targets.get(key.gid, max(sizes))
    if len(sizes) != 1:
        raise MergeError(f"a structured space (attention heads / grouped channels, groups {spaces[0].groups}) has "
                         f"sizes {sorted(sizes)} across models; elastic width supports plain channel groups only.")
    return sizes.pop()


def present_identity(sizes: list[int], present: list[int], target: int) -> Matching:
    """Present models keep their units (averaged if several), absent ones map to nothing."""
    merge, unmerge = [], []
    for m, c in enumerate(sizes):
        if m in present:
            eye = torch.eye(target, c, dtype=torch.float64)
            merge.append(eye / len(present))
            unmerge.append(eye.T.clone())
        else:
            merge.append(torch.zeros(target, c, dtype=torch.float64))
            unmerge.append(torch.zeros(c, target, dtype=torch.float64))
    return Matching(merge, unmerge, 1.0)


def _embed(mt: Matching, sizes: list[int], present: list[int]) -> Matching:
    """A matching over the present models extended with zero blocks for the absent ones."""
    if len(present) == len(sizes):
        return mt
    k = mt.width
    merge = [torch.zeros(k, c, dtype=mt.merge[0].dtype) for c in sizes]
    unmerge = [torch.zeros(c, k, dtype=mt.merge[0].dtype) for c in sizes]
    for i, m in enumerate(present):
        merge[m], unmerge[m] = mt.merge[i], mt.unmerge[i]
    return Matching(merge, unmerge, mt.value)


def correlations(
    specs: list[PermutationSpec], spaces: list[_Space], data: Any, opts: EngineOptions
) -> dict[int, torch.Tensor]:
    """Pearson correlation over the stacked units of the present models, per space index with probes."""
    probes = probe_points(specs[0], {s.keys[0]: s.spaces[0] for s in spaces})
    wanted = {i: probes[s.keys[0]] for i, s in enumerate(spaces) if s.keys[0] in probes and len(s.present) > 1}
    keep = {node for pts in wanted.values() for node, _ in pts}
    accs = {i: CorrelationAccumulator([spaces[i].sizes[m] for m in spaces[i].present]) for i in wanted}
    if not accs:
        return {}
    graphs = [s.graph for s in specs]
    gen = torch.Generator().manual_seed(opts.seed)
    with contextlib.ExitStack() as stack:
        for g in graphs:
            stack.enter_context(eval_mode(g.gm))
        batches = tqdm(iter_inputs(data), desc="activation statistics", disable=not opts.progress, leave=False)
        for b, (args, kwargs) in enumerate(batches):
            if opts.max_batches is not None and b >= opts.max_batches:
                break
            values = [run_graph(g, args, kwargs, keep) for g in graphs]
            for i, pts in wanted.items():
                seed = int(torch.randint(0, 2**62, (1,), generator=gen))
                for node, axes in pts:
                    accs[i].update([feature_rows(values[m][node], axes, torch.Generator().manual_seed(seed))
                                    for m in spaces[i].present])  # fmt: skip
    return {i: acc.correlation() for i, acc in accs.items()}


def _solve_equal(
    spec: PermutationSpec, spaces: list[_Space], states: list[dict[str, torch.Tensor]], data: Any,
    specs: list[PermutationSpec], opts: EngineOptions,
) -> tuple[Transforms, dict]:  # fmt: skip
    """Same-architecture solvers on the shared spec, absent spaces pinned to present-only identities."""
    n = len(states)
    plain = {s.keys[0]: s.spaces[0] for s in spaces}
    tr = identity_transforms(plain, n)
    fixed = [s for s in spaces if len(s.present) < n]
    for s in fixed:
        tr[s.keys[0]] = present_identity(s.sizes, s.present, s.target)
    solvable = {s.keys[0]: s.spaces[0] for s in spaces if len(s.present) == n}
    method = opts.method
    mo = MatchOptions(matcher="zip" if method in ("zipit", "wzip") else opts.matcher, zip_alpha=opts.zip_alpha,
                      zip_beta=opts.zip_beta, weight_sim="dot" if method == "rebasin" else "corr")  # fmt: skip
    act: dict[Layout, torch.Tensor] = {}
    if method in NEEDS_DATA:
        corr = correlations(specs, spaces, data, opts)
        act = {spaces[i].keys[0]: c for i, c in corr.items() if len(spaces[i].present) == n}
    log: dict = {}
    gen = torch.Generator().manual_seed(opts.seed)
    if method in ("act_align", "zipit", "mudsc"):
        with_act = [k for k in solvable if k in act]
        tr.update(solve_spaces(with_act, solvable, {k: act[k] for k in with_act}, n, mo))
        rest = [k for k in solvable if k not in act]
        tr.update(solve_spaces(rest, solvable, {k: _wsim(spec, solvable[k], states, tr) for k in rest}, n, mo))
    elif method == "wzip":
        tr.update(solve_spaces(list(solvable), solvable, {k: _wsim(spec, solvable[k], states, tr)
                                                          for k in solvable}, n, mo))  # fmt: skip
    if method in ("rebasin", "mudsc"):
        alpha = 1.0 if method == "rebasin" else opts.alpha
        patience = min(opts.patience, 2) if method == "rebasin" else opts.patience
        tr, cd = coordinate_descent(spec, solvable, states, act, mo, alpha=alpha, init=tr, generator=gen,
                                    max_sweeps=opts.max_sweeps, patience=patience)  # fmt: skip
        log = {"sweeps": cd.sweeps, "sweep_values": cd.values}
    return tr, log


def _wsim(spec: PermutationSpec, space: Space, states: list[dict[str, torch.Tensor]], tr: Transforms) -> torch.Tensor:
    return weight_similarity(unit_vectors(spec, space, states, tr), "corr")


def _solve_elastic(
    specs: list[PermutationSpec], spaces: list[_Space], data: Any, opts: EngineOptions
) -> tuple[list[Transforms], dict]:
    """Elastic zipping of every space to its target width (different widths across models)."""
    if opts.method != "zipit":
        raise MergeError(f"models of different widths are merged by elastic zipping: use method='zipit' "
                         f"(got {opts.method!r}).")  # fmt: skip
    n = len(specs)
    corr = correlations(specs, spaces, data, opts)
    trs: list[Transforms] = [{} for _ in range(n)]
    unmatched = []
    for i, s in enumerate(spaces):
        sizes_p = [s.sizes[m] for m in s.present]
        if len(s.present) == 1 or i not in corr:
            if len(s.present) > 1:
                unmatched.append(i)
            mt = present_identity(s.sizes, s.present, s.target)
            if len(set(sizes_p)) > 1:
                raise MergeError(f"space of groups {s.spaces[0].groups} has sizes {sizes_p} but no activation probe; "
                                 "it cannot be zipped to a common width.")  # fmt: skip
        elif isinstance(s.keys[0], G):
            mt = _embed(zip_match(corr[i], sizes_p, r=0.5, alpha=opts.zip_alpha, beta=opts.zip_beta, target=s.target),
                        s.sizes, s.present)  # fmt: skip
        else:
            mo = MatchOptions(matcher="zip", zip_alpha=opts.zip_alpha, zip_beta=opts.zip_beta)
            sub = {s.keys[0]: s.spaces[0]}
            mt = _embed(solve_spaces([s.keys[0]], sub, {s.keys[0]: corr[i]}, len(s.present), mo)[s.keys[0]],
                        s.sizes, s.present)  # fmt: skip
        for m in range(n):
            trs[m][s.keys[m]] = mt
    return trs, {"identity_spaces": unmatched}


def merge_states(
    models: list[nn.Module],
    specs: list[PermutationSpec],
    *,
    absent: list[frozenset[int]],
    targets: dict[int, int],
    data: Any,
    opts: EngineOptions,
    base: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merged state dict (at the target widths) of models sharing one graph.

    Args:
        models: the models; same tensor names, per-model group sizes given by ``specs``.
        specs: each model's spec, inferred separately (same group structure).
        absent: per model, the group ids it does not take part in.
        targets: group id -> merged width.
        data: batches for activation statistics.
        opts: method and matching options.
        base: model whose non-float tensors (counters) are kept.

    Returns:
        (state dict, report) — the report lists the spaces, absent spaces and matching values.
    """
    n = len(models)
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    spaces, stuck = _corresponding(specs, absent, targets)
    widths_equal = all(len(set(s.sizes)) == 1 and s.target == s.sizes[0] for s in spaces)
    widths_equal = widths_equal and all(sp.shapes == specs[0].shapes for sp in specs)
    if widths_equal:
        tr, log = _solve_equal(specs[0], spaces, states, data, specs, opts)
        trs = [{s.keys[m]: tr[s.keys[0]] for s in spaces} for m in range(n)]
    else:
        trs, log = _solve_elastic(specs, spaces, data, opts)
    merged = _combine(specs, states, trs, base)
    report = {
        "spaces": len(spaces),
        "absent_spaces": sum(1 for s in spaces if len(s.present) < n),
        "identity_groups": sorted(stuck),
        "space_values": {_name(s.keys[0]): float(trs[0][s.keys[0]].value) for s in spaces},
        "elastic": not widths_equal,
        **log,
    }
    return merged, report


def has_grouped_output(spec: PermutationSpec, name: str) -> bool:
    """Whether a tensor has an output-role axis carrying a group (else it only reads merged features)."""
    roles = spec.roles.get(name, ["out"] * len(spec.axes[name]))
    return any(r == "out" and not isinstance(lay, LFixed) for lay, r in zip(spec.axes[name], roles, strict=True))


def head_param(spec: PermutationSpec, name: str, x: torch.Tensor, m: int, n: int, tr: Transforms) -> torch.Tensor:
    """Model m's share of a tensor without grouped output axis (a head): (1/N) W_m U_m on every grouped axis.

    This averages the models' outputs, f_m ≈ U_m f_merged; singletons of an elastic zip keep weight 1/N.
    """
    out = x
    for a, lay in enumerate(spec.axes[name]):
        out = apply_layout(out, a, lay, m, n, tr, False)
    return out / n


def _combine(specs: list[PermutationSpec], states: list[dict[str, torch.Tensor]], trs: list[Transforms],
             base: int) -> dict[str, torch.Tensor]:  # fmt: skip
    n = len(states)
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[base].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
        elif name in specs[0].axes:
            fn = transform_param if has_grouped_output(specs[0], name) else head_param
            acc = sum(fn(specs[m], name, states[m][name].double(), m, n, trs[m]) for m in range(n))
            out[name] = acc.to(ref.dtype)
        elif all(s[name].shape == ref.shape for s in states):
            out[name] = (sum(s[name].double() for s in states) / n).to(ref.dtype)
        else:
            out[name] = ref.clone()
    return out


def _name(key: Layout) -> str:
    return f"g{key.gid}" if isinstance(key, G) else f"g{key.outer.gid}x[{len(key.inners)} blocks]"
