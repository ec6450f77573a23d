"""Depth alignment: map the blocks of a shallow model onto segments of a deeper model.

All functions take a similarity matrix ``C`` with one row per deep block and one column per shallow
block (m x n, m >= n), e.g. the CKA matrix of :class:`fxmerge.hetero.cka.MinibatchCKA`. See
``/work/shared/reference/hetero.md`` §1.3-§1.7.

* :func:`sma` — segment-wise alignment (CLAFusion): a strictly increasing map maximising Σ_k C[a_k, k].
* :func:`lma` — layer-wise alignment: a partition into n contiguous segments maximising
  Σ_k Σ_{j in segment k} C[j, k] (the paper's objective, not the released off-by-one recurrence).
* :func:`uniform` — even segmentation baseline.
* :func:`align_stages` — runs one of them per stage with the true stage offsets.

Ties between optimal solutions are broken deterministically: the lexicographically smallest map
(SMA) or start sequence (LMA) wins, i.e. earlier matches and shorter leading segments are preferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fxmerge.errors import MergeError

__all__ = ["Segmentation", "align_stages", "as_similarity_matrix", "lma", "placement", "sma", "uniform"]

Method = Literal["lma", "sma", "uniform"]
Where = Literal["start", "end"]
MatrixLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


def as_similarity_matrix(c: MatrixLike, *, need_tall: bool = True) -> np.ndarray:
    """Validate a 2-D finite similarity matrix and return a float64 numpy copy.

    With ``need_tall`` the matrix must have at least as many rows (deep blocks) as columns.
    The caller's matrix is never modified.
    """
    arr = (
        c.detach().cpu().double().numpy() if isinstance(c, torch.Tensor) else np.asarray(c, dtype=np.float64)
    )
    if arr.ndim != 2:
        raise MergeError(f"The similarity matrix must be 2-D (deep x shallow), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise MergeError("The similarity matrix contains NaN or inf; recompute it (see MinibatchCKA).")
    m, n = arr.shape
    if need_tall and m < n:
        raise MergeError(
            f"The similarity matrix has {m} deep rows but {n} shallow columns; rows must be the deeper "
            "model's blocks (transpose it, or swap the models)."
        )
    return arr.copy()


def sma(c: MatrixLike) -> list[int]:
    """Segment-wise alignment: a strictly increasing map a maximising Σ_k C[a_k, k].

    Args:
        c: [m, n] similarity matrix, m deep blocks >= n shallow blocks.

    Returns:
        a, of length n, with 0 <= a_0 < a_1 < ... < a_{n-1} <= m-1; shallow block k is matched to
        deep block a_k, which ends its segment (a_{k-1}, a_k]. Among optimal maps, the
        lexicographically smallest is returned. O(n·m).
    """
    arr = as_similarity_matrix(c)
    m, n = arr.shape
    # best[k][j]: best score of shallow blocks k..n-1 with all matches at deep index >= j.
    best = np.full((n + 1, m + 1), -np.inf)
    best[n, :] = 0.0
    for k in range(n - 1, -1, -1):
        for j in range(m - n + k, -1, -1):
            best[k, j] = max(best[k, j + 1], arr[j, k] + best[k + 1, j + 1])
    out, j = [], 0
    for k in range(n):
        while arr[j, k] + best[k + 1, j + 1] != best[k, j]:  # first j attaining the optimum
            j += 1
        out.append(j)
        j += 1
    return out


def lma(c: MatrixLike) -> list[tuple[int, int]]:
    """Layer-wise alignment: contiguous segments covering all deep blocks, maximising Σ_k Σ_{j∈S_k} C[j, k].

    Args:
        c: [m, n] similarity matrix, m deep blocks >= n shallow blocks.

    Returns:
        n segments (s_k, e_k), inclusive, with s_0 = 0, s_{k+1} = e_k + 1, e_{n-1} = m - 1, each
        non-empty. Among optimal partitions the lexicographically smallest start sequence is
        returned. O(n·m) using prefix sums and a running maximum.
    """
    arr = as_similarity_matrix(c)
    m, n = arr.shape
    if n == 0:
        if m:
            raise MergeError(f"Cannot partition {m} deep blocks into 0 segments: the shallow side is empty.")
        return []
    prefix = np.vstack([np.zeros((1, n)), np.cumsum(arr, axis=0)])  # prefix[i, k] = Σ_{j<i} C[j, k]
    # gain[k][t] = best score of segments k..n-1 when segment k starts at deep index t, plus prefix[t, k].
    gain = np.full((n, m + 1), -np.inf)
    gain[n - 1, :] = prefix[m, n - 1]
    for k in range(n - 2, -1, -1):
        running = -np.inf
        for t in range(m - n + k + 1, k, -1):  # t: start of segment k+1
            running = max(running, prefix[t, k] + gain[k + 1, t] - prefix[t, k + 1])
            gain[k, t - 1] = running
    starts = [0]
    for k in range(n - 1):
        lo, hi = starts[-1] + 1, m - n + k + 2
        cand = [prefix[t, k] + gain[k + 1, t] - prefix[t, k + 1] for t in range(lo, hi)]
        starts.append(lo + int(np.argmax(cand)))  # argmax returns the first maximum
    return [(s, e - 1) for s, e in zip(starts, [*starts[1:], m], strict=True)]


def uniform(m: int, n: int) -> list[tuple[int, int]]:
    """Even segmentation of m deep blocks into n contiguous segments (sizes differ by at most one).

    The first m mod n segments get the extra block. Returns inclusive (start, end) pairs.
    """
    if n < 0 or m < n or (n == 0 and m > 0):
        raise MergeError(f"Cannot split {m} deep blocks into {n} non-empty segments (need m >= n >= 1).")
    base, extra = divmod(m, n) if n else (0, 0)
    out, start = [], 0
    for k in range(n):
        size = base + (1 if k < extra else 0)
        out.append((start, start + size - 1))
        start += size
    return out


def placement(segment: tuple[int, int], where: Where = "start") -> int:
    """Deep index inside ``segment`` (inclusive start, end) where the shallow block is placed.

    ``"start"`` follows the paper (identities follow the real block); ``"end"`` reproduces the
    released code (identities precede it; with SMA this is the matched block a_k).
    """
    start, end = segment
    if start > end:
        raise MergeError(f"Empty segment {segment}: start must be <= end.")
    if where == "start":
        return start
    if where == "end":
        return end
    raise MergeError(f"placement: where must be 'start' or 'end', got {where!r}.")


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`align_stages`.

    Attributes:
        segments: for each shallow block (global order) its deep segment (start, end), inclusive,
            in global deep indices.
        score: the objective summed over all stages, pinned pairs included (SMA: Σ C[end_k, k];
            LMA and uniform: Σ_k Σ_{j∈S_k} C[j, k]).
        method: the alignment method used.
        stages_a: blocks per stage of the deep model (rows of C).
        stages_b: blocks per stage of the shallow model (columns of C).

    Deep blocks that are not the placement of any shallow block are identity blocks. With SMA, deep
    blocks after the last match of a stage belong to no segment.
    """

    segments: tuple[tuple[int, int], ...]
    score: float
    method: Method
    stages_a: tuple[int, ...]
    stages_b: tuple[int, ...]

    @property
    def n_deep(self) -> int:
        """Number of deep blocks (rows of C)."""
        return sum(self.stages_a)

    def slots(self, where: Where = "start") -> list[int]:
        """Global deep index receiving each shallow block, per :func:`placement`."""
        return [placement(seg, where) for seg in self.segments]


def _stage_segments(sub: np.ndarray, method: Method) -> tuple[list[tuple[int, int]], float]:
    """Segments (stage-local) and score of one stage's submatrix."""
    m, n = sub.shape
    if n == 0:  # only the pinned block: the remaining deep blocks are trailing identities
        return [], 0.0
    if method == "sma":
        ends = sma(sub)
        segs = [(prev + 1, end) for prev, end in zip([-1, *ends[:-1]], ends, strict=True)]
        return segs, float(sum(sub[end, k] for k, end in enumerate(ends)))
    segs = lma(sub) if method == "lma" else uniform(m, n)
    return segs, float(sum(sub[s : e + 1, k].sum() for k, (s, e) in enumerate(segs)))


def _check_stages(shape: tuple[int, int], stages_a: Sequence[int], stages_b: Sequence[int]) -> None:
    if len(stages_a) != len(stages_b):
        raise MergeError(
            f"Stage counts differ: the deep model has {len(stages_a)} stages {list(stages_a)}, the shallow "
            f"model {len(stages_b)} stages {list(stages_b)}; depth alignment needs matching stages."
        )
    for s, (ma, nb) in enumerate(zip(stages_a, stages_b, strict=True)):
        if ma < 1 or nb < 1:
            raise MergeError(f"Stage {s} must have at least one block in each model, got {ma} and {nb}.")
        if nb > ma:
            raise MergeError(
                f"Stage {s}: the shallow model has {nb} blocks but the deep model only {ma}; pass the "
                "model that is deeper in every stage as A (rows of C)."
            )
    expected = (sum(stages_a), sum(stages_b))
    if tuple(shape) != expected:
        raise MergeError(
            f"The similarity matrix has shape {tuple(shape)} but the stages {list(stages_a)} x "
            f"{list(stages_b)} need {expected}."
        )


def align_stages(
    c: MatrixLike,
    stages_a: Sequence[int],
    stages_b: Sequence[int],
    method: Method = "lma",
    pin_first: bool = True,
) -> Segmentation:
    """Align a shallow model's blocks to a deep model's, stage by stage.

    Args:
        c: [Σ stages_a, Σ stages_b] similarity between deep blocks (rows) and shallow blocks (columns).
        stages_a: blocks per stage of the deep model, in order.
        stages_b: blocks per stage of the shallow model; same number of stages, each <= stages_a's.
        method: "lma", "sma" or "uniform".
        pin_first: pin each stage's first shallow block to the stage's first deep block (its
            segment is that block alone) and align the remaining blocks on the rest of the stage.

    Returns:
        A :class:`Segmentation` in global indices. Every stage uses its own submatrix of C.

    Raises:
        MergeError: on stage count mismatch, a shallow stage deeper than the deep one, a matrix
            whose shape does not fit the stages, non-finite entries, or an unknown method.
    """
    if method not in ("lma", "sma", "uniform"):
        raise MergeError(f"Unknown alignment method {method!r}; use 'lma', 'sma' or 'uniform'.")
    arr = as_similarity_matrix(c, need_tall=False)
    _check_stages(arr.shape, stages_a, stages_b)
    segments: list[tuple[int, int]] = []
    score, row0, col0 = 0.0, 0, 0
    for ma, nb in zip(stages_a, stages_b, strict=True):
        skip = 1 if pin_first else 0
        if pin_first:
            segments.append((row0, row0))
            score += float(arr[row0, col0])
        local, local_score = _stage_segments(arr[row0 + skip : row0 + ma, col0 + skip : col0 + nb], method)
        segments.extend((row0 + skip + s, row0 + skip + e) for s, e in local)
        score += local_score
        row0, col0 = row0 + ma, col0 + nb
    return Segmentation(tuple(segments), score, method, tuple(stages_a), tuple(stages_b))
