"""Exact global top-k threshold over a whole model, streamed tensor by tensor (radix select).

For non-negative float32 values the int32 bit pattern is ordered like the value, so the k-th largest
|delta| is found with two histogram passes: 2^15 bins on the high 16 bits, then 2^16 bins on the low
16 bits of the one high bin that holds the k-th value. Memory is two small histograms per model. Ties
at the threshold are resolved in processing order (first come, first kept), which is deterministic.
"""

from __future__ import annotations

import struct

import torch

_CHUNK = 1 << 24
_HI_BINS = 1 << 15
_LO_BINS = 1 << 16


def _bits(absval: torch.Tensor) -> torch.Tensor:
    return absval.reshape(-1).contiguous().view(torch.int32)


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the ``rank``-th largest element (1-based) and how many lie in higher bins."""
    from_top = torch.cumsum(hist.flip(0), 0)
    pos = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    above = int(from_top[pos - 1]) if pos > 0 else 0
    return hist.numel() - 1 - pos, above


class GlobalThreshold:
    """k-th largest value of a stream of non-negative float32 tensors; feed it twice (two stages)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._hi = torch.zeros(_HI_BINS, dtype=torch.int64)
        self._lo = torch.zeros(_LO_BINS, dtype=torch.int64)
        self._bin = -1
        self._need = 0
        self.value = 0.0
        self.take_equal = 0
        self.total = 0

    def add_first(self, absval: torch.Tensor) -> None:
        """Stage 1: histogram of the high 16 bits."""
        bits = _bits(absval)
        self.total += bits.numel()
        for chunk in bits.split(_CHUNK):
            self._hi += torch.bincount(chunk >> 16, minlength=_HI_BINS)

    def finish_first(self) -> None:
        """Find the high bin holding the k-th largest."""
        self.k = min(self.k, self.total)
        if self.k <= 0:
            return
        self._bin, above = _locate(self._hi, self.k)
        self._need = self.k - above

    def add_second(self, absval: torch.Tensor) -> None:
        """Stage 2: histogram of the low 16 bits inside the selected high bin."""
        if self.k <= 0:
            return
        for chunk in _bits(absval).split(_CHUNK):
            sel = chunk[(chunk >> 16) == self._bin]
            if sel.numel():
                self._lo += torch.bincount(sel & 0xFFFF, minlength=_LO_BINS)

    def finish_second(self) -> None:
        """Fix the exact threshold value and how many elements equal to it are kept."""
        if self.k <= 0:
            self.value, self.take_equal = float("inf"), 0
            return
        low, above_in_bin = _locate(self._lo, self._need)
        self.value = struct.unpack("<f", struct.pack("<i", (self._bin << 16) | low))[0]
        self.take_equal = self._need - above_in_bin

    def mask(self, absval: torch.Tensor) -> torch.Tensor:
        """Keep-mask for one tensor in processing order: all > value, then equals while quota lasts."""
        mask = absval > self.value
        if self.take_equal > 0:
            eq = (absval == self.value).reshape(-1)
            count = int(eq.sum())
            if count > self.take_equal:
                rank = torch.cumsum(eq, 0)
                eq &= rank <= self.take_equal
                count = self.take_equal
            mask |= eq.view(absval.shape)
            self.take_equal -= count
        return mask
