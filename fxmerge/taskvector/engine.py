"""The per-tensor engine: delta -> sparsify -> rescale -> combine -> lambda -> + base -> out dtype.

Whole-model statistics (DPPA shifts, global thresholds) come from :mod:`fxmerge.taskvector.passes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxmerge.errors import TaskVectorError
from fxmerge.taskvector.combine import combine_linear, model_stock_delta, slerp
from fxmerge.taskvector.dppa import band_densities, is_target
from fxmerge.taskvector.globalk import GlobalThreshold
from fxmerge.taskvector.methods import MergeOptions
from fxmerge.taskvector.plan import Region, TensorPlan, split_plan
from fxmerge.taskvector.sources import TensorSource
from fxmerge.taskvector.sparsify import (
    apply_rescale,
    band_masks,
    breadcrumbs_mask,
    della_keep_prob,
    keep_count,
    magnitude_mask,
    random_mask,
    tensor_generator,
)
from fxmerge.taskvector.workspace import (
    Workspace,
    band_scale_,
    bernoulli_drop_,
    is_finite,
    ties_combine_,
    ties_trim_combine_,
    topk_trim_,
)


def _crop(t: torch.Tensor, region: Region) -> torch.Tensor:
    if tuple(t.shape) == tuple(region):
        return t
    return t[tuple(slice(0, r) for r in region)]


@dataclass
class Ready:
    """Inputs of one tensor prepared ahead of time: base, deltas by model index, non-finite ones."""

    base: torch.Tensor | None = None
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    bad: set[int] = field(default_factory=set)


@dataclass
class Context:
    """Inputs and whole-model statistics shared by every tensor of one merge."""

    base: TensorSource
    models: list[TensorSource]
    opts: MergeOptions
    params: dict[str, tuple[list[float], list[float]]]
    shifts: list[dict[str, float]] | None = None
    thresholds: list[GlobalThreshold] | None = None
    ws: Workspace = field(default_factory=Workspace)
    base_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)
    ready: Ready = field(default_factory=Ready)
    step: int = 0  # position of the plan being merged; selects the work buffers

    def __post_init__(self) -> None:
        self.base_shapes = {k: v.shape for k, v in self.base.infos().items()}
        self.model_shapes = [{k: v.shape for k, v in m.infos().items()} for m in self.models]

    def is_direct(self, plan: TensorPlan, who: int) -> bool:
        """Whether input ``who`` (-1: base) is stored with exactly the plan's base-region shape."""
        if plan.span is not None:
            return plan.regions[who] is not None if who >= 0 else True
        if who < 0:
            return self.base_shapes[plan.name] == tuple(plan.base_region)
        region = plan.regions[who]
        return region == plan.base_region and self.model_shapes[who][plan.name] == tuple(region)

    def _load_direct(self, plan: TensorPlan, who: int, step: int) -> torch.Tensor:
        """Read input ``who`` into its work buffer for ``step``. The base buffer, which becomes the merged
        output and is written out while the next two plans are read and merged, rotates over three slots;
        the delta buffers, consumed by the merge itself, over two."""
        src = self.base if who < 0 else self.models[who]
        slot = f"in{who}.{step % 3 if who < 0 else step % 2}"
        return src.load(plan.name, torch.float32, out=self.ws.get(slot, plan.base_region), span=plan.span)

    def prefetch(self, plan: TensorPlan, step: int) -> Ready:
        """Load ``plan``'s base and compute its deltas into the work buffers of ``step``, checking
        finiteness (runs in the I/O worker thread while the main thread merges the previous plan)."""
        ready = Ready()
        if not plan.merge or not self.is_direct(plan, -1):
            return ready
        ready.base = self._load_direct(plan, -1, step)
        check = self.check_inputs
        ready.bad = {-1} if check and not is_finite(ready.base) else set()
        for i, r in enumerate(plan.regions):
            if r is not None and self.is_direct(plan, i):
                ready.deltas[i] = d = self._load_direct(plan, i, step).sub_(ready.base)
                if check and not is_finite(d):
                    ready.bad.add(i)
        return ready

    @property
    def check_inputs(self) -> bool:
        """Whether inputs must be checked for NaN/Inf one by one. A plain weighted sum propagates any
        NaN/Inf into the output, so there only the output is checked (and the culprit found afterwards)."""
        spec = self.opts.spec
        return spec.sparsify is not None or spec.consensus is not None or spec.combine != "linear"

    def diagnose(self, plan: TensorPlan) -> TaskVectorError:
        """The error for a non-finite merged tensor: name the input that caused it, else overflow."""
        base = _crop(self.base.load(plan.name, torch.float32, span=plan.span), plan.base_region)
        if not is_finite(base):
            return TaskVectorError(f"{self.base.label}: tensor {plan.name!r} has NaN/Inf values; the base must be finite")
        for i, region in enumerate(plan.regions):
            if region is not None:
                d = _crop(self.models[i].load(plan.name, torch.float32, span=plan.span), region) - _crop(base, region)
                if not is_finite(d):
                    return self._nonfinite_delta(plan, i)
        return TaskVectorError(f"tensor {plan.name!r}: the merged values overflowed to Inf/NaN; lower the weights or lambda")

    def load_base(self, plan: TensorPlan) -> torch.Tensor:
        """The base tensor in float32, cropped to the plan's base region (in a work buffer when possible)."""
        base = self.ready.base
        if base is None:
            direct = self.is_direct(plan, -1)
            base = self._load_direct(plan, -1, self.step) if direct else self.base.load(plan.name, torch.float32)
            base = _crop(base, plan.base_region)
            if not is_finite(base):
                self.ready.bad.add(-1)
        if -1 in self.ready.bad:
            raise TaskVectorError(f"{self.base.label}: tensor {plan.name!r} has NaN/Inf values; the base must be finite")
        return base

    def delta(self, plan: TensorPlan, i: int, base: torch.Tensor) -> torch.Tensor:
        """float32 ``model_i - base`` over model i's region; non-finite values are an error."""
        region = plan.regions[i]
        if i in self.ready.deltas:
            if i in self.ready.bad:
                raise self._nonfinite_delta(plan, i)
            return self.ready.deltas.pop(i)
        if self.is_direct(plan, i):
            d = self._load_direct(plan, i, self.step).sub_(base)
        else:
            d = _crop(self.models[i].load(plan.name, torch.float32), region) - _crop(base, region)
        if not is_finite(d):
            raise self._nonfinite_delta(plan, i)
        return d

    def _nonfinite_delta(self, plan: TensorPlan, i: int) -> TaskVectorError:
        return TaskVectorError(
            f"{self.models[i].label}: tensor {plan.name!r} has non-finite (NaN/Inf) delta values; "
            "check the checkpoint (and the base) for NaNs or overflow before merging"
        )

    def target(self, plan: TensorPlan) -> bool:
        """Whether DP/DPA's adaptive densities apply to this tensor."""
        return self.shifts is not None and is_target(plan.name, len(plan.base_region), self.opts.dppa.target)


def sparsify_delta(ctx: Context, plan: TensorPlan, i: int, delta: torch.Tensor, density: float) -> torch.Tensor:
    """Apply the method's sparsifier (and rescale) to model i's delta of one tensor."""
    opts, sp, name = ctx.opts, ctx.opts.spec.sparsify, plan.name
    if sp is None or delta.numel() == 0:
        return delta
    if sp == "dppa":
        if not ctx.target(plan):
            return delta
        d = opts.dppa
        dens = band_densities(density, ctx.shifts[i][name], d.bands, d.min_density)
        if delta.is_contiguous():
            return band_scale_(delta, [keep_count(x, delta.numel()) for x in dens], d.band_factors, ctx.ws)
        factor = torch.zeros_like(delta)
        for mask, alpha in zip(band_masks(delta, dens), d.band_factors, strict=True):
            factor.masked_fill_(mask, alpha)
        return delta.mul_(factor)
    fast = _fast_sparsify(ctx, plan, i, delta, density)
    if fast is not None:
        return fast
    keep: float | torch.Tensor = density
    if sp == "magnitude":
        if ctx.thresholds is not None:
            mask = ctx.thresholds[i].mask(delta.abs())
        elif density >= 1.0 and not ctx.target(plan):
            return delta
        elif ctx.target(plan):
            keep = min(1.0, max(opts.dppa.min_density, density + ctx.shifts[i][name]))
            mask = magnitude_mask(delta, keep, "tensor")
        else:
            mask = magnitude_mask(delta, density, "row" if opts.scope == "row" else "tensor")
    elif density >= 1.0:
        return delta
    elif sp == "random":
        mask = random_mask(delta.shape, density, tensor_generator(opts.seed, i, name))
    elif sp == "della":
        keep = della_keep_prob(delta, density, opts.epsilon, "row" if opts.scope == "row" else "tensor")
        mask = torch.rand(delta.shape, generator=tensor_generator(opts.seed, i, name)) < keep
    else:
        mask = breadcrumbs_mask(delta, density, opts.gamma)
    kept = delta * mask
    return apply_rescale(delta, kept, opts.spec.rescale, keep)


def _fast_sparsify(ctx: Context, plan: TensorPlan, i: int, delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """In-place top-k / Bernoulli for the common cases; ``None`` when the general path must run."""
    opts, sp = ctx.opts, ctx.opts.spec.sparsify
    if density >= 1.0 or ctx.thresholds is not None or ctx.target(plan) or not delta.is_contiguous():
        return None
    if not ((sp == "magnitude" and opts.scope != "row") or sp == "random"):
        return None
    before = torch.linalg.vector_norm(delta, 1) if opts.spec.rescale == "l1" else None
    if sp == "magnitude":
        topk_trim_(delta, keep_count(density, delta.numel()), ctx.ws)
    else:
        bernoulli_drop_(delta, density, tensor_generator(opts.seed, i, plan.name), ctx.ws)
    if opts.spec.rescale == "inverse":
        delta.div_(density)
    elif before is not None:
        after = torch.linalg.vector_norm(delta, 1)
        if float(after) > 1e-7:
            delta.mul_(before / after)
    return delta


def _pad(d: torch.Tensor, region: Region) -> tuple[torch.Tensor, torch.Tensor]:
    full = torch.zeros(region, dtype=d.dtype)
    cover = torch.zeros(region, dtype=torch.bool)
    sl = tuple(slice(0, s) for s in d.shape)
    full[sl] = d
    cover[sl] = True
    return full, cover


def _combined_delta(ctx: Context, plan: TensorPlan, base: torch.Tensor) -> torch.Tensor | None:
    ws, ds = ctx.params[plan.name]
    spec = ctx.opts.spec
    present = [i for i, r in enumerate(plan.regions) if r is not None]
    if spec.combine == "slerp":
        if not plan.uniform:
            raise TaskVectorError(f"slerp: tensor {plan.name!r} has mismatched shapes; use shape_policy 'common'")
        return _slerp_delta(ctx, plan, base, present[0])
    if spec.combine == "linear" and spec.consensus is None and plan.uniform:
        acc = None
        for i in present:
            d = sparsify_delta(ctx, plan, i, ctx.delta(plan, i, base), ds[i])
            if acc is None:
                acc = d if ws[i] == 1.0 else d.mul_(ws[i])
            else:
                acc.add_(d, alpha=ws[i])
        if spec.normalize:
            total = sum(ws[i] for i in present)
            acc.div_(total if abs(total) >= 1e-8 else 1.0)
        return acc
    if _fused_ties(ctx, plan):
        deltas = [ctx.delta(plan, i, base) for i in present]
        ks = [keep_count(ds[i], d.numel()) for i, d in zip(present, deltas, strict=True)]
        return ties_trim_combine_(deltas, ks, [ws[i] for i in present], spec.consensus, spec.normalize, ctx.ws)
    deltas, weights, cover = [], [], []
    for i in present:
        d = sparsify_delta(ctx, plan, i, ctx.delta(plan, i, base), ds[i])
        c = None
        if tuple(d.shape) != tuple(plan.base_region):
            d, c = _pad(d, plan.base_region)
        deltas.append(d)
        weights.append(ws[i])
        cover.append(c)
    if spec.combine == "model_stock":
        if len(deltas) < 2:
            return None
        return model_stock_delta(deltas, ctx.opts.filter_wise)
    if spec.consensus is not None and all(c is None for c in cover):
        return ties_combine_(deltas, weights, spec.consensus, spec.normalize, ctx.ws)
    return combine_linear(deltas, weights, spec.consensus, spec.normalize, cover)


def _fused_ties(ctx: Context, plan: TensorPlan) -> bool:
    """Whether the merge is per-tensor top-k trimming then sign election over same-shape deltas (TIES),
    which :func:`ties_trim_combine_` runs fused and cache-resident."""
    opts, spec = ctx.opts, ctx.opts.spec
    return (spec.sparsify == "magnitude" and spec.consensus is not None and spec.rescale == "none"
            and opts.scope == "tensor" and ctx.thresholds is None and not ctx.target(plan) and plan.uniform)


def _slerp_delta(ctx: Context, plan: TensorPlan, base: torch.Tensor, i: int) -> torch.Tensor:
    model = ctx.delta(plan, i, base).add_(base)
    return slerp(base, model, ctx.opts.t).sub_(base)


def _union_fill(ctx: Context, plan: TensorPlan, merged: torch.Tensor) -> torch.Tensor:
    shape = plan.out.shape
    acc = torch.zeros(shape)
    cnt = torch.zeros(shape)
    for i, region in enumerate(plan.regions):
        if region is None:
            continue
        m = ctx.models[i].load(plan.name, torch.float32)
        sl = tuple(slice(0, s) for s in m.shape)
        acc[sl] += m
        cnt[sl] += 1.0
    out = acc.div_(cnt.clamp_min(1.0))
    out[tuple(slice(0, s) for s in merged.shape)] = merged
    return out


def elementwise(ctx: Context, plan: TensorPlan) -> bool:
    """Whether ``plan``'s merge acts on each element alone (a linear combination, with or without sign
    election, of unsparsified deltas whose inputs all have the output's shape), so it can run piece by piece."""
    spec = ctx.opts.spec
    if not plan.merge or spec.combine != "linear" or not plan.uniform or plan.base_region != plan.out.shape:
        return False
    if not all(ctx.is_direct(plan, who) for who in range(-1, len(plan.regions)) if who < 0 or plan.regions[who]):
        return False
    if spec.sparsify is None:
        return True
    dense = all(d >= 1.0 for d in ctx.params[plan.name][1])
    return dense and spec.sparsify != "dppa" and ctx.shifts is None and ctx.thresholds is None


def pieces(ctx: Context, plan: TensorPlan) -> list[TensorPlan]:
    """The units ``plan`` is merged in: cache-sized pieces when its merge is elementwise, else itself."""
    return split_plan(plan, ctx.opts.piece_size) if elementwise(ctx, plan) else [plan]


def merge_tensor(ctx: Context, plan: TensorPlan) -> torch.Tensor:
    """Produce one output tensor (in its output dtype)."""
    if not plan.merge:
        t = ctx.base.load(plan.name)
        return t.to(plan.out.dtype) if t.dtype.is_floating_point else t
    base = ctx.load_base(plan)
    mixed = _combined_delta(ctx, plan, base)
    out = base if mixed is None else base.add_(mixed, alpha=ctx.opts.lam)
    if plan.span is None and tuple(out.shape) != tuple(plan.out.shape):
        out = _union_fill(ctx, plan, out)
    if not is_finite(out):
        raise ctx.diagnose(plan)
    return out.to(plan.out.dtype)
