"""Alignment matching: every model is permuted onto model 0 (the anchor) with the Hungarian algorithm.

This is the "permute" matcher of Git Re-Basin / MuDSC-Align (``/work/shared/reference/mudsc.md`` §6.1):
for each model m ≥ 1, ``scipy.optimize.linear_sum_assignment(maximize=True)`` on the cross block
S[anchor units, model-m units]. Merged unit k is the average of anchor unit k and the units matched
to it, so the merged units follow the anchor's order and K = sizes[0].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fxmerge.errors import MergeError
from fxmerge.match.types import Matching, check_sim, check_sizes, offsets

__all__ = ["align", "align_perm", "hungarian"]


def hungarian(cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight assignment on a [rows, cols] array; returns (row_ind, col_ind) like scipy.

    -inf entries are forbidden pairs. Raises :class:`MergeError` when no complete assignment exists.

    Shortcut (exact): when every row's maximum lies in a different column, taking those maxima reaches the
    upper bound ``sum_i max_j cross[i, j]`` of every assignment, so it is optimal and no O(n^3) solve runs.
    This is the common case once coordinate descent has (nearly) converged.
    """
    if cross.ndim == 2 and 0 < cross.shape[0] <= cross.shape[1]:
        cols = cross.argmax(axis=1)
        rows = np.arange(cross.shape[0])
        if np.unique(cols).size == cols.size and np.isfinite(cross[rows, cols]).all():
            return rows, cols
    try:
        return linear_sum_assignment(cross, maximize=True)
    except ValueError as exc:
        raise MergeError(
            f"no feasible assignment on a {cross.shape[0]}x{cross.shape[1]} block ({exc}); "
            "too many pairs are forbidden with -inf."
        ) from exc


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def align_perm(cross: Tensor) -> Tensor:
    """Hungarian matching of B's units onto A's on ``cross`` = S[A units, B units] ([C_A, C_B], C_A ≤ C_B).

    Returns a LongTensor p of length C_A (on ``cross``'s device) with B-unit p[i] matched to A-unit i,
    maximising Σ_i cross[i, p[i]]. For a square block, p is a permutation and ``B[p]`` is B in A's order.
    """
    if not isinstance(cross, Tensor) or cross.dim() != 2:
        raise MergeError(f"cross must be a 2-D tensor [C_A, C_B], got {getattr(cross, 'shape', cross)!r}.")
    rows, cols = cross.shape
    if rows > cols:
        raise MergeError(
            f"cross has more rows ({rows}) than columns ({cols}); every A unit needs a B unit. "
            "Pass the block with the smaller model on the rows."
        )
    if torch.isnan(cross).any() or torch.isposinf(cross).any():
        raise MergeError("cross contains NaN or +inf; clean the similarity first.")
    _, col_ind = hungarian(_to_numpy(cross))
    return torch.as_tensor(col_ind, dtype=torch.long, device=cross.device)


def align(sim: Tensor, sizes: Sequence[int]) -> Matching:
    """Align every model onto model 0 with the Hungarian algorithm on the cross blocks of ``sim``.

    ``sim`` is the [O, O] similarity over the stacked units (O = Σ sizes); only the blocks
    S[model 0, model m] are read. K = sizes[0]; merged unit k averages anchor unit k with the units
    of the other models matched to it. With unequal sizes the assignment is rectangular: units of a
    model wider than the anchor that find no partner are dropped (zero rows in ``unmerge``), and a
    merged unit with no partner in a narrower model averages over fewer models.
    ``value`` is the mean matched similarity, averaged over models 1..N-1 (0.0 for N = 1).
    """
    sizes = check_sizes(sizes)
    sim = check_sim(sim, sizes)
    offs = offsets(sizes)
    k = sizes[0]
    columns = np.full(offs[-1], -1, dtype=np.int64)
    columns[:k] = np.arange(k)
    values = []
    for m in range(1, len(sizes)):
        cross = _to_numpy(sim[:k, offs[m] : offs[m + 1]])
        row_ind, col_ind = hungarian(cross)
        columns[offs[m] + col_ind] = row_ind
        values.append(float(cross[row_ind, col_ind].mean()))
    value = float(np.mean(values)) if values else 0.0
    return Matching.from_columns(columns, sizes, k, value, dtype=sim.dtype, device=sim.device)
