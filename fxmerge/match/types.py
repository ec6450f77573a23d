"""The result type shared by every matcher, and the argument checks they all use.

Units of N models are stacked: model m owns rows/columns ``[offset_m, offset_m + sizes[m])`` of the
similarity matrix, with ``offset_m = sizes[0] + … + sizes[m-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fxmerge.errors import MergeError

__all__ = ["Matching", "check_sim", "check_sizes", "offsets"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


class Matching:
    """How the units of N models are combined into K merged units.

    ``merge[m]`` is [K, C_m] and ``unmerge[m]`` is [C_m, K]:

    * merged units = Σ_m merge[m] @ units_m, where each merged unit is the plain average of its
      members, so every row of ``concat(merge, dim=1)`` sums to 1;
    * units_m ≈ unmerge[m] @ merged, with 0/1 entries (a unit that joined no merged unit, possible
      only in :func:`~fxmerge.match.align` when a model is wider than the anchor, has a zero row).

    ``value`` is the mean matched similarity (alignment) or the mean of the greedy picks (zip); the
    iterative merge loop uses it as its stopping score.

    Storage is compact: every matcher's result is an *assignment* (each unit joins at most one merged unit,
    every merged unit averages its members), kept as one index vector over the stacked units
    (:meth:`from_columns`, O(Σ C_m) memory). The dense matrices are built on first access of
    :attr:`merge`/:attr:`unmerge`; the merge engine never asks for them (:meth:`columns`, :meth:`weights`). A
    matching built from dense matrices keeps them as given.
    """

    __slots__ = ("_cache", "_cols", "_device", "_dtype", "_merge", "_sizes", "_unmerge", "_width", "value")

    def __init__(self, merge: list[Tensor], unmerge: list[Tensor], value: float) -> None:
        self._merge = list(merge)
        self._unmerge = list(unmerge)
        self._cols: np.ndarray | None = None
        self._sizes = [int(u.shape[0]) for u in self._unmerge]
        self._width = int(self._unmerge[0].shape[1])
        self._dtype = self._unmerge[0].dtype
        self._device = self._unmerge[0].device
        self._cache: dict = {}
        self.value = float(value)

    @property
    def width(self) -> int:
        """K, the number of merged units."""
        return self._width

    @property
    def sizes(self) -> list[int]:
        """C_m, the number of units of each model."""
        return list(self._sizes)

    @property
    def merge(self) -> list[Tensor]:
        """Per model, the [K, C_m] averaging matrix (built from the assignment on first access)."""
        if self._merge is None:
            self._merge, self._unmerge = self._dense()
        return self._merge

    @property
    def unmerge(self) -> list[Tensor]:
        """Per model, the [C_m, K] 0/1 selection matrix (built from the assignment on first access)."""
        if self._unmerge is None:
            self._merge, self._unmerge = self._dense()
        return self._unmerge

    def assignment(self, model: int) -> Tensor:
        """Merged unit of each unit of ``model`` as a LongTensor [C_m] (-1 where a unit was dropped)."""
        cols = self.columns(model)
        if cols is not None:
            return cols
        u = self._unmerge[model]
        c = u.argmax(dim=1)
        return torch.where(u.sum(dim=1) > 0, c, torch.full_like(c, -1))

    def columns(self, model: int) -> Tensor | None:
        """The assignment of ``model``'s units ([C_m], -1: dropped) when the matching is one (always for the
        built-in matchers), else None (a hand-built dense matching that mixes units)."""
        key = ("cols", model)
        if key not in self._cache:
            if self._cols is None and not self._derive_columns():
                self._cache[key] = None
            else:
                start = sum(self._sizes[:model])
                self._cache[key] = torch.as_tensor(
                    self._cols[start : start + self._sizes[model]], device=self._device
                )
        return self._cache[key]

    def is_permutation(self, model: int) -> bool:
        """Whether ``model``'s units map one-to-one onto all K merged units."""
        key = ("perm", model)
        if key not in self._cache:
            cols = self.columns(model)
            self._cache[key] = (
                cols is not None
                and cols.numel() == self._width
                and bool((torch.bincount(cols.clamp_min(0), minlength=self._width) == 1).all())
                and bool((cols >= 0).all())
            )
        return self._cache[key]

    def is_identity(self, model: int) -> bool:
        """Whether ``model``'s unit ``c`` is merged unit ``c`` for every ``c`` (a permutation that moves nothing)."""
        key = ("id", model)
        if key not in self._cache:
            cols = self.columns(model)
            self._cache[key] = self.is_permutation(model) and bool(
                torch.equal(cols, torch.arange(self._width, device=cols.device, dtype=cols.dtype))  # type: ignore[arg-type]
            )
        return self._cache[key]

    def weights(self, model: int) -> Tensor | None:
        """``merge[model]``'s non-zero per unit ([C_m]: 1/size of the unit's merged unit, 0 if dropped)."""
        key = ("w", model)
        if key not in self._cache:
            self._cache[key] = self._weights(model)
        return self._cache[key]

    def _weights(self, model: int) -> Tensor | None:
        """Exact 1/count in float64 whatever the matching's dtype (merged values are summed in float64)."""
        if self.columns(model) is None:
            return None
        inv = 1.0 / np.maximum(self._counts(), 1.0)
        out = np.where(self._cols >= 0, inv[np.maximum(self._cols, 0)], 0.0)
        start = sum(self._sizes[:model])
        return torch.as_tensor(
            out[start : start + self._sizes[model]], dtype=torch.float64, device=self._device
        )

    def is_one_to_one(self) -> bool:
        """Every merged unit holds exactly one unit of every model (a permutation per model)."""
        if self._cols is None and not self._derive_columns():
            return False
        if len(set(self._sizes)) != 1 or self._width != self._sizes[0]:
            return False
        return all(
            bool(np.array_equal(np.sort(self._cols[s : s + c]), np.arange(c)))
            for s, c in zip(np.cumsum([0, *self._sizes[:-1]]), self._sizes, strict=True)
        )

    def same_as(self, other: Matching) -> bool:
        """Whether ``other`` combines the units identically (its ``value`` aside)."""
        if self is other:
            return True
        if self._sizes != other._sizes or self._width != other._width:
            return False
        a, b = self._columns_or_none(), other._columns_or_none()
        if a is not None and b is not None:
            return bool(np.array_equal(a, b))
        return all(torch.equal(x, y) for x, y in zip(self.merge, other.merge, strict=True)) and all(
            torch.equal(x, y) for x, y in zip(self.unmerge, other.unmerge, strict=True)
        )

    def compact(self) -> Matching:
        """The same matching stored as an assignment (dense matrices dropped), or ``self`` if it is not one."""
        if self._merge is None or (self._cols is None and not self._derive_columns()):
            return self
        return Matching.from_columns(self._cols, self._sizes, self._width, self.value, dtype=self._dtype,
                                     device=self._device)  # fmt: skip

    def _columns_or_none(self) -> np.ndarray | None:
        if self._cols is None and not self._derive_columns():
            return None
        return self._cols

    def _counts(self) -> np.ndarray:
        kept = self._cols[self._cols >= 0]
        return np.bincount(kept, minlength=self._width).astype(np.float64)

    def _derive_columns(self) -> bool:
        """Read the assignment off dense matrices when they are one (0/1 unmerge, averaging merge)."""
        cols = []
        for m, u in enumerate(self._unmerge):
            if not bool(((u == 0) | (u == 1)).all()) or bool((u.sum(dim=1) > 1).any()):
                return False
            c = torch.where(u.sum(dim=1) > 0, u.argmax(dim=1), torch.full((u.shape[0],), -1, device=u.device))
            cols.append(c.cpu().numpy())
            nz = self._merge[m] != 0
            if bool((nz.sum(dim=0) > 1).any()) or not bool(((u != 0) == nz.T).all()):
                return False
        self._cols = np.concatenate(cols).astype(np.int64)
        counts = self._counts()
        for m, c in enumerate(cols):  # merge rows must average their members
            w = self._merge[m][c[c >= 0], np.nonzero(c >= 0)[0]].double().cpu().numpy()
            if not np.allclose(w, 1.0 / counts[c[c >= 0]], rtol=1e-6, atol=0):
                self._cols = None
                return False
        return True

    def _dense(self) -> tuple[list[Tensor], list[Tensor]]:
        counts = self._counts()
        inv = torch.as_tensor(1.0 / np.maximum(counts, 1.0), dtype=self._dtype, device=self._device)
        merge, unmerge = [], []
        start = 0
        for size in self._sizes:
            c = torch.as_tensor(self._cols[start : start + size], device=self._device)
            start += size
            rows = torch.arange(size, device=self._device)[c >= 0]
            c = c[c >= 0]
            u = torch.zeros(size, self._width, dtype=self._dtype, device=self._device)
            u[rows, c] = 1.0
            w = torch.zeros(self._width, size, dtype=self._dtype, device=self._device)
            w[c, rows] = inv[c]
            unmerge.append(u)
            merge.append(w)
        return merge, unmerge

    def __repr__(self) -> str:
        return f"Matching(sizes={self._sizes}, width={self._width}, value={self.value:.4g})"

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
        """A matching from ``columns[u]``, the merged unit of stacked unit u (-1: none); dense on demand."""
        self = cls.__new__(cls)
        self._cols = np.asarray(columns, dtype=np.int64).copy()
        self._sizes = [int(s) for s in sizes]
        self._width = int(width)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._merge = None
        self._unmerge = None
        self._cache = {}
        self.value = float(value)
        return self

    @classmethod
    def identity(cls, size: int, n_models: int, *, dtype: torch.dtype = torch.float64) -> Matching:
        """Every model keeps its units in place; merged unit k averages unit k of every model."""
        cols = np.tile(np.arange(size, dtype=np.int64), n_models)
        return cls.from_columns(cols, [size] * n_models, size, 1.0, dtype=dtype, device=torch.device("cpu"))


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
