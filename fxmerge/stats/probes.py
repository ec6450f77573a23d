"""Activation statistics of permutation spaces at their probe points, streamed batch by batch.

A space is observed at a few probe points (a conv output, its normalisation, its activation). A point's
features are the space's units in one recorded node value (the unit axes, or a slice of a fused axis), every
other axis a sample (batch, tokens, pixels). The points of a space are stacked as samples of one
:class:`~fxmerge.stats.CorrelationAccumulator` over the concatenated units of the models, so memory is bounded
by the space sizes, not by the data; both the same-architecture merge and the depth/width merges read their
statistics from here.

The correlation is the **pooled within-point** correlation: every point is centred on its own mean. Stacked
without that, the per-point offsets (a BatchNorm's bias shifts every unit by its own constant) pass for shared
variation, and where a unit varies little inside each point the offsets dominate and it correlates ~1 with
many units, its true partner tying with them. Units constant at every point (a grouped-convolution group
whose inputs are all dead after a ReLU) carry their information in their constants and are compared by value.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fxmerge.errors import MergeError
from fxmerge.memory import release_freed_memory
from fxmerge.stats.batches import feature_rows
from fxmerge.stats.correlation import CorrelationAccumulator

__all__ = ["Probe", "SpaceStatistics", "invariant_over"]


@dataclass(frozen=True)
class Probe:
    """A space seen in node ``node``'s value: ``axes`` (jointly) are its units; position ``p`` of the space is
    the columns ``offset + p*unit .. + unit`` of those units (a part of a fused axis, heads beside a fixed
    head dim), the ``unit`` columns of a position being extra samples."""

    node: str
    axes: tuple[int, ...]
    offset: int = 0
    unit: int = 1


class _Points:
    """Per probe point of one space: its shift and, over its rows, count, sum of shifted values and raw range.

    Each point's rows are shifted by that point's first-batch mean before they reach the space's accumulator,
    so the between-point part removed at the end is small and the within-point covariance keeps its precision
    where a unit varies little inside each point but much between points (a ReLU output that is 0 where its
    input is far below 0). With ``torch.distributed`` every process has its own shifts; the correction below
    is exact for any shifts."""

    def __init__(self, n_points: int) -> None:
        self.count = [0] * n_points
        self.shift: list[Tensor | None] = [None] * n_points
        self.sum: list[Tensor | None] = [None] * n_points
        self.lo: list[Tensor | None] = [None] * n_points
        self.hi: list[Tensor | None] = [None] * n_points
        self._mean: list[Tensor | None] | None = None  # global per-point means
        # the re-centring terms: (S_j, d_j, n_j) per point, or (distributed) their matrix summed over processes
        self._terms: list[tuple[Tensor, Tensor, int]] = []
        self._correction: Tensor | None = None
        self.last_range: tuple[Tensor, Tensor] = (torch.zeros(0), torch.zeros(0))  # of the latest centre() call

    def centre(self, j: int, x: Tensor) -> Tensor:
        """``x`` (the concatenated [rows, units] features of all models at point ``j``) shifted in place by the
        point's shift; the point's count, sum (float64) and raw range are updated.

        Raises:
            MergeError: if a feature is NaN or infinite."""
        lo, hi = torch.aminmax(x, dim=0)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):  # aminmax propagates NaN
            raise MergeError("activation features contain NaN or inf: check the data for NaN/inf values and that "
                             "the models produce finite outputs on it")  # fmt: skip
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)
        if self.shift[j] is None:  # kept in x's dtype: the algebra below uses exactly the shift applied
            self.shift[j] = x.mean(dim=0, dtype=torch.float64).to(x.dtype)
        x -= self.shift[j]
        total = x.sum(dim=0, dtype=torch.float64)
        self.count[j] += x.shape[0]
        self.sum[j] = total if self.sum[j] is None else self.sum[j] + total
        self.lo[j] = lo if self.lo[j] is None else torch.minimum(self.lo[j], lo)
        self.hi[j] = hi if self.hi[j] is None else torch.maximum(self.hi[j], hi)
        self.last_range = (lo, hi)
        return x

    def reduce(self, size: int, device: torch.device | None) -> None:
        """Global per-point counts, means and ranges, and the re-centring term
        ``sum_j S_j d_j^T + d_j S_j^T + n_j d_j d_j^T`` (``S_j``: sum of shifted rows, ``d_j = shift_j - mean_j``),
        summed over the processes of the default group when ``torch.distributed`` is initialised."""
        import torch.distributed as dist

        kw = {"dtype": torch.float64, "device": device}
        n_local = list(self.count)
        s_local = [self.sum[j] if self.sum[j] is not None else torch.zeros(size, **kw) for j in range(len(n_local))]
        shifts = [self.shift[j].to(torch.float64) if self.shift[j] is not None else torch.zeros(size, **kw)
                  for j in range(len(n_local))]  # fmt: skip
        raw = [s + n * sh for s, n, sh in zip(s_local, n_local, shifts, strict=True)]
        distributed = dist.is_available() and dist.is_initialized()
        for j in range(len(n_local)):
            lo = self.lo[j] if self.lo[j] is not None else torch.full((size,), torch.inf, **kw)
            hi = self.hi[j] if self.hi[j] is not None else torch.full((size,), -torch.inf, **kw)
            if distributed:
                count = torch.tensor([float(self.count[j])], **kw)
                for t, op in ((count, dist.ReduceOp.SUM), (raw[j], dist.ReduceOp.SUM),
                              (lo, dist.ReduceOp.MIN), (hi, dist.ReduceOp.MAX)):  # fmt: skip
                    dist.all_reduce(t, op=op)
                self.count[j] = int(count.item())
            self.lo[j], self.hi[j] = (lo, hi) if self.count[j] else (None, None)
        self._mean = [raw[j] / self.count[j] if self.count[j] else None for j in range(len(n_local))]
        self._terms = [(s_local[j], shifts[j] - self._mean[j], n) for j, n in enumerate(n_local) if n]  # type: ignore[operator]
        self._correction = None
        if distributed:  # every process has its own terms: sum their matrix
            corr = torch.zeros(size, size, **kw)
            for s_j, d, n in self._terms:
                corr.addr_(s_j, d).addr_(d, s_j).addr_(d, d, alpha=float(n))
            dist.all_reduce(corr)
            self._correction, self._terms = corr, []

    def correlation(self, acc: CorrelationAccumulator) -> Tensor:
        """Pearson correlation [D, D] of the features centred per point (``acc`` holds the shifted rows; call
        :meth:`reduce` first).

        Within-point second moment ``W = (sum y y^T + correction) / N`` over the shifted rows ``y``, computed in
        float64 in one [D, D] buffer on the accumulator's device. A unit constant at every point gets 0 against
        every other unit and, between two constant units with per-point values ``a``, ``b``,
        ``1 - sum|a - b| / sum(|a| + |b|)`` (1 for equal values)."""
        assert self._mean is not None
        seen = [j for j, n in enumerate(self.count) if n > 0]
        cov = acc.raw_second_moment(torch.float64)
        inv = 1.0 / acc.count
        for s_j, d, n in self._terms:
            s_j, d = s_j.to(cov.device), d.to(cov.device)
            cov.addr_(s_j, d, alpha=inv).addr_(d, s_j, alpha=inv).addr_(d, d, alpha=n * inv)
        if self._correction is not None:
            cov.add_(self._correction.to(cov.device), alpha=inv)
        dev = cov.device
        means = torch.stack([self._mean[j].to(dev) for j in seen])  # type: ignore[union-attr]
        lo = torch.stack([self.lo[j].to(dev) for j in seen])  # type: ignore[union-attr]
        hi = torch.stack([self.hi[j].to(dev) for j in seen])  # type: ignore[union-attr]
        scale = torch.maximum(lo.abs(), hi.abs())
        eps = torch.finfo(acc.dtype).eps
        var = cov.diagonal().clone()
        constant = ((hi - lo) <= 16 * eps * scale).all(dim=0) | (var <= (eps * scale.amax(dim=0)) ** 2)
        std = torch.where(constant, torch.ones_like(var), var.clamp_min(0.0).sqrt())
        corr = cov.div_(std[:, None]).div_(std[None, :])  # in place: no second [D, D] matrix
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        corr.clamp_(-1.0, 1.0)
        idx = constant.nonzero().flatten()
        if len(idx):
            a = means[:, constant].T.contiguous()  # [constant units, points]: their values
            mass = a.abs().sum(-1)
            for r in range(0, len(idx), 256):  # row chunks: no [n_const, n_const] index tensors
                rows = slice(r, r + 256)
                both = mass[rows, None] + mass[None, :]
                diff = torch.cdist(a[rows], a, p=1.0)
                sim = torch.where(both > 0, 1.0 - diff / both.clamp_min(1e-300), torch.ones_like(both))
                corr[idx[rows, None], idx[None, :]] = sim
        corr.fill_diagonal_(1.0)
        return corr.to(dtype=acc.dtype)


class SpaceStatistics:
    """Streaming activation correlation of every space over its probe points.

    ``probes[k]``: the space's probe points; ``members[k]``: the models that hold the space (their units are
    concatenated in this order); ``sizes[k][m]``: the space's size in model ``m``; ``grouped[node]``: the axes of
    a node's value that carry a group (sorted per sample so that twins see the same samples, see
    :func:`invariant_over`); ``generator``: draws the sample subsets (the same rows in every model).
    """

    def __init__(
        self,
        probes: Mapping[Hashable, Sequence[Probe]],
        members: Mapping[Hashable, Sequence[int]],
        sizes: Mapping[Hashable, Sequence[int]],
        grouped: Mapping[str, set[int]],
        generator: torch.Generator,
    ) -> None:
        self.probes = {k: list(p) for k, p in probes.items()}
        self.members = {k: list(members[k]) for k in self.probes}
        self.sizes = {k: [sizes[k][m] for m in self.members[k]] for k in self.probes}
        self.grouped = grouped
        self.generator = generator
        self.accs: dict[Hashable, CorrelationAccumulator] = {}
        self.points = {k: _Points(len(p)) for k, p in self.probes.items()}

    @property
    def nodes(self) -> set[str]:
        """The graph nodes whose values :meth:`add` reads."""
        return {p.node for pts in self.probes.values() for p in pts}

    @property
    def empty(self) -> bool:
        """Whether no sample has been accumulated in any space."""
        return all(acc.count == 0 for acc in self.accs.values())

    def _acc(self, k: Hashable, x: Tensor) -> CorrelationAccumulator:
        """Space ``k``'s accumulator, in the features' precision (float64 for float64 models, else float32)."""
        if k not in self.accs:
            self.accs[k] = CorrelationAccumulator(self.sizes[k], dtype=x.dtype, device=x.device)
        return self.accs[k]

    def add(self, values: Sequence[Mapping[str, Tensor]]) -> None:
        """One batch: ``values[m][node]`` is model m's value of every node in :attr:`nodes`."""
        for k, pts in self.probes.items():
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            for j, p in enumerate(pts):
                feats = [self._features(values[m][p.node], p, size, seed)
                         for m, size in zip(self.members[k], self.sizes[k], strict=True)]  # fmt: skip
                x = _without_sentinel_rows(torch.cat(feats, dim=1))
                if x.shape[0]:
                    acc = self._acc(k, x)
                    x = self.points[k].centre(j, x.to(acc.dtype))
                    acc.add_rows(x, *(t.to(acc.dtype) for t in self.points[k].last_range))
        release_freed_memory()  # the batch's feature copies, of many sizes: do not let them pile up in the heap

    def _features(self, value: Tensor, p: Probe, size: int, seed: int) -> Tensor:
        value = invariant_over(value, tuple(sorted(self.grouped.get(p.node, set()) - set(p.axes))))
        f = feature_rows(value, p.axes, torch.Generator().manual_seed(seed))
        f = f[:, p.offset : p.offset + size * p.unit]
        return f.reshape(-1, size, p.unit).transpose(1, 2).reshape(-1, size)

    def correlations(self) -> dict[Hashable, Tensor]:
        """Per space with at least two samples: the pooled within-point Pearson correlation [D, D] of the
        concatenated units (all-reduced across processes when ``torch.distributed`` is initialised), in the
        accumulation dtype. Each space's accumulator is freed once its correlation is computed (call once), so
        the peak is the statistics plus one float64 [D, D] work matrix."""
        out = {}
        dtype = next((acc.dtype for acc in self.accs.values()), torch.float64)
        for k in self.probes:  # every space, in one order on every process (all-reduce pairs them up)
            acc = self.accs.setdefault(k, CorrelationAccumulator(self.sizes[k], dtype=dtype))
            acc.all_reduce()
            self.points[k].reduce(acc.total, acc.device)
            if acc.count > 1:
                out[k] = self.points[k].correlation(acc)
            acc.release()
            self.points[k] = _Points(len(self.probes[k]))
            if acc.total >= 1024:  # a large accumulator and work matrix were freed: return them
                release_freed_memory()
        release_freed_memory()  # and the smaller ones
        return out


def invariant_over(t: Tensor, axes: tuple[int, ...]) -> Tensor:
    """``t`` with its entries sorted over the joint ``axes`` (same shape): invariant to any permutation of them.

    A probe's samples are the entries along its non-unit axes; where one of those axes carries a group (the
    channels seen by a token-mixing MLP, the heads beside a head-dim probe), each model has it in its own order,
    so the entries are sorted there first: the twin of a unit then has the same samples in every model.
    """
    if not axes:
        return t
    order = [d for d in range(t.ndim) if d not in axes] + list(axes)
    y = t.permute(order)
    flat = y.reshape(*y.shape[: t.ndim - len(axes)], -1).sort(dim=-1).values
    return flat.reshape(y.shape).permute(sorted(range(t.ndim), key=order.__getitem__))


def _without_sentinel_rows(x: Tensor) -> Tensor:
    """``x`` without the rows (samples) that hold a masking sentinel: values near the dtype's largest magnitude
    (an attention mask's ``finfo.min`` added to scores) carry no information and overflow second moments."""
    if x.numel() == 0:
        return x
    limit = torch.finfo(x.dtype).max / 16
    lo, hi = torch.aminmax(x)
    if not (float(lo) <= -limit or float(hi) >= limit):
        return x
    return x[~(x.abs() >= limit).any(dim=1)]
