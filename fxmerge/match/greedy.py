"""The exact fast kernel behind ZipIt-style greedy zipping, and the helpers shared with the reference loop.

Semantics (``/work/shared/reference/mudsc.md`` §6.2): repeatedly take the first maximum of the current
similarity matrix in row-major order, merge the two clusters (x < y; x represents the result),
replace the similarities of x by ``alpha * min(S[x], S[y])``, drop y, and charge intra-owner merges
to the owner's budget; when a budget reaches 0 every pair of live clusters with that owner is set to
-inf. A cluster's owner is the owner of its lowest-index member (its representative).

The naive loop rebuilds an O×O matrix per merge (O(O³) in all). This kernel keeps the full matrix in
the original index space (dead rows are never picked and dead columns are masked to -inf whenever a
row is read, so row-major order over live indices is row-major order over the original indices)
together with each row's maximum and first arg-maximum. A merge only changes row/column x, removes y,
and (rarely) masks an owner block, so only row x, the rows whose arg-maximum was x or y, and the rows
of a masked owner need a fresh scan; every other row compares its maximum with its single changed
entry. Each step is O(O) vectorised work plus O(O) per rescanned row (≈ 6 rows per step on
correlation matrices); the one strided column write per step dominates at 2×2048.
Ties resolve exactly as in the reference: the global pick is the first row holding the maximum and
that row's first maximising column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from fxmerge.errors import MergeError

__all__ = ["GreedyOwners", "columns_from_pairs", "greedy_merges", "owner_budgets", "symmetrized"]

_BUDGET_EPS = 1e-4  # the released ZipIt/MuDSC code adds this before int() to absorb float noise


class GreedyOwners:
    """One ownership relation: a static owner id per unit and a mutable merge budget per owner.

    ``ids[u]`` is the owner of unit u (a cluster is owned by the owner of its representative) and
    ``budgets[o]`` the number of intra-owner merges owner o may still make; it is decremented in place,
    so one instance can carry budgets across several kernel calls (group zipping).
    """

    def __init__(self, ids: np.ndarray, budgets: np.ndarray) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.budgets = np.asarray(budgets, dtype=np.int64)


def owner_budgets(parts: Sequence[int], remove: int, beta: float) -> np.ndarray:
    """Intra-owner merge budgets ⌊⌊remove·d_i / D⌋·β⌋ for owners of sizes d_i (D = Σ d_i).

    With equal sizes this is ZipIt's ⌊(remove // N)·β⌋ (remove = O − K).
    """
    total = sum(parts)
    return np.array([math.floor((remove * d) // total * beta + _BUDGET_EPS) for d in parts], dtype=np.int64)


def _tile_pass(a: np.ndarray, out: np.ndarray, nan_aware: bool, tile: int = 128) -> float:
    """out = (a + aᵀ)/2 tile by tile (cache-friendly); returns max |a − aᵀ| (NaN-free if ``nan_aware``).

    Each upper tile is averaged with a contiguous copy of its transposed partner and written to both
    places, so out is bitwise symmetric.
    """
    n, gap = a.shape[0], 0.0
    for i0 in range(0, n, tile):
        for j0 in range(i0, n, tile):
            upper = a[i0 : i0 + tile, j0 : j0 + tile]
            t = np.ascontiguousarray(a[j0 : j0 + tile, i0 : i0 + tile].T)
            with np.errstate(invalid="ignore"):  # -inf - -inf on masked pairs
                diff = np.abs(t - upper)
            if nan_aware:
                finite = diff[~np.isnan(diff)]
                gap = max(gap, float(finite.max())) if finite.size else gap
            else:
                gap = max(gap, float(diff.max()))
            t += upper
            t *= 0.5
            out[i0 : i0 + tile, j0 : j0 + tile] = t
            out[j0 : j0 + tile, i0 : i0 + tile] = t.T
    return gap


def symmetrized(sim: Tensor, name: str = "sim") -> np.ndarray:
    """A bitwise-symmetric CPU copy of ``sim`` (same dtype) with a -inf diagonal.

    Greedy zipping assumes S = Sᵀ (the pick (i, j) and (j, i) must be the same merge). Entries are
    averaged with their transpose, which leaves exactly symmetric input unchanged; a pair that is
    -inf on both sides stays -inf. Raises :class:`MergeError` for clearly asymmetric input
    (|S − Sᵀ| above √eps·max|S|, or -inf on one side of a pair only).
    """
    a = sim.detach().cpu().numpy()
    out = np.empty_like(a)
    if a.size == 0:
        return out
    finite_min = float(a.min())
    nan_aware = finite_min == -np.inf
    if nan_aware:
        finite_min = float(np.min(a, where=np.isfinite(a), initial=0.0))
    scale = max(1.0, abs(float(a.max())), abs(finite_min))
    gap = _tile_pass(a, out, nan_aware)
    tol = math.sqrt(float(np.finfo(a.dtype).eps)) * scale
    if not gap <= tol:
        raise MergeError(
            f"{name} is not symmetric (max |S - Sᵀ| = {gap:.3g} > {tol:.3g}, or -inf on one side of a pair "
            "only); zip matching needs a similarity such as a correlation matrix over all stacked units."
        )
    np.fill_diagonal(out, -np.inf)
    return out


def _mask_owner(s: np.ndarray, alive: np.ndarray, owner: GreedyOwners, o: int) -> np.ndarray:
    members = np.flatnonzero(alive & (owner.ids == o))
    s[np.ix_(members, members)] = -np.inf
    return members


class _State:
    """Live-matrix bookkeeping: row maxima ``rmax`` with first arg-max ``rarg`` (rmax = -inf when dead).

    Dead columns are not written when they die (a strided column write costs a cache miss per row);
    they are listed in ``dead`` and written as -inf into a row only when that row is rescanned
    (``clean[i]`` counts the dead columns already written into row i).
    """

    def __init__(self, s: np.ndarray) -> None:
        n = s.shape[0]
        self.s = s
        self.dead = np.empty(n, dtype=np.int64)
        self.n_dead = 0
        self.clean = np.zeros(n, dtype=np.int64)
        self.alive = np.ones(n, dtype=bool)
        self.rarg = s.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
        self.rmax = s[np.arange(n), self.rarg]
        self.new = np.empty(n, dtype=s.dtype)
        self.stale = np.empty(n, dtype=bool)
        self.hit = np.empty(n, dtype=bool)

    def rescan(self, rows: np.ndarray) -> None:
        """Recompute the maximum and first arg-max of ``rows`` from scratch."""
        s, dead, n_dead, clean, rarg, rmax = self.s, self.dead, self.n_dead, self.clean, self.rarg, self.rmax
        for i in rows.tolist():
            row = s[i]
            if clean[i] < n_dead:
                row[dead[clean[i] : n_dead]] = -np.inf
                clean[i] = n_dead
            j = row.argmax()
            rarg[i] = j
            rmax[i] = row[j]

    def merge(self, x: int, y: int, a: np.floating) -> np.ndarray:
        """Rewrite row and column x with a·min(S[x], S[y]), retire y; return the new row x."""
        s, new = self.s, self.new
        np.minimum(s[x], s[y], out=new)
        new *= a
        self.alive[y] = False
        self.rmax[y] = -np.inf
        self.dead[self.n_dead] = y
        self.n_dead += 1
        new[self.dead[: self.n_dead]] = -np.inf
        self.clean[x] = self.n_dead
        s[x] = new
        s[:, x] = new
        return new

    def update(self, x: int, y: int, masked: list[np.ndarray]) -> None:
        """Restore rmax/rarg after column x changed to ``self.new`` and column y died.

        Rows whose arg-max was x or y (or that an exhausted budget just masked) are rescanned; every
        other live row only compares its maximum with its new entry at column x (a tie goes to x
        when x comes before the current arg-max).
        """
        rarg, rmax, new, stale, hit = self.rarg, self.rmax, self.new, self.stale, self.hit
        np.equal(rarg, x, out=stale)
        np.equal(rarg, y, out=hit)
        stale |= hit
        stale[x] = True
        for members in masked:
            stale[members] = True
        stale &= self.alive
        np.greater_equal(new, rmax, out=hit)
        hit &= self.alive
        np.greater(hit, stale, out=hit)  # hit and not stale
        touched = hit.nonzero()[0]
        if touched.size:
            up = touched[(new[touched] > rmax[touched]) | (rarg[touched] > x)]
            rmax[up] = new[up]
            rarg[up] = x
        self.rescan(stale.nonzero()[0])


def _charge(state: _State, owners: Sequence[GreedyOwners], x: int, y: int) -> list[np.ndarray]:
    """Charge an intra-owner merge to its budget; return the rows masked by exhausted budgets."""
    masked = []
    for owner in owners:
        o = owner.ids[x]
        if o == owner.ids[y]:
            owner.budgets[o] -= 1
            if owner.budgets[o] <= 0:
                masked.append(_mask_owner(state.s, state.alive, owner, int(o)))
    return masked


def greedy_merges(
    s: np.ndarray, n_merges: int, alpha: float, owners: Sequence[GreedyOwners]
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``n_merges`` greedy merges on ``s`` (modified in place) and return (pairs [n, 2], picks [n]).

    ``s`` is a C-contiguous symmetric float array with a -inf diagonal. ``pairs[t] = (x, y)`` with
    x < y: cluster y joined cluster x at step t; ``picks[t]`` is the similarity that was taken.
    Owners whose budget is already ≤ 0 have their intra pairs masked before the first merge.
    Raises :class:`MergeError` when every remaining pair is forbidden before ``n_merges`` are done.
    """
    a = s.dtype.type(alpha)
    alive = np.ones(s.shape[0], dtype=bool)
    for owner in owners:
        for o in np.flatnonzero(owner.budgets <= 0):
            _mask_owner(s, alive, owner, int(o))
    state = _State(s)
    rmax, rarg = state.rmax, state.rarg
    pairs = np.empty((n_merges, 2), dtype=np.int64)
    picks = np.empty(n_merges, dtype=np.float64)
    for t in range(n_merges):
        i = int(rmax.argmax())
        v = rmax[i]
        if v == -np.inf:
            raise MergeError(
                f"greedy zipping stopped after {t} of {n_merges} merges: every remaining pair is "
                "forbidden (-inf or an exhausted intra-model budget); raise beta or the target width."
            )
        j = int(rarg[i])
        x, y = (i, j) if i < j else (j, i)
        pairs[t] = x, y
        picks[t] = v
        state.merge(x, y, a)
        state.update(x, y, _charge(state, owners, x, y))
    return pairs, picks


def columns_from_pairs(n: int, pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """Merged-unit column of each of ``n`` units after the merges ``pairs``, and the width K.

    Columns are numbered by ascending representative index (the reference's merged-unit order).
    """
    parent = np.arange(n)
    for x, y in pairs:
        parent[y] = x
    # x < y in every pair, so following parents strictly decreases: resolve in ascending order.
    for u in range(n):
        parent[u] = parent[parent[u]]
    reps = np.flatnonzero(parent == np.arange(n))
    col_of_rep = np.full(n, -1, dtype=np.int64)
    col_of_rep[reps] = np.arange(reps.size)
    return col_of_rep[parent], int(reps.size)
