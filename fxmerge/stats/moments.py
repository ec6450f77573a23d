"""Streaming per-channel mean and standard deviation of a tensor-valued signal."""

from __future__ import annotations

import torch
from torch import Tensor

from fxmerge.errors import MergeError

__all__ = ["ChannelMoments"]


class ChannelMoments:
    """Per-channel mean/variance over every other axis, accumulated in float64 over many batches.

    ``dim`` is the channel axis of the tensors passed to :meth:`update` (1 for NCHW convolution
    outputs, -1 for Linear outputs). Sums are taken about the first batch's mean for accuracy.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._shift: Tensor | None = None
        self._sum: Tensor | None = None
        self._sq: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add every position of ``x`` as one sample per channel."""
        flat = x.detach().movedim(self.dim, -1).reshape(-1, x.shape[self.dim]).to(torch.float64)
        if flat.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = flat.mean(dim=0)
            self._sum = torch.zeros_like(self._shift)
            self._sq = torch.zeros_like(self._shift)
        elif flat.shape[1] != self._shift.numel():
            raise MergeError(
                f"channel count changed from {self._shift.numel()} to {flat.shape[1]} between batches."
            )
        y = flat - self._shift
        self._sum += y.sum(dim=0)
        self._sq += (y * y).sum(dim=0)
        self.count += flat.shape[0]

    def _check(self) -> None:
        if self.count == 0:
            raise MergeError("no activations were recorded; does the data reach this module?")

    def mean(self) -> Tensor:
        """Per-channel mean (float64)."""
        self._check()
        return self._shift + self._sum / self.count

    def var(self) -> Tensor:
        """Per-channel population variance (float64, ≥ 0)."""
        self._check()
        m = self._sum / self.count
        return (self._sq / self.count - m * m).clamp_min(0.0)

    def std(self) -> Tensor:
        """Per-channel population standard deviation (float64)."""
        return self.var().sqrt()
