"""Tensors created in the graph (fixed), and shape-only ops that impose no constraint."""

from __future__ import annotations

import builtins
import math
import operator

import torch

from fxmerge.infer.context import TV, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.infer.rules.common import first_tensor, same_letters

# Tensor arguments of these ops only give a shape, dtype or device: the result does not depend on their values.
_CREATORS = (
    "arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "randperm", "linspace", "logspace",
    "eye", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor", "empty_strided", "tril_indices",
    "triu_indices", "empty_permuted",
)  # fmt: skip
# The result depends on the values of every tensor argument, and no axis correspondence is known: freeze them.
_VALUE_CONSTANTS = (
    "tensor", "as_tensor", "new_tensor", "multinomial", "_local_scalar_dense", "item", "lift_fresh_copy_",
)  # fmt: skip

_SHAPE_ONLY = (
    "size", "dim", "numel", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "stride", "is_contiguous",
    "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
    "_assert_async", "is_floating_point", "is_complex", "element_size", "get_device", "nelement", "ndimension",
    "data_ptr", "is_nonzero", "equal", "allclose", "tolist", "_functional_assert_async", "is_same_size",
    "_print", "has_torch_function", "is_grad_enabled", "is_autocast_enabled", "_check", "_check_is_size",
)  # fmt: skip


@rule(*torch_forms(*_CREATORS), key="constant")
def constant(ctx: RuleContext, call: Call):
    """A tensor built inside the graph (from shapes, dtypes and devices only) carries no permutation."""
    out = call.out
    if isinstance(out, torch.Tensor):
        return ctx.fixed(out.shape)
    return None


@rule(*torch_forms(*_VALUE_CONSTANTS), key="value_constant")
def value_constant(ctx: RuleContext, call: Call):
    """A result built from the *values* of tensor arguments (``torch.tensor(x)``, ``multinomial(p)``, ``x.item()``)
    is treated as a constant, so the arguments it was read from are frozen: a fixed result of a permuted
    input would not be a symmetry."""
    for tv in call.tensors():
        ctx.freeze(tv, f"{call.key} reads values into a constant")
    out = call.out
    if isinstance(out, torch.Tensor):
        return ctx.fixed(out.shape)
    return None


@rule(
    *torch_forms(*_SHAPE_ONLY), len, builtins.isinstance, math.ceil, math.floor, math.sqrt, operator.not_,
    operator.truth, operator.contains, torch._assert, getattr(torch, "sym_int", None), getattr(torch, "sym_float", None),
    getattr(torch, "sym_max", None), getattr(torch, "sym_min", None), getattr(torch, "sym_not", None),
    key="shape_only",
)  # fmt: skip
def shape_only(ctx: RuleContext, call: Call):
    """Ops on sizes, metadata and assertions: no tensor result, no constraint."""
    out = call.out
    if isinstance(out, torch.Tensor):
        for tv in call.tensors():
            ctx.freeze(tv, f"{call.key} produced a tensor from a shape query")
        return ctx.fixed(out.shape)
    return None


_ATTRS_SAME = {"data", "real", "contiguous"}
_ATTRS_T = {"T", "mT", "H", "mH"}


@rule(builtins.getattr, key="getattr")
def getattr_(ctx: RuleContext, call: Call):
    """``x.shape``/``x.dtype`` are metadata; ``x.T`` reverses axes; ``x.data`` passes through."""
    obj, name = call.args[0], call.args[1]
    out = call.out
    if not isinstance(out, torch.Tensor):
        return None
    if isinstance(obj, TV) and name in _ATTRS_SAME and obj.shape == tuple(out.shape):
        return same_letters(ctx, obj, out.shape)
    if isinstance(obj, TV) and name in _ATTRS_T:
        order = list(range(obj.ndim))[::-1] if name in ("T", "H") else [*range(obj.ndim - 2), obj.ndim - 1, obj.ndim - 2]
        return ctx.normalize(tuple(obj.dims[i] for i in order))
    if isinstance(obj, TV):
        ctx.freeze(obj, f"attribute {name!r} of a tensor")
    return ctx.fixed(out.shape)


@rule("Tensor.__getitem__", key="getitem_method")
def getitem_method(ctx: RuleContext, call: Call):
    from fxmerge.infer.rules.slicing import index_dims

    return index_dims(ctx, first_tensor(call), call.args[1], call.out)
