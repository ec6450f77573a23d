"""The naive greedy zip loops, kept as test oracles for the fast kernel.

These follow the pseudocode of ``/work/shared/reference/mudsc.md`` §6.2 (plain zip) and §7 (group zip)
literally: every step takes the first arg-max of the whole current matrix, rewrites column and row x,
and physically drops row and column y, so each merge costs O(O²) and a 2×2048 zip takes minutes.
They share argument checking, budgets and block assignment with the fast versions, not the loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fxmerge.errors import MergeError
from fxmerge.match.groups import GroupPlan, plan_zip_groups
from fxmerge.match.types import Matching
from fxmerge.match.zip import ZipPlan, plan_zip

__all__ = ["reference_merges", "zip_groups_reference", "zip_match_reference"]


def _drop(t: Tensor, k: int, dim: int) -> Tensor:
    keep = torch.cat([torch.arange(k), torch.arange(k + 1, t.shape[dim])]).to(t.device)
    return t.index_select(dim, keep)


def _kill(s: Tensor, ids: Tensor, o: int) -> None:
    sel = ids == o
    s[sel[:, None] & sel[None, :]] = -math.inf


class _Loop:
    """State of the literal loop: the shrinking matrix, cluster reps, owners and budgets."""

    def __init__(
        self, sim: np.ndarray, owners: list[tuple[np.ndarray, np.ndarray]], alpha: float, device: torch.device
    ) -> None:
        self.s = torch.from_numpy(sim.copy()).to(device)
        self.reps = torch.arange(sim.shape[0])
        self.ids = [torch.as_tensor(ids) for ids, _ in owners]
        self.budgets = [b for _, b in owners]
        self.alpha = alpha
        self.pairs: list[tuple[int, int]] = []
        self.picks: list[float] = []
        for ids, budget in zip(self.ids, self.budgets, strict=True):
            for o in np.flatnonzero(budget <= 0):
                _kill(self.s, ids.to(self.s.device), int(o))

    def step(self, mask: Tensor | None = None) -> None:
        """One merge: first row-major maximum of S (+ mask), then rewrite x and drop y."""
        s = self.s
        scores = s if mask is None else s + mask
        flat = int(scores.reshape(-1).argmax())
        i, j = divmod(flat, s.shape[1])
        v = float(scores[i, j])
        if v == -math.inf:
            raise MergeError(
                f"greedy zipping stopped after {len(self.picks)} merges: all pairs are forbidden."
            )
        x, y = min(i, j), max(i, j)
        self.pairs.append((int(self.reps[x]), int(self.reps[y])))
        self.picks.append(v)
        s[:, x] = torch.minimum(s[:, x], s[:, y])
        s[:, x] *= self.alpha
        s = _drop(s, y, 1)
        s[x, :] = torch.minimum(s[x, :], s[y, :])
        s[x, :] *= self.alpha
        s = _drop(s, y, 0)
        self.s = s
        self.reps = _drop(self.reps, y, 0)
        for k, (ids, budget) in enumerate(zip(self.ids, self.budgets, strict=True)):
            ox, oy = int(ids[x]), int(ids[y])
            self.ids[k] = ids = _drop(ids, y, 0)
            if ox == oy:
                budget[ox] -= 1
                if budget[ox] <= 0:
                    _kill(self.s, ids.to(s.device), ox)


def reference_merges(plan: ZipPlan) -> tuple[list[tuple[int, int]], list[float]]:
    """Merge sequence of the literal loop: [(x, y)] in original unit indices, and the picks."""
    loop = _Loop(plan.sim, [(plan.owner, plan.budgets.copy())], plan.alpha, plan.device)
    for _ in range(plan.n_merges):
        loop.step()
    return loop.pairs, loop.picks


def _columns(n: int, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Literal unmerge bookkeeping: U = I, U[:, x] += U[:, y], drop column y."""
    u = torch.eye(n, dtype=torch.int64)
    reps = list(range(n))
    for x, y in pairs:
        cx, cy = reps.index(x), reps.index(y)
        u[:, cx] += u[:, cy]
        u = _drop(u, cy, 1)
        reps.pop(cy)
    return u.argmax(dim=1).numpy(), np.array(reps)


def zip_match_reference(
    sim: Tensor,
    sizes: Sequence[int],
    *,
    r: float = 0.5,
    alpha: float = 0.5,
    beta: float = 1.0,
    target: int | None = None,
) -> Matching:
    """:func:`~fxmerge.match.zip_match` computed by the naive O(O²)-per-merge loop (test oracle)."""
    plan = plan_zip(sim, sizes, r, alpha, beta, target)
    pairs, picks = reference_merges(plan)
    columns, _ = _columns(sum(plan.sizes), pairs)
    value = sum(picks) / len(picks) if picks else 0.0
    return Matching.from_columns(columns, plan.sizes, plan.width, value, dtype=sim.dtype, device=sim.device)


def _group_reference_merges(plan: GroupPlan) -> tuple[list[tuple[int, int]], list[float]]:
    owners = [(plan.model_of, plan.model_budgets.copy()), (plan.group_of, plan.group_budgets.copy())]
    loop = _Loop(plan.sim, owners, plan.alpha, plan.device)
    for members in plan.sets:
        for _ in range(plan.merges_per_set):
            inside = torch.isin(loop.reps, torch.as_tensor(members)).to(loop.s.device)
            mask = torch.full_like(loop.s, -math.inf)
            mask[inside[:, None] & inside[None, :]] = 0.0
            loop.step(mask)
    return loop.pairs, loop.picks


def zip_groups_reference(
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
    """:func:`~fxmerge.match.zip_groups` computed by the naive masked loop (test oracle)."""
    plan = plan_zip_groups(sim, sizes, n_groups, r, alpha, beta, beta_group, block_assignment)
    pairs, picks = _group_reference_merges(plan)
    flat, reps = _columns(sum(plan.sizes), pairs)
    member_sets = [set(members.tolist()) for members in plan.sets]
    order = [k for members in member_sets for k, rep in enumerate(reps) if int(rep) in members]
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    columns = position[flat]
    value = sum(picks) / len(picks) if picks else 0.0
    return Matching.from_columns(columns, plan.sizes, len(order), value, dtype=sim.dtype, device=sim.device)
