"""Group matching for structured units (attention heads, GroupNorm groups): ``mudsc.md`` §7.

Each model's units form ``n_groups`` contiguous groups (model m: groups of c_m = C_m / G units).
Matching is two-level and never splits a group:

1. ``block_scores``: for every (anchor group g, model-m group h) tile of the cross block, solve a
   unit-level Hungarian and score the pair by its mean matched similarity;
2. ``assign_blocks``: a Hungarian over those G×G scores pairs each anchor group g with one group
   π_m(g) of every other model (a star around the anchor);
3. units are matched only inside the chosen pairs: by the tile's Hungarian (:func:`align_groups`) or by
   greedy zipping restricted to the set {anchor g, π_1(g), …} (:func:`zip_groups`).

Merged groups are contiguous, in the anchor's group order, with the same size for every group.
A precomputed ``block_assignment`` ([N-1, G], row m-1 = π_m) lets several spaces share one group
correspondence, e.g. the heads of the q/k and v projections: sum their ``block_scores`` and call
``assign_blocks`` once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fxmerge.errors import MergeError
from fxmerge.match.align import hungarian
from fxmerge.match.greedy import GreedyOwners, columns_from_pairs, greedy_merges, owner_budgets, symmetrized
from fxmerge.match.types import Matching, check_sim, check_sizes, offsets
from fxmerge.match.zip import check_zip_params

__all__ = ["GroupPlan", "align_groups", "assign_blocks", "block_scores", "plan_zip_groups", "zip_groups"]


def _group_sizes(sizes: list[int], n_groups: int) -> list[int]:
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise MergeError(f"n_groups must be a positive int, got {n_groups!r}.")
    bad = [m for m, s in enumerate(sizes) if s % n_groups]
    if bad:
        raise MergeError(
            f"model(s) {bad} have unit counts {[sizes[m] for m in bad]} not divisible by n_groups={n_groups}; "
            "every model must split into the same number of equal groups."
        )
    return [s // n_groups for s in sizes]


def _tiles(sim: Tensor, sizes: list[int], n_groups: int, m: int) -> np.ndarray:
    """The anchor-vs-model-m cross block as [G, c_0, G, c_m] float64."""
    offs, c = offsets(sizes), _group_sizes(sizes, n_groups)
    cross = sim[: sizes[0], offs[m] : offs[m + 1]].detach().to("cpu", torch.float64).numpy()
    return cross.reshape(n_groups, c[0], n_groups, c[m])


def _tile_match(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    rows, cols = hungarian(tile)
    return rows, cols, float(tile[rows, cols].mean())


def block_scores(sim: Tensor, sizes: Sequence[int], n_groups: int) -> Tensor:
    """Group-pair scores [N-1, G, G]: entry [m-1, g, h] is the mean similarity of the unit-level
    Hungarian between anchor group g and group h of model m (float64, on ``sim``'s device)."""
    sizes = check_sizes(sizes)
    sim = check_sim(sim, sizes)
    _group_sizes(sizes, n_groups)
    out = np.zeros((len(sizes) - 1, n_groups, n_groups))
    for m in range(1, len(sizes)):
        tiles = _tiles(sim, sizes, n_groups, m)
        for g in range(n_groups):
            for h in range(n_groups):
                out[m - 1, g, h] = _tile_match(tiles[g, :, h, :])[2]
    return torch.as_tensor(out, device=sim.device)


def assign_blocks(scores: Tensor) -> Tensor:
    """Hungarian (maximise) over each [G, G] score matrix of ``scores`` [N-1, G, G].

    Returns a LongTensor [N-1, G]: row m-1 maps anchor group g to the matched group of model m.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 3 or scores.shape[1] != scores.shape[2]:
        raise MergeError(
            f"scores must be a [N-1, G, G] tensor from block_scores, got {getattr(scores, 'shape', scores)!r}."
        )
    out = torch.empty(scores.shape[:2], dtype=torch.long)
    for m in range(scores.shape[0]):
        _, cols = hungarian(scores[m].detach().to("cpu", torch.float64).numpy())
        out[m] = torch.as_tensor(cols)
    return out.to(scores.device)


def _check_assignment(block_assignment: Tensor, n_models: int, n_groups: int) -> np.ndarray:
    a = block_assignment
    if isinstance(a, Tensor) and a.dim() == 1 and n_models == 2:
        a = a[None]
    expected = (n_models - 1, n_groups)
    if not isinstance(a, Tensor) or a.dtype not in (torch.int32, torch.int64) or tuple(a.shape) != expected:
        raise MergeError(
            f"block_assignment must be an integer tensor of shape {list(expected)} (from assign_blocks), "
            f"got {getattr(block_assignment, 'shape', block_assignment)!r}."
        )
    out = a.detach().cpu().numpy().astype(np.int64)
    for m, row in enumerate(out, start=1):
        if sorted(row.tolist()) != list(range(n_groups)):
            raise MergeError(
                f"block_assignment row {m - 1} (model {m}) is not a permutation of 0..{n_groups - 1}: {row.tolist()}."
            )
    return out


def _block_assignment(sim: Tensor, sizes: list[int], n_groups: int, given: Tensor | None) -> np.ndarray:
    if given is not None:
        return _check_assignment(given, len(sizes), n_groups)
    return assign_blocks(block_scores(sim, sizes, n_groups)).cpu().numpy()


def align_groups(
    sim: Tensor, sizes: Sequence[int], n_groups: int, *, block_assignment: Tensor | None = None
) -> Matching:
    """Group-respecting alignment onto model 0: groups are paired by :func:`assign_blocks` (or
    ``block_assignment``), then units by the Hungarian inside each paired tile.

    K = sizes[0]; merged group g occupies columns [g·c_0, (g+1)·c_0) and holds anchor group g plus
    group π_m(g) of every model m. ``value`` is the mean matched similarity averaged over models.
    """
    sizes = check_sizes(sizes)
    sim = check_sim(sim, sizes)
    c = _group_sizes(sizes, n_groups)
    assignment = _block_assignment(sim, sizes, n_groups, block_assignment)
    offs = offsets(sizes)
    columns = np.full(offs[-1], -1, dtype=np.int64)
    columns[: sizes[0]] = np.arange(sizes[0])
    values = []
    for m in range(1, len(sizes)):
        tiles = _tiles(sim, sizes, n_groups, m)
        scores = []
        for g in range(n_groups):
            h = int(assignment[m - 1, g])
            rows, cols, score = _tile_match(tiles[g, :, h, :])
            columns[offs[m] + h * c[m] + cols] = g * c[0] + rows
            scores.append(score)
        values.append(float(np.mean(scores)))
    value = float(np.mean(values)) if values else 0.0
    return Matching.from_columns(columns, sizes, sizes[0], value, dtype=sim.dtype, device=sim.device)


@dataclass
class GroupPlan:
    """Checked group-zip arguments: the unit sets to zip, widths, owners and budgets."""

    sim: np.ndarray  # symmetrized CPU copy with a -inf diagonal
    sizes: list[int]
    sets: list[np.ndarray]  # stacked unit indices of each set, ascending, in anchor-group order
    merges_per_set: int
    width_per_set: int
    alpha: float
    model_of: np.ndarray
    group_of: np.ndarray
    model_budgets: np.ndarray
    group_budgets: np.ndarray
    device: torch.device


def plan_zip_groups(
    sim: Tensor,
    sizes: Sequence[int],
    n_groups: int,
    r: float,
    alpha: float,
    beta: float,
    beta_group: float,
    block_assignment: Tensor | None,
) -> GroupPlan:
    """Validate group-zip arguments and derive sets, widths and budgets (shared with the oracle)."""
    sizes = check_sizes(sizes)
    sim = check_sim(sim, sizes)
    check_zip_params(r, alpha, beta)
    if not (isinstance(beta_group, (int, float)) and math.isfinite(beta_group) and beta_group >= 0):
        raise MergeError(f"beta_group must be a finite number >= 0, got {beta_group!r}.")
    c = _group_sizes(sizes, n_groups)
    assignment = _block_assignment(sim, sizes, n_groups, block_assignment)
    offs = offsets(sizes)
    sets = []
    for g in range(n_groups):
        heads = [g] + [int(assignment[m - 1, g]) for m in range(1, len(sizes))]
        sets.append(np.concatenate([offs[m] + h * c[m] + np.arange(c[m]) for m, h in enumerate(heads)]))
    per_set = max(1, int(sum(c) * (1 - r) + 1e-4))
    remove = offs[-1] - n_groups * per_set
    group_budgets = [math.floor((remove * c[m] * beta_group) // offs[-1] + 1e-4) for m in range(len(sizes))]
    return GroupPlan(
        sim=symmetrized(sim),
        sizes=sizes,
        sets=sets,
        merges_per_set=sum(c) - per_set,
        width_per_set=per_set,
        alpha=float(alpha),
        model_of=np.repeat(np.arange(len(sizes)), sizes),
        group_of=np.repeat(np.arange(len(sizes) * n_groups), np.repeat(c, n_groups)),
        model_budgets=owner_budgets(sizes, remove, beta),
        group_budgets=np.repeat(np.array(group_budgets, dtype=np.int64), n_groups),
        device=sim.device,
    )


def zip_groups(
    sim: Tensor,
    sizes: Sequence[int],
    n_groups: int,
    *,
    r: float = 0.5,
    alpha: float = 0.5,
    beta: float = 1.0,
    beta_group: float = 1.0,
    block_assignment: Tensor | None = None,
) -> Matching:
    """Group zip: pair groups as in :func:`align_groups`, then zip each set {anchor g, π_m(g)} alone.

    Each set of Σ c_m units is zipped to k = ⌊Σ c_m·(1−r)⌋ units (c_0 for N equal models and
    r = 1 − 1/N), sets in anchor-group order, so merged group g is columns [g·k, (g+1)·k). Model
    budgets (β, shared by all sets) follow :func:`zip_match`; each original group may also make
    ⌊(O−K)·c_m·β_group / O⌋ intra-group merges (ZipIt's ⌊(O−K)·β_group // (N·G)⌋ for equal sizes).
    ``value`` is the mean of all greedy picks. Identical to :func:`zip_groups_reference`.
    """
    plan = plan_zip_groups(sim, sizes, n_groups, r, alpha, beta, beta_group, block_assignment)
    s = plan.sim
    models = GreedyOwners(plan.model_of, plan.model_budgets.copy())
    groups = GreedyOwners(plan.group_of, plan.group_budgets.copy())
    columns = np.empty(sum(plan.sizes), dtype=np.int64)
    picks = []
    for g, members in enumerate(plan.sets):
        sub = np.ascontiguousarray(s[np.ix_(members, members)])
        owners = [
            GreedyOwners(models.ids[members], models.budgets),
            GreedyOwners(groups.ids[members], groups.budgets),
        ]
        pairs, set_picks = greedy_merges(sub, plan.merges_per_set, plan.alpha, owners)
        local, _ = columns_from_pairs(members.size, pairs)
        columns[members] = g * plan.width_per_set + local
        picks.append(set_picks)
    all_picks = np.concatenate(picks)
    value = float(all_picks.mean()) if all_picks.size else 0.0
    width = plan.width_per_set * len(plan.sets)
    return Matching.from_columns(columns, plan.sizes, width, value, dtype=sim.dtype, device=sim.device)
