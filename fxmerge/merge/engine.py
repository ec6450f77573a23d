"""Matchings per space and family, and the iterative (coordinate-descent) solver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fxmerge.ir.layout import Layout
from fxmerge.match import Matching, align, align_groups, assign_blocks, block_scores, zip_groups, zip_match
from fxmerge.memory import release_freed_memory
from fxmerge.merge.spaces import Space, families, is_simple
from fxmerge.merge.structured import solve_family
from fxmerge.merge.transform import Transforms, identity_matching


@dataclass
class MatchOptions:
    matcher: str = "align"  # "align" | "zip"
    r: float | None = None  # zip reduction; default keeps the width (1 - 1/N)
    zip_alpha: float = 0.5
    zip_beta: float = 1.0


@dataclass
class SolveLog:
    sweeps: int = 0
    values: list[float] = field(default_factory=list)
    sims: dict[Layout, torch.Tensor] = field(
        default_factory=dict
    )  # what the returned matchings were solved on
    changed: list[int] = field(default_factory=list)  # matchings changed per sweep
    solves: int = 0  # family solves run (skipped families not counted)


def solve_spaces(
    keys: list[Layout],
    spaces: dict[Layout, Space],
    sims: dict[Layout, torch.Tensor],
    n: int,
    opts: MatchOptions,
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
        return zip_groups(
            sim, sizes, g, r=r, alpha=opts.zip_alpha, beta=opts.zip_beta, block_assignment=blocks
        )
    return align_groups(sim, sizes, g, block_assignment=blocks)


def coordinate_descent(
    spaces: dict[Layout, Space],
    n: int,
    sim_of: Callable[..., torch.Tensor],
    deps_of: Callable[[Layout], tuple[Layout, ...]],
    opts: MatchOptions,
    *,
    init: Transforms,
    generator: torch.Generator,
    max_sweeps: int = 30,
    patience: int | None = None,
    progress: bool = False,
    keep_sims: int = 4096,
    keep_dtype: torch.dtype = torch.float32,
    forward: bool = False,
) -> tuple[Transforms, SolveLog]:
    """Weight matching / MuDSC: revisit the space families in random order, re-solving each on ``sim_of(key,
    transforms)`` (which reads the neighbours' current transforms), until a full sweep changes no matching
    (Git Re-Basin's rule: a fixed point), ``max_sweeps``, or, with ``patience``, that many sweeps without an
    improvement of the mean matching value. Returns the best transforms seen (by that value).

    ``forward``: the first sweep visits the families in the order of ``spaces`` (the spec's parameter order, data
    flow for usual models) and solves each on ``sim_of(key, transforms, ready=solved)``: only the parts of the
    similarity whose neighbours were already solved in this sweep (``ready``), not the ones still at their
    initial transform, which would only add noise. A greedy forward pass, then the usual random sweeps (at
    least one) from its result; its values are not compared with the full sweeps' for the best.

    Work is incremental: a family is re-solved only when a transform it depends on (``deps_of``) changed since
    it was last solved (the solve is deterministic, so the result would be the same); a matching whose
    assignment did not change keeps its object, so neighbours' cached similarity parts stay valid. The final
    similarity of spaces of at most ``keep_sims`` stacked units is kept in ``keep_dtype`` for the report (float16
    suits correlations, which lie in [-1, 1]: half the memory of a second copy of the statistics).
    """
    tr = dict(init)
    best, best_val = dict(tr), -float("inf")
    last_sims: dict[Layout, torch.Tensor] = {}
    log = SolveLog()
    stale = 0
    groups = families(spaces)
    own = [set(fam) for fam in groups]
    deps = [tuple(d for k in fam for d in deps_of(k) if d not in own[i]) for i, fam in enumerate(groups)]
    seen: dict[int, tuple] = {}
    bar = tqdm(total=max_sweeps, desc="matching sweeps", disable=not progress, leave=False)
    for sweep in range(max_sweeps):
        changed = 0
        greedy = forward and sweep == 0
        solved = {k for k in init if k not in spaces}  # pinned transforms count as solved
        order = range(len(groups)) if greedy else torch.randperm(len(groups), generator=generator).tolist()
        for i in order:
            stamp = tuple(tr.get(d) for d in deps[i])
            if i in seen and all(a is b for a, b in zip(seen[i], stamp, strict=True)):
                continue  # nothing this family reads has moved: re-solving would return the same matchings
            keys = groups[i]
            sims = {k: sim_of(k, tr, ready=frozenset(solved)) if greedy else sim_of(k, tr) for k in keys}
            log.solves += 1
            for k, mt in solve_spaces(keys, spaces, sims, n, opts).items():
                mt = mt.compact()
                old = tr.get(k)
                if old is not None and old.same_as(mt):
                    old.value = mt.value
                else:
                    tr[k] = mt
                    changed += 1
            if not greedy or all(d in solved for d in deps[i]):  # a partial similarity must be redone
                seen[i] = stamp
            solved.update(keys)
            if sum(spaces[k].size for k in keys) >= 1024:  # large temporaries were freed: return them
                release_freed_memory()
            last_sims.update({k: v.to(keep_dtype) for k, v in sims.items() if v.shape[0] <= keep_sims})
        release_freed_memory()
        value = sum(tr[k].value for k in spaces) / max(len(spaces), 1)
        log.sweeps += 1
        log.values.append(value)
        log.changed.append(changed)
        bar.update(1)
        if greedy:  # partial similarities: a start, not a candidate (unless it is the only sweep)
            best, log.sims = dict(tr), dict(last_sims)
            continue
        if value > best_val + 1e-9:
            best, best_val, stale = dict(tr), value, 0
            log.sims = dict(last_sims)
        else:
            stale += 1
        if changed == 0 or (patience is not None and stale >= patience):
            break
    bar.close()
    if not log.sims:
        log.sims = dict(last_sims)
    return best, log


def identity_transforms(spaces: dict[Layout, Space], n: int) -> Transforms:
    return {k: identity_matching(sp.size, n) for k, sp in spaces.items()}
