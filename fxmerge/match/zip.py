"""ZipIt greedy zipping with intra-model merges (MuDSC-Zip's matcher), exact and fast.

Semantics follow ``/work/shared/reference/mudsc.md`` §6.2 and, for unequal sizes or an explicit
target width, the elastic variant of ``/work/shared/reference/hetero.md`` §2.2:

* K = ``target`` if given, else ⌊O·(1−r) + 1e-4⌋ (O = Σ sizes); O − K greedy merges are made.
* Model m may make ⌊⌊(O−K)·C_m / O⌋·β⌋ intra-model merges (the hetero formula). With equal sizes this
  is exactly ZipIt's ⌊((O−K) // N)·β⌋. A 1e-4 guard before the floor absorbs float noise
  (e.g. 0.29·100), as in the released code.
* When a model's budget reaches 0, every pair of live clusters it owns is set to -inf. One deliberate
  difference from the released code: a budget that is 0 from the start (small β) forbids intra-model
  merges from the first step, instead of letting one through before the first check.
* Similarities of a merged cluster are α·min(S[x], S[y]) (α > 0); ownership is the model of the
  lowest-index member; ties go to the first maximum in row-major order; merged units are ordered by
  ascending representative index (model 0's surviving units first).

The kernel runs on the CPU in the input's dtype (float32 stays float32, so picks and ties equal the
reference loop's bit for bit); the matrices are returned on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fxmerge.errors import MergeError
from fxmerge.match.greedy import GreedyOwners, columns_from_pairs, greedy_merges, owner_budgets, symmetrized
from fxmerge.match.types import Matching, check_sim, check_sizes

__all__ = ["ZipPlan", "plan_zip", "zip_match"]


@dataclass
class ZipPlan:
    """Checked zip arguments: the symmetrized matrix, width, budgets and the owner of every unit."""

    sim: np.ndarray  # symmetrized CPU copy with a -inf diagonal, in the input's dtype
    sizes: list[int]
    width: int
    budgets: np.ndarray
    alpha: float
    device: torch.device

    @property
    def owner(self) -> np.ndarray:
        """The model of every stacked unit."""
        return np.repeat(np.arange(len(self.sizes)), self.sizes)

    @property
    def n_merges(self) -> int:
        """O − K."""
        return sum(self.sizes) - self.width


def check_zip_params(r: float, alpha: float, beta: float) -> None:
    """Reject r outside [0, 1), α ≤ 0 and β < 0 with a :class:`MergeError`."""
    if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
        raise MergeError(f"r (reduction ratio) must be in [0, 1), got {r!r}; r=0.5 halves 2 stacked models.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise MergeError(
            f"alpha must be a finite number > 0, got {alpha!r}; use a small value such as 1e-4 to make "
            "merged clusters unattractive."
        )
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise MergeError(f"beta (intra-model budget fraction) must be a finite number >= 0, got {beta!r}.")


def zip_width(total: int, r: float, target: int | None) -> int:
    """K: ``target`` when given (checked to lie in [1, total]), else ⌊total·(1−r) + 1e-4⌋."""
    if target is None:
        return max(1, int(total * (1 - r) + 1e-4))
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 1 <= target <= total:
        raise MergeError(
            f"target width must be an int in [1, {total}] (the stacked unit count), got {target!r}."
        )
    return int(target)


def plan_zip(
    sim: Tensor, sizes: Sequence[int], r: float, alpha: float, beta: float, target: int | None
) -> ZipPlan:
    """Validate the arguments shared by :func:`zip_match` and :func:`zip_match_reference`."""
    sizes = check_sizes(sizes)
    sim = check_sim(sim, sizes)
    check_zip_params(r, alpha, beta)
    total = sum(sizes)
    width = zip_width(total, r, target)
    budgets = owner_budgets(sizes, total - width, beta)
    return ZipPlan(symmetrized(sim), sizes, width, budgets, float(alpha), sim.device)


def zip_match(
    sim: Tensor,
    sizes: Sequence[int],
    *,
    r: float = 0.5,
    alpha: float = 0.5,
    beta: float = 1.0,
    target: int | None = None,
) -> Matching:
    """Zip the stacked units of N models down to K merged units by greedy agglomeration.

    ``sim`` is the symmetric [O, O] similarity over all stacked units (within-model blocks included:
    intra-model merges are allowed up to the β budgets). ``r`` is the reduction ratio (K = ⌊O(1−r)⌋;
    r = 0 returns the models unchanged), ``alpha`` the decay of a merged cluster's similarities,
    ``beta`` the fraction of merges each model may spend inside itself, and ``target`` overrides K.
    ``value`` is the mean of the picked similarities (0.0 when nothing was merged). The result is
    identical to :func:`~fxmerge.match.zip_match_reference`, but each merge costs O(O) instead of O(O²).
    """
    plan = plan_zip(sim, sizes, r, alpha, beta, target)
    s = plan.sim
    owner = GreedyOwners(plan.owner, plan.budgets.copy())
    pairs, picks = greedy_merges(s, plan.n_merges, plan.alpha, [owner])
    columns, width = columns_from_pairs(sum(plan.sizes), pairs)
    value = float(picks.mean()) if picks.size else 0.0
    return Matching.from_columns(columns, plan.sizes, width, value, dtype=sim.dtype, device=sim.device)
