"""The result type shared by every matcher, and the argument checks they all use.

Units of N models are stacked: model m owns rows/columns ``[offset_m, offset_m + sizes[m])`` of the
similarity matrix, with ``offset_m = sizes[0] + … + sizes[m-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fxmerge.errors import MergeError

__all__ = ["Matching", "check_sim", "check_sizes", "offsets"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Matching:
    """How the units of N models are combined into K merged units.

    ``merge[m]`` is [K, C_m] and ``unmerge[m]`` is [C_m, K]:

    * merged units = Σ_m merge[m] @ units_m, where each merged unit is the plain average of its
      members, so every row of ``concat(merge, dim=1)`` sums to 1;
    * units_m ≈ unmerge[m] @ merged, with 0/1 entries (a unit that joined no merged unit, possible
      only in :func:`~fxmerge.match.align` when a model is wider than the anchor, has a zero row).

    ``value`` is the mean matched similarity (alignment) or the mean of the greedy picks (zip); the
    iterative merge loop uses it as its stopping score.
    """

    merge: list[Tensor]
    unmerge: list[Tensor]
    value: float

    @property
    def width(self) -> int:
        """K, the number of merged units."""
        return int(self.unmerge[0].shape[1])

    @property
    def sizes(self) -> list[int]:
        """C_m, the number of units of each model."""
        return [int(u.shape[0]) for u in self.unmerge]

    def assignment(self, model: int) -> Tensor:
        """Merged unit of each unit of ``model`` as a LongTensor [C_m] (-1 where a unit was dropped)."""
        u = self.unmerge[model]
        cols = u.argmax(dim=1)
        return torch.where(u.sum(dim=1) > 0, cols, torch.full_like(cols, -1))

    @classmethod
    def from_columns(
        cls,
        columns: np.ndarray,
        sizes: Sequence[int],
        width: int,
        value: float,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Matching:
        """Build the dense matrices from ``columns[u]``, the merged unit of stacked unit u (-1: none)."""
        cols = np.asarray(columns, dtype=np.int64)
        kept = cols >= 0
        counts = np.bincount(cols[kept], minlength=width).astype(np.float64)
        merge, unmerge = [], []
        start = 0
        for size in sizes:
            c = torch.as_tensor(cols[start : start + size], device=device)
            start += size
            rows = torch.arange(size, device=device)[c >= 0]
            c = c[c >= 0]
            u = torch.zeros(size, width, dtype=dtype, device=device)
            u[rows, c] = 1.0
            w = torch.zeros(width, size, dtype=dtype, device=device)
            inv = torch.as_tensor(1.0 / np.maximum(counts, 1.0), dtype=dtype, device=device)
            w[c, rows] = inv[c]
            unmerge.append(u)
            merge.append(w)
        return cls(merge=merge, unmerge=unmerge, value=float(value))


def check_sizes(sizes: Sequence[int], name: str = "sizes") -> list[int]:
    """Return ``sizes`` as a list of positive ints, or raise :class:`MergeError`."""
    if isinstance(sizes, (int, Tensor)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise MergeError(f"{name} must be a non-empty list of per-model unit counts, got {sizes!r}.")
    out = []
    for m, s in enumerate(sizes):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise MergeError(f"{name}[{m}] must be a positive int (units of model {m}), got {s!r}.")
        out.append(int(s))
    return out


def offsets(sizes: Sequence[int]) -> list[int]:
    """Start row of each model in the stacked matrix, plus the total as the last entry."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def check_sim(sim: Tensor, sizes: Sequence[int], name: str = "sim") -> Tensor:
    """Check a stacked similarity matrix: float32/float64, [O, O] with O = Σ sizes, no NaN or +inf.

    -inf entries are allowed and mean "never match this pair".
    """
    if not isinstance(sim, Tensor):
        raise MergeError(f"{name} must be a torch.Tensor, got {type(sim).__name__}.")
    if sim.dtype not in _FLOAT_DTYPES:
        raise MergeError(f"{name} has dtype {sim.dtype}; convert it to torch.float32 or torch.float64 first.")
    total = sum(sizes)
    if sim.dim() != 2 or sim.shape[0] != total or sim.shape[1] != total:
        raise MergeError(
            f"{name} has shape {tuple(sim.shape)} but sizes {list(sizes)} need a square "
            f"[{total}, {total}] matrix over the stacked units of all models."
        )
    if sim.numel() and not bool(sim.max() < math.inf):  # max() propagates NaN
        raise MergeError(f"{name} contains NaN or +inf; clean the similarity (e.g. torch.nan_to_num) first.")
    return sim
