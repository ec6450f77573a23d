"""Element-wise ops: every tensor operand's axes (right-aligned, broadcasting) share the output's terms."""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import nn

from fxmerge.infer.context import Call, RuleContext
from fxmerge.infer.registry import aten_packets, rule, torch_forms
from fxmerge.infer.rules.common import first_tensor, same_letters

_UNARY = (
    "relu",
    "relu6",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "mish",
    "softplus",
    "softsign",
    "tanhshrink",
    "hardshrink",
    "softshrink",
    "logsigmoid",
    "threshold",
    "rrelu",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "native_dropout",
    "clone",
    "contiguous",
    "detach",
    "neg",
    "negative",
    "abs",
    "exp",
    "exp2",
    "expm1",
    "log",
    "log2",
    "log10",
    "log1p",
    "sqrt",
    "rsqrt",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "reciprocal",
    "square",
    "erf",
    "erfc",
    "erfinv",
    "sign",
    "sgn",
    "floor",
    "ceil",
    "round",
    "trunc",
    "frac",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "nan_to_num",
    "logical_not",
    "bitwise_not",
    "isnan",
    "isinf",
    "isfinite",
    "logit",
    "positive",
    "i0",
    "sinc",
    "deg2rad",
    "rad2deg",
    "fill",
    "zero",
    "float",
    "double",
    "half",
    "bfloat16",
    "int",
    "long",
    "bool",
    "byte",
    "char",
    "short",
    "cpu",
    "cuda",
    "requires_grad",
    "lift_fresh_copy",
    "alias",
    "_to_copy",
    "to_copy",
    "relu_",
    "gelu_",
    "sigmoid_",
    "silu_",


    "square_",

    "lift_fresh",
    "stochastic_depth",
)
_BINARY = (
    "add",
    "sub",
    "subtract",
    "rsub",
    "mul",
    "multiply",
    "div",
    "divide",
    "true_divide",
    "floor_divide",
    "remainder",
    "fmod",
    "pow",
    "float_power",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "where",
    "masked_fill",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "greater",
    "less",
    "greater_equal",
    "less_equal",
    "not_equal",
    "logical_and",
    "logical_or",
    "logical_xor",
    "bitwise_and",
    "bitwise_or",
    "bitwise_xor",
    "bitwise_left_shift",
    "bitwise_right_shift",
    "atan2",
    "arctan2",
    "hypot",
    "lerp",
    "addcmul",
    "addcdiv",
    "copysign",
    "xlogy",
    "heaviside",
    "copy",
    "logaddexp",
    "polar",
    "complex",
    "bernoulli",
    "normal",
    "logaddexp2",
    "nextafter",
    "igamma",
    "igammac",

)
_OPERATORS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.neg,
    operator.pos,
    operator.invert,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.abs,
    operator.lshift,
    operator.rshift,

)
_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardshrink,
    nn.Softshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Identity,
)


@rule(
    *_MODULES,
    *[t for t in _OPERATORS if callable(t)],
    *torch_forms(*_UNARY, *_BINARY),
    *aten_packets("__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "__iand__", "__ior__", "__ixor__"),
    key="elementwise",
)
def elementwise(ctx: RuleContext, call: Call):
    """Broadcasting element-wise op (activations, arithmetic, comparisons, dropout, casts)."""
    out = call.out
    if isinstance(out, tuple):  # native_dropout -> (out, mask)
        dims = ctx.elementwise(call)
        return [dims if getattr(o, "shape", None) == out[0].shape else ctx.fixed(o.shape) for o in out]
    return ctx.elementwise(call)


@rule(*torch_forms("to", "type", "type_as", "view_as_real_copy"), key="cast")
def cast(ctx: RuleContext, call: Call):
    """Dtype/device casts: only the first operand carries data (``type_as(other)`` reads other's dtype)."""
    x = first_tensor(call)
    if x.shape != tuple(call.out.shape):
        ctx.freeze(x, "cast changed the shape")
        return ctx.fixed(call.out.shape)
    return same_letters(ctx, x, call.out.shape)


@rule(nn.PReLU, key="prelu_module")
def prelu_module(ctx: RuleContext, call: Call):
    """PReLU with one slope per channel (axis 1) or one shared slope."""
    x, w = call.arg(0, "input"), call.param("weight")
    if w.value.numel() == 1:
        return ctx.elementwise(call, [x])
    chan = x.dims[1] if x.ndim > 1 else x.dims[0]
    ctx.unify(chan, w.dims[0])
    return ctx.elementwise(call, [x])


@rule(F.prelu, *torch_forms("prelu", "_prelu_kernel"), key="prelu")
def prelu(ctx: RuleContext, call: Call):
    x, w = call.arg(0, "input"), call.arg(1, "weight")
    if w.value.numel() > 1:
        ctx.unify(x.dims[1] if x.ndim > 1 else x.dims[0], w.dims[0])
    return ctx.elementwise(call, [x])
