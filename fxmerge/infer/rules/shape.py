"""Shape ops: reshape family (by shapes alone), axis reordering, expand and repeat."""

from __future__ import annotations

import torch
from torch import nn

from fxmerge.infer.context import Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.infer.rules.common import first_tensor, norm_dim, shape_args
from fxmerge.ir.terms import Bcast, Fixed, product

_RESHAPES = (
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
    "ravel", "squeeze_copy", "unsqueeze_copy", "view_copy", "atleast_1d", "atleast_2d", "atleast_3d",
    "_reshape_alias", "unsafe_view",
)  # fmt: skip


@rule(nn.Flatten, nn.Unflatten, *torch_forms(*_RESHAPES), key="reshape")
def reshape(ctx: RuleContext, call: Call):
    """Any op whose result is the input's elements in the same order with another shape."""
    x = first_tensor(call)
    out = call.out
    if not isinstance(out, torch.Tensor):
        return None
    return ctx.reshape(x, x.shape, tuple(out.shape))


def _reorder(ctx: RuleContext, call: Call, order: list[int]):
    x = first_tensor(call)
    return ctx.normalize(tuple(x.dims[i] for i in order))


@rule(*torch_forms("permute", "permute_copy"), key="permute")
def permute(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    order = shape_args(call.args[1:]) if len(call.args) > 1 else list(call.kwargs["dims"])
    return _reorder(ctx, call, [norm_dim(d, x.ndim) for d in order])


@rule(*torch_forms("transpose", "swapaxes", "swapdims", "transpose_copy"), key="transpose")
def transpose(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    a, b = (norm_dim(int(call.arg(i, n)), x.ndim) for i, n in ((1, "dim0"), (2, "dim1")))
    order = list(range(x.ndim))
    order[a], order[b] = order[b], order[a]
    return _reorder(ctx, call, order)


@rule(*torch_forms("t", "numpy_T", "t_copy"), key="transpose")
def t(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    return _reorder(ctx, call, list(range(x.ndim))[::-1])


@rule(*torch_forms("movedim", "moveaxis"), key="movedim")
def movedim(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    src, dst = call.arg(1, "source"), call.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [norm_dim(s, x.ndim) for s in src]
    dst = [norm_dim(d, x.ndim) for d in dst]
    order: list[int | None] = [None] * x.ndim
    for s, d in zip(src, dst, strict=True):
        order[d] = s
    rest = iter(i for i in range(x.ndim) if i not in src)
    return _reorder(ctx, call, [o if o is not None else next(rest) for o in order])


@rule(*torch_forms("expand", "expand_as", "broadcast_to", "expand_copy"), key="expand")
def expand(ctx: RuleContext, call: Call):
    """Expanded size-1 axes are constant copies: :class:`Bcast`."""
    x = first_tensor(call)
    shape = tuple(call.out.shape)
    lead = len(shape) - x.ndim
    dims = []
    for i, n in enumerate(shape):
        j = i - lead
        if j < 0 or (x.shape[j] == 1 and n != 1):
            dims.append(Bcast(n) if n != 1 else x.dims[j] if j >= 0 else Bcast(1))
        else:
            dims.append(x.dims[j])
    return ctx.normalize(tuple(dims))


@rule(*torch_forms("repeat", "tile"), key="repeat")
def repeat(ctx: RuleContext, call: Call):
    """Tiling: new leading axes are constant copies; a tiled axis is ``Fixed(r) x term`` shared."""
    x = first_tensor(call)
    shape = tuple(call.out.shape)
    lead = len(shape) - x.ndim
    dims = []
    for i, n in enumerate(shape):
        j = i - lead
        if j < 0:
            dims.append(Bcast(n))
            continue
        r = n // x.shape[j]
        if r == 1:
            dims.append(x.dims[j])
        elif x.shape[j] == 1:
            dims.append(Bcast(n))
        else:
            term = ctx.plain(x.dims[j])
            dims.append(product(Fixed(r), [term] * r))
    return ctx.normalize(tuple(dims))


@rule(*torch_forms("repeat_interleave"), key="repeat_interleave")
def repeat_interleave(ctx: RuleContext, call: Call):
    """Each element repeated r times in place: ``term x Bcast(r)``; tensor repeats freeze the axis."""
    x = first_tensor(call)
    reps, dim = call.arg(1, "repeats"), call.arg(2, "dim", None)
    if dim is None or not isinstance(reps, int):
        ctx.freeze(x, "repeat_interleave without an int repeat count and dim")
        return ctx.fixed(call.out.shape)
    d = norm_dim(int(dim), x.ndim)
    dims = list(x.dims)
    dims[d] = product(ctx.plain(x.dims[d]), [Bcast(reps)] * x.shape[d])
    return ctx.normalize(tuple(dims))
