"""Similarities and matchings per space, and the iterative (coordinate-descent) solvers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxmerge.ir.layout import Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching, align, align_groups, assign_blocks, block_scores, zip_groups, zip_match
from fxmerge.merge.spaces import Space, families, is_simple
from fxmerge.merge.structured import solve_family
from fxmerge.merge.transform import Transforms, identity_matching, transform_param


@dataclass
class MatchOptions:
    matcher: str = "align"  # "align" | "zip"
    r: float | None = None  # zip reduction; default keeps the width (1 - 1/N)
    zip_alpha: float = 0.5
    zip_beta: float = 1.0
    weight_sim: str = "corr"  # "corr" (MuDSC) | "dot" (Git Re-Basin)


@dataclass
class SolveLog:
    sweeps: int = 0
    values: list[float] = field(default_factory=list)
    sims: dict[Layout, torch.Tensor] = field(default_factory=dict)  # what the returned matchings were solved on


def unit_vectors(
    spec: PermutationSpec, space: Space, states: list[dict[str, torch.Tensor]], tr: Transforms
) -> list[torch.Tensor]:
    """Per model, [C, D]: each unit's weight entries over every slot, neighbours' transforms applied."""
    n = len(states)
    out = []
    for m, st in enumerate(states):
        cols = []
        for slot in space.slots:
            w = transform_param(spec, slot.param, st[slot.param].double(), m, n, tr, skip=space.key)
            w = w.narrow(slot.axis, slot.offset, space.size * slot.unit).movedim(slot.axis, 0)
            cols.append(w.reshape(space.size, -1))
        out.append(torch.cat(cols, dim=1))
    return out


def weight_similarity(vecs: list[torch.Tensor], kind: str) -> torch.Tensor:
    """``"corr"``: Pearson correlation of the units' weight vectors; ``"dot"``: their inner products.

    Centring and normalising run in float64, the Gram matrix in float32 (matchings only compare entries;
    float32 keeps them to ~1e-6, far inside the gaps that decide a matching) and is returned as float64.
    """
    x = torch.cat(vecs, dim=0)
    if kind == "dot":
        scale = x.abs().max().clamp_min(1e-30)
        y = (x / scale).float()
        return _symmetric(y @ y.T) * scale**2
    x = x - x.mean(dim=1, keepdim=True)
    x = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    return _symmetric(x @ x.T)


def _symmetric(gram: torch.Tensor) -> torch.Tensor:
    g = gram.double()
    return (g + g.T) / 2


def solve_spaces(
    keys: list[Layout], spaces: dict[Layout, Space], sims: dict[Layout, torch.Tensor], n: int, opts: MatchOptions
) -> Transforms:
    """Match each listed space. Spaces sharing groups (a family) are solved together: structured spaces of
    one outer group share one block assignment, and every shared group gets one matching (see
    :mod:`fxmerge.merge.structured`); the result may also hold ``G(gid)`` entries for the family's groups."""
    out: Transforms = {}
    for fam in families({k: spaces[k] for k in keys}):
        if len(fam) == 1 and not spaces[fam[0]].structured:
            out[fam[0]] = _match_plain(sims[fam[0]], [spaces[fam[0]].size] * n, opts)
        elif is_simple(fam):
            g = spaces[fam[0]].n_blocks
            scores = sum(block_scores(sims[k], [spaces[k].size] * n, g) for k in fam)
            blocks = assign_blocks(scores)
            for k in fam:
                out[k] = _match_groups(sims[k], [spaces[k].size] * n, g, blocks, opts)
        else:
            out.update(solve_family(fam, spaces, sims, n, opts))
    return out


def _zip_r(n: int, opts: MatchOptions) -> float:
    return opts.r if opts.r is not None else 1.0 - 1.0 / n


def _match_plain(sim: torch.Tensor, sizes: list[int], opts: MatchOptions) -> Matching:
    if opts.matcher == "zip":
        return zip_match(sim, sizes, r=_zip_r(len(sizes), opts), alpha=opts.zip_alpha, beta=opts.zip_beta)
    return align(sim, sizes)


def _match_groups(sim, sizes, g, blocks, opts: MatchOptions) -> Matching:
    if opts.matcher == "zip":
        r = _zip_r(len(sizes), opts)
        return zip_groups(sim, sizes, g, r=r, alpha=opts.zip_alpha, beta=opts.zip_beta, block_assignment=blocks)
    return align_groups(sim, sizes, g, block_assignment=blocks)


def coordinate_descent(
    spec: PermutationSpec,
    spaces: dict[Layout, Space],
    states: list[dict[str, torch.Tensor]],
    act: dict[Layout, torch.Tensor],
    opts: MatchOptions,
    *,
    alpha: float,
    init: Transforms,
    generator: torch.Generator,
    max_sweeps: int = 30,
    patience: int = 5,
) -> tuple[Transforms, SolveLog]:
    """MuDSC / weight matching: revisit spaces in random order, re-solving each from
    ``alpha * S_weight + (1 - alpha) * S_act`` with the neighbours' current transforms; stop when the mean
    matching value has not improved for ``patience`` sweeps and return the best transforms seen."""
    n = len(states)
    tr = dict(init)
    best, best_val = dict(tr), -float("inf")
    last_sims: dict[Layout, torch.Tensor] = {}
    log = SolveLog()
    stale = 0
    groups = families(spaces)
    for _ in range(max_sweeps):
        order = torch.randperm(len(groups), generator=generator).tolist()
        for i in order:
            keys = groups[i]
            sims = {}
            for k in keys:
                s_w = weight_similarity(unit_vectors(spec, spaces[k], states, tr), opts.weight_sim)
                s_a = act.get(k)
                sims[k] = s_w if s_a is None else alpha * s_w + (1 - alpha) * s_a.to(s_w)
            tr.update(solve_spaces(keys, spaces, sims, n, opts))
            last_sims.update(sims)
        value = sum(tr[k].value for k in spaces) / max(len(spaces), 1)
        log.sweeps += 1
        log.values.append(value)
        if value > best_val + 1e-9:
            best, best_val, stale = dict(tr), value, 0
            log.sims = dict(last_sims)
        else:
            stale += 1
            if stale >= patience:
                break
    return best, log


def identity_transforms(spaces: dict[Layout, Space], n: int) -> Transforms:
    return {k: identity_matching(sp.size, n) for k, sp in spaces.items()}
