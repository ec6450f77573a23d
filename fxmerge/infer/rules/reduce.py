"""Reductions, softmax-like ops (equivariant), and order-dependent ops (which freeze the axis they touch)."""

from __future__ import annotations

import torch
from torch import nn

from fxmerge.infer.context import LETTERS, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.infer.rules.common import dims_arg, first_tensor, output_used, same_letters

_REDUCTIONS = (
    "sum", "mean", "nansum", "nanmean", "amax", "amin", "prod", "all", "any", "var", "std", "logsumexp",
    "count_nonzero", "norm", "vector_norm", "linalg_vector_norm", "frobenius_norm", "quantile", "nanquantile",
    "median", "nanmedian", "mode", "max", "min", "aminmax", "var_mean", "std_mean",
)  # fmt: skip


def _reduce_dims(call: Call, ndim: int) -> list[int]:
    dim = call.kwargs.get("dim", call.kwargs.get("axis"))
    if dim is None:
        for v in call.args[1:]:
            if isinstance(v, (int, list, tuple)) and not isinstance(v, bool):
                dim = v
                break
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        dim = None
    return dims_arg(dim, ndim)


@rule(*torch_forms(*_REDUCTIONS), key="reduce")
def reduce(ctx: RuleContext, call: Call):
    """Reduced axes drop out (or become size 1); the rest pass through. Index outputs freeze the axis."""
    x = first_tensor(call)
    if len(call.tensors()) > 1 and isinstance(call.out, torch.Tensor):  # torch.max(a, b) is element-wise
        return ctx.elementwise(call)
    red = _reduce_dims(call, x.ndim)
    ctx.mix(x, red)
    outs = call.out if isinstance(call.out, tuple) else (call.out,)
    letters = LETTERS[: x.ndim]
    kept = "".join(c for i, c in enumerate(letters) if i not in red)
    result = []
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            result.append(None)
            continue
        out_letters = letters if o.ndim == x.ndim else kept if o.ndim == len(kept) else None
        if out_letters is None:
            ctx.freeze(x, f"{call.key} with an unexpected result shape")
            result.append(ctx.fixed(o.shape))
            continue
        is_index = not o.is_floating_point() and x.value.is_floating_point() and o.dtype == torch.int64
        if is_index and isinstance(call.out, tuple) and not output_used(call, i):
            result.append(ctx.fixed(o.shape))  # indices nobody reads (``x.max(dim).values``)
            continue
        if is_index:
            for d in red:  # argmax-style indices refer to positions along the reduced axes
                ctx.freeze_axis(x, d, f"{call.key} returns indices along the axis")
        result.append(ctx.link([(x, letters)], out_letters, o.shape))
    return result if isinstance(call.out, tuple) else result[0]


_DIM_POS = {"argmax": (1, None), "argmin": (1, None), "sort": (1, -1), "argsort": (1, -1), "topk": (2, -1),
            "kthvalue": (2, -1), "msort": (None, 0)}  # fmt: skip


@rule(*torch_forms(*_DIM_POS), key="order_index")
def order_index(ctx: RuleContext, call: Call):
    """Results that encode positions or sorted order along an axis: that axis is frozen."""
    x = first_tensor(call)
    name = getattr(call.node.target, "__name__", str(call.node.target)).split(".")[0].rstrip("_")
    pos, default = _DIM_POS.get(name, (1, -1))
    dim = call.kwargs.get("dim", call.args[pos] if pos is not None and len(call.args) > pos else default)
    red = dims_arg(dim, x.ndim)
    ctx.mix(x, red)
    for d in red:
        ctx.freeze_axis(x, d, f"{name}: order-dependent along the axis")
    outs = call.out if isinstance(call.out, tuple) else (call.out,)
    letters = LETTERS[: x.ndim]
    kept = "".join(c for i, c in enumerate(letters) if i not in red)
    result = []
    for o in outs:
        if not isinstance(o, torch.Tensor):
            result.append(None)
        elif o.ndim == x.ndim and all(o.shape[i] == x.shape[i] for i in range(x.ndim) if i not in red):
            result.append(same_letters(ctx, x, o.shape, skip=red))
        elif o.ndim == len(kept):
            result.append(ctx.link([(x, letters)], kept, o.shape))
        else:
            result.append(ctx.fixed(o.shape))
    return result if isinstance(call.out, tuple) else result[0]


_ORDER_DEP = (
    "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "roll", "flip", "fliplr", "flipud", "rot90", "diff",
    "tril", "triu", "diagonal", "diag", "diag_embed", "trace", "searchsorted", "bucketize", "histc", "bincount",
    "unique", "unique_consecutive", "cross", "fft_fft", "fft_rfft", "fft_ifft", "fft_irfft", "stft", "renorm",
)  # fmt: skip


@rule(*torch_forms(*_ORDER_DEP), key="order_dependent")
def order_dependent(ctx: RuleContext, call: Call):
    """Ops that depend on positions along an axis. The touched axes freeze; untouched axes pass through."""
    x = first_tensor(call)
    touched = _touched_axes(call, x.ndim)
    ctx.mix(x, touched)
    for d in touched:
        ctx.freeze_axis(x, d, f"{call.key} depends on the order along the axis")
    out = call.out
    outs = out if isinstance(out, tuple) else (out,)
    result = []
    for o in outs:
        if isinstance(o, torch.Tensor) and o.shape == x.value.shape:
            result.append(same_letters(ctx, x, o.shape, skip=touched))
        elif isinstance(o, torch.Tensor):
            ctx.freeze(x, f"{call.key} changes the shape")
            result.append(ctx.fixed(o.shape))
        else:
            result.append(None)
    return result if isinstance(out, tuple) else result[0]


def _touched_axes(call: Call, ndim: int) -> list[int]:
    name = getattr(call.node.target, "__name__", str(call.node.target))
    if any(k in name for k in ("tril", "triu", "diagonal", "diag", "trace", "rot90")):
        return list(range(max(ndim - 2, 0), ndim)) if ndim >= 2 else list(range(ndim))
    dims = call.kwargs.get("dims", call.kwargs.get("dim"))
    if dims is None:
        ints = [v for v in call.args[1:] if isinstance(v, (int, list, tuple)) and not isinstance(v, bool)]
        dims = ints[-1] if "roll" in name and len(ints) > 1 else (ints[0] if ints and "roll" not in name else None)
        if "roll" in name and len(ints) == 1:
            return list(range(ndim))
    if dims is None:
        return list(range(ndim))
    return dims_arg(dims, ndim)


def softmax_dim(dim: int | None, ndim: int) -> int:
    """The axis softmax normalises over; ``dim=None`` is torch's legacy implicit choice."""
    if dim is None:
        return 0 if ndim in (0, 1, 3) else 1
    return int(dim) % max(ndim, 1)


@rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, key="softmax")
def softmax_module(ctx: RuleContext, call: Call):
    x = call.arg(0, "input")
    ctx.mix(x, [softmax_dim(call.module.dim, x.ndim)])
    return ctx.elementwise(call, [x])


@rule(*torch_forms("softmax", "log_softmax", "softmin", "_softmax", "_log_softmax", "_safe_softmax"), key="softmax")
def softmax(ctx: RuleContext, call: Call):
    """Softmax along an axis is equivariant under permutations that keep each normalised slice together."""
    x = first_tensor(call)
    dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
    ctx.mix(x, [softmax_dim(dim if isinstance(dim, int) else None, x.ndim)])
    return ctx.elementwise(call, [x])
