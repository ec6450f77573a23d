"""Spatial ops: pooling, resampling, pixel shuffle, unfold. Channels pass through; positions are fixed,
except global pooling, which is invariant to any permutation of the pooled positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.infer.context import LETTERS, TV, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.infer.rules.common import first_tensor
from fxmerge.ir.terms import Fixed, product

_POOLS = (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
    "fractional_max_pool2d", "interpolate", "upsample", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d",
    "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "upsample_bilinear", "upsample_nearest",
    "_upsample_nearest_exact1d", "_upsample_nearest_exact3d", "grid_sample",
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip


def _spatial_count(call: Call, x: TV) -> int:
    name = type(call.module).__name__ if call.module is not None else str(getattr(call.node.target, "__name__", ""))
    for k in (3, 2, 1):
        if f"{k}d" in name.lower():
            return k
    return max(x.ndim - 2, 1)


@rule(*_POOL_MODULES, *torch_forms(*_POOLS), key="pool")
def pool(ctx: RuleContext, call: Call):
    """Leading (batch, channel) axes pass through; pooled axes are fixed unless pooled to a single position."""
    x = first_tensor(call)
    outs = call.out if isinstance(call.out, tuple) else (call.out,)
    k = _spatial_count(call, x)
    lead = x.ndim - k
    o0 = outs[0]
    name = type(call.module).__name__ if call.module is not None else str(call.node.target)
    adaptive = "adaptive" in name.lower()
    global_pool = adaptive and all(o0.shape[i] == 1 for i in range(lead, o0.ndim))
    if not global_pool:
        for i in range(lead, x.ndim):
            ctx.freeze_axis(x, i, "pooling/resampling mixes neighbouring positions")
    letters = LETTERS[: x.ndim]
    result = []
    for o in outs:
        dims = list(ctx.link([(x.dims[:lead], letters[:lead])], letters[:lead], o.shape[:lead]))
        dims.extend(ctx.fixed(o.shape[lead:]))
        result.append(tuple(dims))
    return result if isinstance(call.out, tuple) else result[0]


@rule(nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle,
      *torch_forms("pixel_shuffle", "pixel_unshuffle"), key="pixel_shuffle")  # fmt: skip
def pixel_shuffle(ctx: RuleContext, call: Call):
    """Channels ``C*r*r`` <-> ``C`` x fixed sub-pixel positions."""
    x = first_tensor(call)
    out: torch.Tensor = call.out
    c_in, c_out = x.shape[-3], out.shape[-3]
    for i in (x.ndim - 2, x.ndim - 1):
        ctx.freeze_axis(x, i, "pixel shuffle moves channels into positions")
    chan = ctx.plain(x.dims[-3])
    if c_in > c_out:
        outer, _ = ctx.solver.as_product(chan, c_out, ctx.why)
        ctx.unify(chan, product(outer, [Fixed(c_in // c_out)] * c_out))
        new = outer
    else:
        new = product(chan, [Fixed(c_out // c_in)] * c_in)
    lead = ctx.link([(x.dims[:-3], LETTERS[: x.ndim - 3])], LETTERS[: x.ndim - 3], out.shape[:-3])
    return ctx.normalize((*lead, new, *ctx.fixed(out.shape[-2:])))


@rule(nn.ChannelShuffle, *torch_forms("channel_shuffle", "native_channel_shuffle"), key="channel_shuffle")
def channel_shuffle(ctx: RuleContext, call: Call):
    """Channels (g, C/g) are transposed to (C/g, g): one inner term shared by all groups."""
    x = first_tensor(call)
    groups = call.module.groups if call.module is not None else int(call.arg(1, "groups"))
    chan = ctx.plain(x.dims[1])
    g_term, inners = ctx.solver.as_product(chan, groups, ctx.why)
    for t in inners[1:]:
        ctx.solver.unify(inners[0], t, ctx.why)
    dims = list(x.dims)
    dims[1] = product(inners[0], [g_term] * inners[0].size)
    return ctx.normalize(tuple(dims))


@rule(nn.Unfold, F.unfold, *torch_forms("im2col"), key="unfold")
def unfold(ctx: RuleContext, call: Call):
    """im2col: ``[N, C, H, W] -> [N, C*kh*kw, L]`` with each channel carrying fixed kernel taps."""
    x = first_tensor(call)
    out: torch.Tensor = call.out
    for i in range(x.ndim - 2, x.ndim):
        ctx.freeze_axis(x, i, "unfold mixes neighbouring positions")
    chan = ctx.plain(x.dims[-3])
    taps = out.shape[-2] // chan.size
    n_lead = x.ndim - 3  # [N,] C, H, W -> [N,] C*taps, L
    lead = ctx.link([(x.dims[:n_lead], LETTERS[:n_lead])], LETTERS[:n_lead], out.shape[:n_lead])
    return ctx.normalize((*lead, product(chan, [Fixed(taps)] * chan.size), *ctx.fixed(out.shape[-1:])))
