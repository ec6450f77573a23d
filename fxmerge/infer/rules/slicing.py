"""Concatenation, splitting, selection, slicing, indexing and padding."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.infer.context import LETTERS, TV, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.infer.rules.common import first_tensor, norm_dim
from fxmerge.ir.dims import AxisTerm, Dims, Lvl, make_joint
from fxmerge.ir.terms import TRIVIAL, Fixed, concat


def _tensor_list(call: Call) -> list[TV]:
    xs = call.arg(0, "tensors")
    return [t for t in xs if isinstance(t, TV) and not (t.ndim == 1 and t.shape[0] == 0)]


@rule(*torch_forms("cat", "concat", "concatenate"), key="cat")
def cat(ctx: RuleContext, call: Call):
    """Other axes link across inputs; the cat axis becomes the direct sum of the inputs' axes."""
    xs = _tensor_list(call)
    out = call.out
    d = norm_dim(int(call.arg(1, "dim", 0)), out.ndim)
    letters = LETTERS[: out.ndim]
    ops = [(x, letters[:d] + chr(0x200 + i) + letters[d + 1 :]) for i, x in enumerate(xs)]
    parts = [ctx.plain(x.dims[d]) for x in xs]
    dims = list(ctx.link(ops, letters[:d] + "\u01ff" + letters[d + 1 :], out.shape))
    dims[d] = concat(parts) if out.shape[d] != 1 else TRIVIAL
    return ctx.normalize(tuple(dims))


@rule(*torch_forms("stack"), key="stack")
def stack(ctx: RuleContext, call: Call):
    xs = _tensor_list(call)
    out = call.out
    d = norm_dim(int(call.arg(1, "dim", 0)), out.ndim)
    letters = LETTERS[: out.ndim - 1]
    dims = list(ctx.link([(x, letters) for x in xs], letters, tuple(s for i, s in enumerate(out.shape) if i != d)))
    dims.insert(d, Fixed(out.shape[d]) if out.shape[d] != 1 else TRIVIAL)
    return ctx.normalize(tuple(dims))


@rule(
    *torch_forms("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk",
                 "split_copy", "split_with_sizes_copy"),
    key="split",
)  # fmt: skip
def split(ctx: RuleContext, call: Call):
    """The split axis becomes a direct sum of the pieces' axes."""
    x = first_tensor(call)
    outs = list(call.out)
    d = _split_dim(call, x)
    sizes = [int(o.shape[d]) for o in outs]
    dims = list(x.dims)
    if isinstance(dims[d], Lvl):
        dims = list(ctx.alg.flatten(tuple(dims), dims[d].joint, ctx.why))
    parts = ctx.solver.as_concat(ctx.plain(dims[d]), sizes, ctx.why)
    result = []
    for part, n in zip(parts, sizes, strict=True):
        od = list(dims)
        od[d] = part if n != 1 else TRIVIAL
        result.append(ctx.normalize(tuple(od)))
    return result


@rule(nn.GLU, *torch_forms("glu"), key="glu")
def glu(ctx: RuleContext, call: Call):
    """``glu(x, dim) = a * sigmoid(b)`` for the halves ``a, b`` of ``dim``: both halves share one permutation."""
    x = first_tensor(call)
    dim = call.module.dim if call.module is not None else call.arg(1, "dim", -1)
    d = norm_dim(int(dim), x.ndim)
    half = int(call.out.shape[d])
    dims = list(x.dims)
    if isinstance(dims[d], Lvl):
        dims = list(ctx.alg.flatten(tuple(dims), dims[d].joint, ctx.why))
    first, second = ctx.solver.as_concat(ctx.plain(dims[d]), [half, half], ctx.why)
    ctx.unify(first, second)
    dims[d] = first if half != 1 else TRIVIAL
    return ctx.normalize(tuple(dims))


def _split_dim(call: Call, x: TV) -> int:
    dim = call.kwargs.get("dim")
    if dim is None:
        dim = call.args[2] if len(call.args) > 2 and isinstance(call.args[2], int) else 0
    return norm_dim(int(dim), x.ndim)


def select_axis(ctx: RuleContext, dims: Dims, d: int, index: int) -> Dims:
    """Dims after picking ``index`` along axis ``d`` (the axis disappears)."""
    a = dims[d]
    n = a.size
    index = index % n if n else 0
    if isinstance(a, Lvl) and a.k == 0:
        j = a.joint
        outer, inners = ctx.solver.as_product(j.root, j.sizes[0], ctx.why)
        ctx.solver.as_concat(outer, [index, 1, n - index - 1], ctx.why)
        rest = j.sizes[1:]
        sub: list[AxisTerm] = make_joint(inners[index], rest) if len(rest) > 1 else [inners[index]]
        new = [sub[x.k - 1] if isinstance(x, Lvl) and x.joint is j else x for x in dims]
        return tuple(v for i, v in enumerate(new) if i != d)
    if isinstance(a, Lvl):
        dims = ctx.alg.flatten(tuple(dims), a.joint, ctx.why)
        a = dims[d]
    ctx.solver.as_concat(a, [index, 1, n - index - 1], ctx.why)
    return ctx.normalize(tuple(v for i, v in enumerate(dims) if i != d))


@rule(*torch_forms("unbind", "unbind_copy"), key="unbind")
def unbind(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    d = norm_dim(int(call.arg(1, "dim", 0)), x.ndim)
    return [select_axis(ctx, x.dims, d, i) for i in range(x.shape[d])]


@rule(*torch_forms("select", "select_copy"), key="select")
def select(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    d = norm_dim(int(call.arg(1, "dim")), x.ndim)
    return select_axis(ctx, x.dims, d, int(call.arg(2, "index")))


def slice_axis(ctx: RuleContext, dims: Dims, d: int, start, stop, step) -> Dims:
    """Dims after ``x[..., start:stop:step, ...]`` on axis ``d``."""
    n = dims[d].size
    start, stop, step = slice(start, stop, step).indices(n)
    length = len(range(start, stop, step))
    if start == 0 and length == n and step == 1:
        return tuple(dims)
    a = dims[d]
    if isinstance(a, Lvl):
        dims = ctx.alg.flatten(tuple(dims), a.joint, ctx.why)
        a = dims[d]
    new = list(dims)
    if step == 1 and length > 0:
        parts = ctx.solver.as_concat(a, [start, length, n - start - length], ctx.why)
        new[d] = parts[1] if length != 1 else TRIVIAL
    else:
        ctx.freeze_term(a, f"strided slice (step {step})")
        new[d] = Fixed(length) if length != 1 else TRIVIAL
    return ctx.normalize(tuple(new))


@rule(*torch_forms("slice", "narrow", "slice_copy", "narrow_copy"), key="slice")
def slice_(ctx: RuleContext, call: Call):
    x = first_tensor(call)
    d = norm_dim(int(call.arg(1, "dim", 0)), x.ndim)
    if call.node.target in _NARROW:
        start = int(call.arg(2, "start"))
        start = start % x.shape[d] if start < 0 else start
        return slice_axis(ctx, x.dims, d, start, start + int(call.arg(3, "length")), 1)
    return slice_axis(ctx, x.dims, d, call.arg(2, "start", None), call.arg(3, "end", None), call.arg(4, "step", 1))


_NARROW = {torch.narrow, getattr(torch.ops.aten, "narrow", None), getattr(torch.ops.aten, "narrow_copy", None)}
_NARROW |= {getattr(p, "default", None) for p in list(_NARROW) if p is not None and hasattr(p, "default")}


@rule(operator.getitem, key="getitem")
def getitem(ctx: RuleContext, call: Call):
    """Tuple element access, or basic/advanced tensor indexing."""
    obj, idx = call.args[0], call.args[1]
    if not isinstance(obj, TV):
        item = obj[idx] if isinstance(obj, (list, tuple)) else None
        if isinstance(item, TV):
            return item.dims
        if isinstance(item, (list, tuple)):
            return [v.dims if isinstance(v, TV) else None for v in item]
        return None
    return index_dims(ctx, obj, idx, call.out)


def _one_tensor_index(ctx: RuleContext, x: TV, k: int, idx, out: torch.Tensor) -> Dims | None:
    """``x[:, ..., idx, ...]`` with one integer index tensor at axis ``k`` and every other axis whole: axis ``k``
    is frozen (which rows are read depends on data), the index's axes are fixed, the other axes pass through.
    ``None`` when the call is not of that form."""
    value = idx.value if isinstance(idx, TV) else idx
    if not isinstance(value, torch.Tensor) or value.dtype in (torch.bool, torch.uint8) or value.is_floating_point():
        return None
    if tuple(out.shape) != (*x.shape[:k], *value.shape, *x.shape[k + 1 :]):
        return None
    ctx.freeze_axis(x, k, "indexed by a tensor (data-dependent rows)")
    if isinstance(idx, TV):
        ctx.freeze(idx, "index tensor")
    return ctx.normalize((*x.dims[:k], *ctx.fixed(value.shape), *x.dims[k + 1 :]))


def _whole(i) -> bool:
    return isinstance(i, slice) and i == slice(None)


def index_dims(ctx: RuleContext, x: TV, idx, out: torch.Tensor) -> Dims:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    tensors = [p for p, i in enumerate(items) if isinstance(i, (TV, torch.Tensor))]
    if len(tensors) == 1 and all(_whole(i) or i is Ellipsis for p, i in enumerate(items) if p != tensors[0]):
        p = tensors[0]
        k = p if Ellipsis not in items[:p] else x.ndim - (len(items) - p)
        dims = _one_tensor_index(ctx, x, k, items[p], out)
        if dims is not None:
            return dims
    if any(isinstance(i, (TV, torch.Tensor, list, bool)) for i in items):
        ctx.freeze(x, "advanced (tensor) indexing")
        for i in items:
            if isinstance(i, TV):
                ctx.freeze(i, "advanced (tensor) indexing")
        return ctx.fixed(out.shape)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (x.ndim - sum(1 for i in expanded if i is not None)))
    dims = tuple(x.dims)
    axis = 0
    selects: list[tuple[int, int]] = []
    for i in expanded:
        if i is None:
            continue
        if isinstance(i, slice):
            dims = slice_axis(ctx, dims, axis, i.start, i.stop, i.step)
        else:
            selects.append((axis, int(i)))
        axis += 1
    for a, i in sorted(selects, reverse=True):
        dims = select_axis(ctx, dims, a, i)
    result = list(dims)
    pos = 0
    for i in expanded:
        if i is None:
            result.insert(pos, TRIVIAL)
            pos += 1
        elif isinstance(i, slice):
            pos += 1
    return ctx.normalize(tuple(result))


@rule(*torch_forms("index", "_unsafe_index", "masked_select", "nonzero", "take", "put"), key="index")
def index(ctx: RuleContext, call: Call):
    """Data-dependent indexing: the indexed axes are frozen (every axis, unless one axis is indexed by one
    integer tensor: ``aten.index(x, [None, idx])``)."""
    x, indices = call.args[0], call.args[1] if len(call.args) > 1 else None
    if isinstance(x, TV) and isinstance(indices, (list, tuple)) and isinstance(call.out, torch.Tensor):
        given = [p for p, i in enumerate(indices) if i is not None]
        if len(given) == 1:
            dims = _one_tensor_index(ctx, x, given[0], indices[given[0]], call.out)
            if dims is not None:
                return dims
    for tv in call.tensors():
        ctx.freeze(tv, f"data-dependent indexing ({call.key})")
    return ctx.fixed(call.out.shape)


@rule(*torch_forms("index_select", "gather", "take_along_dim"), key="gather")
def gather(ctx: RuleContext, call: Call):
    """Order-dependent along ``dim``: that axis is frozen, the others link position-wise."""
    x = first_tensor(call)
    d = norm_dim(int(call.arg(1, "dim")), x.ndim)
    ctx.freeze_axis(x, d, f"{call.key} along a permutable axis")
    idx = call.arg(2, "index")
    out = call.out
    letters = LETTERS[: out.ndim]
    ops = [(x, letters[:d] + "\u01fe" + letters[d + 1 :])] if x.ndim == out.ndim else []
    if isinstance(idx, TV) and idx.ndim == out.ndim:
        ctx.freeze_axis(idx, d, f"{call.key} index")
        ops.append((idx, letters[:d] + "\u01fd" + letters[d + 1 :]))
    ok = all(x.shape[i] == out.shape[i] for i in range(out.ndim) if i != d) if x.ndim == out.ndim else False
    if not ok:
        for tv in call.tensors():
            ctx.freeze(tv, f"{call.key} with mismatched shapes")
        return ctx.fixed(out.shape)
    dims = list(ctx.link(ops, letters[:d] + "\u01fc" + letters[d + 1 :], out.shape))
    dims[d] = Fixed(out.shape[d]) if out.shape[d] != 1 else TRIVIAL
    return ctx.normalize(tuple(dims))


@rule(
    *torch_forms("scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy", "index_fill",
                 "index_put", "index_reduce", "masked_scatter", "diagonal_scatter", "select_scatter",
                 "slice_scatter"),
    key="scatter",
)  # fmt: skip
def scatter(ctx: RuleContext, call: Call):
    """Writes at data-dependent positions: every tensor involved is frozen."""
    for tv in call.tensors():
        ctx.freeze(tv, f"{call.key} writes at indexed positions")
    return ctx.fixed(call.out.shape)


@rule(operator.setitem, key="setitem")
def setitem(ctx: RuleContext, call: Call):
    for tv in call.tensors():
        ctx.freeze(tv, "in-place item assignment")
    return None


@rule(F.pad, *torch_forms("pad", "constant_pad_nd"), key="pad")
def pad(ctx: RuleContext, call: Call):
    """Constant padding adds fixed entries around an axis; other modes freeze padded axes."""
    x = first_tensor(call)
    pads = list(call.arg(1, "pad"))
    mode = call.kwargs.get("mode", call.args[2] if len(call.args) > 2 else "constant")
    mode = mode if isinstance(mode, str) else "constant"
    dims = list(x.dims)
    for k in range(len(pads) // 2):
        d = x.ndim - 1 - k
        lo, hi = int(pads[2 * k]), int(pads[2 * k + 1])
        if lo == 0 and hi == 0:
            continue
        if isinstance(dims[d], Lvl):
            dims = list(ctx.alg.flatten(tuple(dims), dims[d].joint, ctx.why))
        term = ctx.plain(dims[d])
        if mode != "constant":
            ctx.freeze_term(term, f"{mode} padding")
            dims[d] = Fixed(term.size + lo + hi)
            continue
        if lo < 0 or hi < 0:
            n = term.size
            a, b = max(-lo, 0), max(-hi, 0)
            term = ctx.solver.as_concat(term, [a, n - a - b, b], ctx.why)[1]
        dims[d] = concat([Fixed(max(lo, 0)), term, Fixed(max(hi, 0))])
    out = call.out
    dims = [TRIVIAL if n == 1 else t for t, n in zip(dims, out.shape, strict=True)]
    return ctx.normalize(tuple(dims))

