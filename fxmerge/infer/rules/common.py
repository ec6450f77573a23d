"""Small helpers shared by the built-in rules."""

from __future__ import annotations

import operator
from collections.abc import Sequence

from fxmerge.infer.context import LETTERS, TV, Call, RuleContext
from fxmerge.ir.dims import Dims


def norm_dim(d: int, ndim: int) -> int:
    """A non-negative axis index (``ndim`` 0 is treated as 1, as torch does for scalars)."""
    return d % max(ndim, 1)


def dims_arg(v, ndim: int) -> list[int]:
    """Normalise an int / sequence / None ``dim`` argument into sorted non-negative axes."""
    if v is None:
        return list(range(ndim))
    if isinstance(v, int):
        return [norm_dim(v, ndim)]
    return sorted({norm_dim(int(d), ndim) for d in v})


def shape_args(args: Sequence) -> list[int]:
    """``view(2, 3)`` and ``view((2, 3))`` both give ``[2, 3]``."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return [int(a) for a in args[0]]
    return [int(a) for a in args]


def same_letters(ctx: RuleContext, x: TV, out_shape, skip: Sequence[int] = ()) -> Dims:
    """Link ``x`` to an output of the same rank axis by axis, except ``skip`` (those become fixed)."""
    letters = LETTERS[: x.ndim]
    out_letters = "".join(c if i not in skip else LETTERS[26 + i] for i, c in enumerate(letters))
    dims = ctx.link([(x, letters)], out_letters, out_shape)
    fixed = ctx.fixed(out_shape)
    return tuple(fixed[i] if i in skip else d for i, d in enumerate(dims))


def first_tensor(call: Call) -> TV:
    for v in call.args:
        if isinstance(v, TV):
            return v
    for v in call.kwargs.values():
        if isinstance(v, TV):
            return v
    raise TypeError(f"{call.key}: no tensor argument")


def output_used(call: Call, i: int) -> bool:
    """Whether item ``i`` of a tuple result is read by the graph (``out[i]``, or the tuple used whole)."""
    for user in call.node.users:
        if user.target is operator.getitem and user.args[0] is call.node:
            if user.args[1] == i:
                return True
            continue
        return True
    return False
