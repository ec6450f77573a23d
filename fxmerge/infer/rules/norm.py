"""Normalisation layers. Statistics are permutation invariant, so every axis passes through; the affine
parameters and running statistics follow their axis. GroupNorm additionally makes the channel axis a
product of groups with an independent inner term per group."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fxmerge.infer.context import LETTERS, TV, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.ir.terms import product


def _channel_norm(ctx: RuleContext, x: TV, per_channel: list[TV | None], out_shape):
    """x's axis 1 (axis 0 when unbatched 1-D) carries the per-channel vectors; other axes pass through.
    Statistics are taken over every axis but the channel axis."""
    letters = LETTERS[: x.ndim]
    ch = 1 if x.ndim > 1 else 0
    c = letters[ch]
    vecs = [p for p in per_channel if p is not None]
    for p in vecs:
        if p.ndim != 1 or p.shape[0] != x.shape[ch]:
            ctx.freeze(p, "normalisation argument that is not a per-channel vector")
            ctx.freeze_axis(x, ch, "normalisation with a non per-channel argument")
    ctx.mix(x, [i for i in range(x.ndim) if i != ch])
    ops = [(x, letters)] + [(p, c) for p in vecs if p.ndim == 1 and p.shape[0] == x.shape[ch]]
    return ctx.link(ops, letters, out_shape)


_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d)  # fmt: skip


@rule(*_BN_MODULES, key="batch_norm")
def batch_norm_module(ctx: RuleContext, call: Call):
    names = ("weight", "bias", "running_mean", "running_var")
    return _channel_norm(ctx, call.arg(0, "input"), [call.param(n) for n in names], call.out.shape)


def _per_channel(call: Call, x: TV) -> list[TV]:
    """Every tensor argument of a channel norm besides the input, however it is passed (positionally or by
    keyword, in ``F.batch_norm``'s order or ATen's): all of them are per-channel vectors."""
    return [t for t in call.tensors() if t is not x]


@rule(*torch_forms("batch_norm", "instance_norm"), key="batch_norm")
def batch_norm(ctx: RuleContext, call: Call):
    """``F.batch_norm(input, running_mean, running_var, weight, bias, ...)``, ``torch.batch_norm(input, weight,
    bias, running_mean, running_var, ...)``, instance norm: every vector argument follows the channel axis."""
    x = call.arg(0, "input")
    return _channel_norm(ctx, x, _per_channel(call, x), call.out.shape)


@rule(
    *torch_forms("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
                 "_native_batch_norm_legit_functional", "cudnn_batch_norm"),
    key="batch_norm",
)  # fmt: skip
def native_batch_norm(ctx: RuleContext, call: Call):
    """Tuple-returning ATen batch norms: (out, saved statistics...)."""
    x = call.arg(0, "input")
    vecs = _per_channel(call, x)
    out_dims = _channel_norm(ctx, x, vecs, call.out[0].shape)
    c = x.dims[1] if x.ndim > 1 else x.dims[0]
    rest = []
    for o in call.out[1:]:
        rest.append((c,) if o.ndim == 1 and o.shape[0] == c.size else ctx.fixed(o.shape))
    return [out_dims, *rest]


def _layer_norm(ctx: RuleContext, x: TV, n_norm: int, affine: list[TV], out_shape):
    """Statistics over the last ``n_norm`` axes; every affine tensor follows the trailing axes."""
    ctx.mix(x, list(range(x.ndim - n_norm, x.ndim)))
    letters = LETTERS[: x.ndim]
    tail = letters[x.ndim - n_norm :]
    ops = [(x, letters)]
    for p in affine:
        if p.ndim > n_norm or tuple(p.shape) != tuple(x.shape[x.ndim - p.ndim :]):
            ctx.freeze(p, "normalisation argument that does not match the normalised axes")
            ctx.freeze(x, "normalisation with an argument that does not match the normalised axes")
        else:
            ops.append((p, tail[len(tail) - p.ndim :]))
    return ctx.link(ops, letters, out_shape)


@rule(nn.LayerNorm, nn.RMSNorm, key="layer_norm")
def layer_norm_module(ctx: RuleContext, call: Call):
    shape = call.module.normalized_shape
    n = 1 if isinstance(shape, int) else len(shape)
    affine = [p for p in (call.param("weight"), call.param("bias")) if p is not None]
    return _layer_norm(ctx, call.arg(0, "input"), n, affine, call.out.shape)


@rule(F.layer_norm, F.rms_norm, *torch_forms("layer_norm", "rms_norm"), key="layer_norm")
def layer_norm(ctx: RuleContext, call: Call):
    shape = call.arg(1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    x = call.arg(0, "input")
    return _layer_norm(ctx, x, n, _per_channel(call, x), call.out.shape)  # rms_norm's 4th argument is eps


@rule(*torch_forms("native_layer_norm", "_fused_rms_norm"), key="layer_norm")
def native_layer_norm(ctx: RuleContext, call: Call):
    x = call.arg(0, "input")
    n = len(call.arg(1, "normalized_shape"))
    out_dims = _layer_norm(ctx, x, n, _per_channel(call, x), call.out[0].shape)
    stats = [same_prefix(ctx, out_dims, o.shape) for o in call.out[1:]]
    return [out_dims, *stats]


def same_prefix(ctx: RuleContext, dims, shape):
    """Saved statistics keep the leading (non-normalised) axes and size-1 trailing ones."""
    out = list(ctx.fixed(shape))
    for i, n in enumerate(shape):
        if i < len(dims) and dims[i].size == n and n != 1:
            out[i] = dims[i]
    return ctx.normalize(tuple(out))


def _group_norm(ctx: RuleContext, x: TV, groups: int, w: TV | None, b: TV | None, out_shape):
    ctx.mix(x, list(range(1, x.ndim)))
    channel = ctx.plain(x.dims[1])
    g_term, inners = ctx.solver.as_product(channel, groups, ctx.why)
    ctx.unify(channel, product(g_term, inners))
    return _channel_norm(ctx, x, [w, b], out_shape)


@rule(nn.GroupNorm, key="group_norm")
def group_norm_module(ctx: RuleContext, call: Call):
    m = call.module
    return _group_norm(ctx, call.arg(0, "input"), m.num_groups, call.param("weight"), call.param("bias"),
                       call.out.shape)  # fmt: skip


@rule(F.group_norm, *torch_forms("group_norm"), key="group_norm")
def group_norm(ctx: RuleContext, call: Call):
    return _group_norm(ctx, call.arg(0, "input"), int(call.arg(1, "num_groups")), call.arg(2, "weight", None),
                       call.arg(3, "bias", None), call.out.shape)  # fmt: skip


@rule(*torch_forms("native_group_norm"), key="group_norm")
def native_group_norm(ctx: RuleContext, call: Call):
    """aten.native_group_norm(input, weight, bias, N, C, HxW, group, eps) -> (out, mean[N,G], rstd[N,G])."""
    x, w, b = call.arg(0), call.arg(1, None, None), call.arg(2, None, None)
    groups = int(call.arg(6, "group"))
    ctx.mix(x, list(range(1, x.ndim)))
    channel = ctx.plain(x.dims[1])
    g_term, _ = ctx.solver.as_product(channel, groups, ctx.why)
    out_dims = _channel_norm(ctx, x, [w, b], call.out[0].shape)
    stats = [(x.dims[0], g_term) if o.ndim == 2 else ctx.fixed(o.shape) for o in call.out[1:]]
    return [out_dims, *[ctx.normalize(tuple(s)) for s in stats]]


@rule(nn.LocalResponseNorm, F.local_response_norm, key="local_response_norm")
def local_response_norm(ctx: RuleContext, call: Call):
    """LRN mixes neighbouring channels: the channel axis is frozen."""
    x = call.arg(0, "input")
    ctx.freeze_axis(x, 1, "local response norm mixes neighbouring channels")
    return ctx.elementwise(call, [x])


@rule(F.normalize, key="normalize")
def normalize(ctx: RuleContext, call: Call):
    """x / ||x||_p along ``dim``: equivariant under permutations that keep each normalised slice together."""
    x = call.arg(0, "input")
    ctx.mix(x, [int(call.arg(2, "dim", 1))])
    return ctx.elementwise(call, [x])


@rule(*torch_forms("_weight_norm", "_weight_norm_interface"), key="weight_norm")
def weight_norm(ctx: RuleContext, call: Call):
    """``w = g * v / ||v||``, the norm over every axis of ``v`` but ``dim`` (over all of ``v`` when ``dim`` is -1):
    ``v``'s axes pass through to ``w`` and ``g`` follows the kept axis."""
    v, g = call.arg(0, "v"), call.arg(1, "g")
    dim = int(call.arg(2, "dim", 0))
    kept = [] if dim == -1 else [dim % v.ndim]
    ctx.mix(v, [i for i in range(v.ndim) if i not in kept])
    dims = ctx.elementwise(call, [v, g])
    if isinstance(call.out, tuple):  # _weight_norm_interface -> (w, norms shaped like g)
        return [dims, ctx.elementwise(call, [g]) if call.out[1].shape == g.shape else ctx.fixed(call.out[1].shape)]
    return dims
