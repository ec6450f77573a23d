"""Streaming first and second moments of the concatenated units of N models, and their correlation.

This is the activation statistic of ZipIt / MuDSC (``/work/shared/reference/mudsc.md`` §2): all models
see the same samples, their features are concatenated along the unit axis (D = Σ dims), and the
Pearson correlation over all samples fills every block (cross-model and within-model).

Accumulation is a symmetric rank-k update of a preallocated D×D buffer that computes only its lower
triangle: BLAS ``syrk`` (half the flops of a GEMM) on CPU tensors, one GEMM per block row of the block
lower triangle (≈ (b+1)/(2b) of a full product for b blocks) on other devices. Features are copied
once per batch into a samples × units work buffer in the accumulation dtype.
Samples are shifted by the mean of the first batch before accumulating, which keeps E[xxᵀ] − μμᵀ
accurate when activations have large means. Memory is O(D²) plus one bounded work buffer,
independent of the number of samples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy.linalg import blas
from torch import Tensor

from fxmerge.errors import MergeError
from fxmerge.match.types import check_sizes

__all__ = ["CorrelationAccumulator"]

_WORK_ELEMENTS = 1 << 23  # samples are processed in chunks of at most this many D-vectors' entries
_BLOCK = 256  # target block size of the block-triangular update
_SYRK_MIN_FLOAT32 = 2048  # below this D, float32 runs faster as PyTorch block GEMMs


def _bounds(total: int) -> list[int]:
    blocks = max(1, min(8, total // _BLOCK))
    return [total * i // blocks for i in range(blocks + 1)]


def _rank_k_update(m: Tensor, w: Tensor, bounds: list[int]) -> None:
    """m += wᵀw on the lower triangle of m (the upper triangle is left stale).

    On the CPU this is one BLAS ``syrk`` (half the flops of a GEMM), run in place through SciPy on the
    tensors' memory; it is used for float64 and for float32 from D = 2048 on, where it measured
    faster than PyTorch's GEMM. Otherwise it is one GEMM per block row of the block lower triangle.
    """
    cpu = m.device.type == "cpu" and m.is_contiguous() and w.is_contiguous()
    if cpu and (m.dtype == torch.float64 or m.shape[0] >= _SYRK_MIN_FLOAT32):
        syrk = blas.dsyrk if m.dtype == torch.float64 else blas.ssyrk
        c = m.numpy().T  # Fortran-ordered view: its upper triangle is m's lower triangle
        out = syrk(1.0, w.numpy().T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
        if not np.shares_memory(out, c):
            c[...] = out
        return
    for a, z in itertools.pairwise(bounds):
        m[a:z, :z].addmm_(w[:, a:z].T, w[:, :z])


class CorrelationAccumulator:
    """Accumulate sums and cross second moments of ``[feats_0 | feats_1 | …]`` over many batches.

    ``dims[m]`` is the number of units of model m. ``dtype`` is the accumulation precision (float64 by
    default); ``device`` the device of the D×D buffers (default: that of the first batch). With
    ``nonfinite="zero"``, NaN/±inf features are replaced by 0 (the reference code's behaviour);
    the default ``"error"`` raises :class:`~fxmerge.errors.MergeError` instead.
    """

    def __init__(
        self,
        dims: Sequence[int],
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        nonfinite: str = "error",
    ) -> None:
        self.dims = check_sizes(dims, "dims")
        if dtype not in (torch.float32, torch.float64):
            raise MergeError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
        if nonfinite not in ("error", "zero"):
            raise MergeError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}.")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nonfinite = nonfinite
        self.total = sum(self.dims)
        self._bounds = _bounds(self.total)
        self._count = 0
        self._reduced = False
        self._shift: Tensor | None = None
        self._buffers: dict[str, Tensor] = {}
        if self.device is not None:
            self._allocate(self.device)

    @property
    def count(self) -> int:
        """Number of samples accumulated so far (across processes after :meth:`all_reduce`)."""
        return self._count

    def _allocate(self, device: torch.device) -> None:
        d, kw = self.total, {"dtype": self.dtype, "device": device}
        self.device = device
        self._buffers = {
            "sum": torch.zeros(d, **kw),
            "moment": torch.zeros(d, d, **kw),
            "min": torch.full((d,), math.inf, **kw),
            "max": torch.full((d,), -math.inf, **kw),
        }

    def _check(self, feats: Sequence[Tensor]) -> int:
        if isinstance(feats, Tensor) or len(feats) != len(self.dims):
            got = "a single tensor" if isinstance(feats, Tensor) else f"{len(feats)} tensors"
            raise MergeError(
                f"update() needs a list of {len(self.dims)} feature tensors (one per model), got {got}."
            )
        n = None
        for m, (f, d) in enumerate(zip(feats, self.dims, strict=True)):
            if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[1] != d:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise MergeError(
                    f"feats[{m}] must be [n_samples, {d}] (model {m} has {d} units), got {shape}."
                )
            if n is not None and f.shape[0] != n:
                raise MergeError(
                    f"feats[{m}] has {f.shape[0]} samples but feats[0] has {n}; models must see the same samples."
                )
            n = f.shape[0]
        return int(n)

    def _work(self, feats: Sequence[Tensor], start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """Shifted samples × units block [stop-start, D] in the accumulation dtype (a reused buffer),
        with the per-unit minimum and maximum of the raw features; non-finite features are rejected
        or zeroed. The first block's mean becomes the shift."""
        rows = stop - start
        buf = self._buffers.get("work")
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(rows, self.total, dtype=self.dtype, device=self.device)
            self._buffers["work"] = buf
        parts = [f[start:stop].detach().to(self.device) for f in feats]
        lo, hi = self._ranges(parts)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):  # aminmax propagates NaN
            if self.nonfinite == "error":
                raise MergeError(
                    "features contain NaN or inf; fix the model/data or pass nonfinite='zero' to treat them as 0."
                )
            parts = [torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0) for p in parts]
            lo, hi = self._ranges(parts)
        if self._shift is None:
            self._shift = torch.cat([p.mean(dim=0, dtype=self.dtype) for p in parts])
        w, col = buf[:rows], 0
        for p, d in zip(parts, self.dims, strict=True):
            shift, view = self._shift[col : col + d], w[:, col : col + d]
            if torch.result_type(p, shift) == self.dtype:
                torch.sub(p, shift, out=view)  # convert and shift in one pass
            else:
                view.copy_(p).sub_(shift)
            col += d
        return w, lo, hi

    def _ranges(self, parts: list[Tensor]) -> tuple[Tensor, Tensor]:
        ranges = [torch.aminmax(p, dim=0) for p in parts]
        return torch.cat([r.min for r in ranges]).to(self.dtype), torch.cat([r.max for r in ranges]).to(
            self.dtype
        )

    def update(self, feats: Sequence[Tensor]) -> None:
        """Add a batch: ``feats[m]`` is [n_samples, dims[m]], rows are the same samples for every model."""
        if self._reduced:
            raise MergeError(
                "update() after all_reduce(): the statistics are already global; start a new accumulator."
            )
        n = self._check(feats)
        if n == 0:
            return
        if not self._buffers:
            self._allocate(feats[0].device)
        chunk = max(64, _WORK_ELEMENTS // self.total)
        for start in range(0, n, chunk):
            self._accumulate(*self._work(feats, start, min(n, start + chunk)))

    def add_rows(self, w: Tensor, lo: Tensor, hi: Tensor) -> None:
        """Add samples the caller has already concatenated, checked for non-finite values and centred: ``w`` is
        [n_samples, D] in the accumulation dtype on the accumulator's device (contiguous; it may be overwritten),
        ``lo`` / ``hi`` the per-unit range of the raw features. No copy is made (the fast path of
        :class:`~fxmerge.stats.probes.SpaceStatistics`, which shifts every probe point by its own mean)."""
        if self._reduced:
            raise MergeError(
                "add_rows() after all_reduce(): the statistics are already global; start a new accumulator."
            )
        if w.dim() != 2 or w.shape[1] != self.total or w.dtype != self.dtype or not w.is_contiguous():
            raise MergeError(
                f"add_rows() needs a contiguous [n_samples, {self.total}] {self.dtype} tensor, got "
                f"{tuple(w.shape)} {w.dtype}."
            )
        if w.shape[0] == 0:
            return
        if not self._buffers:
            self._allocate(w.device)
        if self._shift is None:
            self._shift = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        elif bool(self._shift.any()):
            w.sub_(self._shift)
        self._accumulate(w, lo.to(self.dtype), hi.to(self.dtype))

    def _accumulate(self, w: Tensor, lo: Tensor, hi: Tensor) -> None:
        b = self._buffers
        torch.minimum(b["min"], lo, out=b["min"])
        torch.maximum(b["max"], hi, out=b["max"])
        b["sum"].add_(w.sum(dim=0))
        _rank_k_update(b["moment"], w, self._bounds)
        self._count += w.shape[0]

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the statistics over all processes of ``group`` (no-op without an initialised process group).

        Call it once, after every process has made all its updates; afterwards every process holds
        the global statistics and further updates are refused.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise MergeError("all_reduce() was already called on this accumulator.")
        if not self._buffers:
            backend = dist.get_backend(group)
            self._allocate(
                torch.device("cuda", torch.cuda.current_device())
                if backend == "nccl"
                else torch.device("cpu")
            )
        b = self._buffers
        shift = self._shift if self._shift is not None else torch.zeros_like(b["sum"])
        count = torch.tensor([self._count], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, group=group)
        weighted = shift * float(self._count)
        dist.all_reduce(weighted, group=group)
        total = int(count.item())
        common = weighted / float(total) if total > 0 else torch.zeros_like(shift)
        self._recenter(shift - common)
        self._shift = common
        ops = {
            "sum": dist.ReduceOp.SUM,
            "moment": dist.ReduceOp.SUM,
            "min": dist.ReduceOp.MIN,
            "max": dist.ReduceOp.MAX,
        }
        for key, op in ops.items():
            dist.all_reduce(b[key], op=op, group=group)
        self._count = total
        self._reduced = True

    def _recenter(self, delta: Tensor) -> None:
        """Re-express local sums about shift − delta: y' = y + delta."""
        b, n = self._buffers, float(self._count)
        old = b["sum"].clone()
        b["moment"].addr_(delta, old).addr_(old, delta).addr_(delta, delta, alpha=n)
        b["sum"].add_(delta, alpha=n)

    def _centered(self) -> tuple[Tensor, Tensor]:
        if self._count == 0:
            raise MergeError("no samples were accumulated; call update() with at least one batch first.")
        b, n = self._buffers, float(self._count)
        lower = b["moment"].tril()
        second = lower + lower.tril(-1).T
        mean_y = b["sum"] / n
        return mean_y, second / n - torch.outer(mean_y, mean_y)

    def raw_second_moment(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The second moment ``M = sum y y^T / n`` [D, D] of the samples ``y`` as accumulated (shifted by the
        accumulator's shift), full and exactly symmetric, in ``dtype`` on the accumulator's device. Built in one
        [D, D] buffer (the lower triangle mirrored block by block), so the peak is one matrix in ``dtype`` beside
        the accumulator's own."""
        if self._count == 0:
            raise MergeError("no samples were accumulated; call update() with at least one batch first.")
        m = self._buffers["moment"].to(dtype, copy=True)
        d, step = m.shape[0], 1024
        for a in range(0, d, step):
            z = min(d, a + step)
            blk = m[a:z, a:z]
            blk.copy_(blk.tril() + blk.tril(-1).T)
            if z < d:
                m[a:z, z:] = m[z:, a:z].T  # the strictly lower rows below the block, mirrored
        return m.div_(float(self._count))

    def release(self) -> None:
        """Free the buffers (the accumulator cannot be used afterwards)."""
        self._buffers = {}
        self._count = 0

    def mean(self) -> Tensor:
        """Per-unit mean [D] over all samples."""
        mean_y, _ = self._centered()
        return mean_y + self._shift

    def covariance(self) -> Tensor:
        """Population covariance [D, D] (divided by the sample count), exactly symmetric."""
        return self._centered()[1]

    def correlation(self) -> Tensor:
        """Pearson correlation [D, D], exactly symmetric, entries in [-1, 1], no NaN.

        A unit that never changed value (min == max over all samples) or has zero variance gets
        correlation 0 with every other unit and 1 with itself.
        """
        cov = self.covariance()
        var = cov.diagonal().clamp_min(0.0)
        constant = (self._buffers["max"] <= self._buffers["min"]) | (var <= 0)
        std = torch.where(constant, torch.ones_like(var), var.sqrt())
        corr = cov / torch.outer(std, std)
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        corr.clamp_(-1.0, 1.0)
        corr.fill_diagonal_(1.0)
        return corr
