"""What a rule sees: the call (with tensors paired with their axis terms) and a constraint context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxmerge.ir.dims import AxisTerm, DimAlgebra, Dims, Lvl, joints_of
from fxmerge.ir.reshape import reshape_dims
from fxmerge.ir.solver import Solver
from fxmerge.ir.terms import TRIVIAL, Bcast, Fixed, Term

_MISSING = object()
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(eq=False)
class TV:
    """A tensor value flowing through the graph, with one axis term per dimension."""

    value: torch.Tensor
    dims: Dims

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def ndim(self) -> int:
        return self.value.ndim


@dataclass(eq=False)
class Call:
    """One op application: canonical ``key``, arguments (tensors as :class:`TV`), and result."""

    key: str
    node: fx.Node
    args: tuple
    kwargs: dict
    out: Any
    module: nn.Module | None = None
    params: dict[str, TV] = field(default_factory=dict)

    def arg(self, i: int, name: str | None = None, default: Any = _MISSING) -> Any:
        """Positional argument ``i`` or keyword ``name``."""
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        if i < len(self.args):
            return self.args[i]
        if default is _MISSING:
            raise TypeError(f"{self.key}: missing argument {name or i}")
        return default

    def param(self, name: str) -> TV | None:
        """A parameter/buffer of the called module (``None`` when the attribute is None)."""
        return self.params.get(name)

    def tensors(self) -> list[TV]:
        """Every tensor argument, in order (nested lists/tuples flattened)."""
        out: list[TV] = []
        for v in [*self.args, *self.kwargs.values()]:
            out.extend(_flat_tvs(v))
        return out


def _flat_tvs(v: Any) -> list[TV]:
    if isinstance(v, TV):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat_tvs(x)]
    return []


class RuleContext:
    """Constraint operations available to rules; ``why`` names the current node for diagnostics."""

    def __init__(self, solver: Solver, state_ids: set[int] | None = None) -> None:
        self.solver = solver
        self.alg = DimAlgebra(solver)
        self.why = ""
        self.state_ids = state_ids or set()
        self.contracted: set[tuple[int, int]] = set()

    def mark_contracted(self, x: TV | None, axis: int) -> None:
        """Record that ``axis`` of parameter ``x`` is summed over (an *input* axis, unmerged when zipping)."""
        if x is not None and id(x.value) in self.state_ids:
            self.contracted.add((id(x.value), axis % max(x.ndim, 1)))

    # -- terms
    def atom(self, size: int, origin: str = "") -> Term:
        return self.solver.atom(size, origin)

    def fixed(self, shape, why: str = "") -> Dims:
        """Fixed axes (identity only); ``why`` is reported when something links to them."""
        reason = f"{why} at {self.why}" if why else f"fixed axis at {self.why}"
        return tuple(TRIVIAL if n == 1 else Fixed(int(n), reason) for n in shape)

    def bcast(self, shape) -> Dims:
        return tuple(TRIVIAL if n == 1 else Bcast(int(n)) for n in shape)

    def plain(self, a: AxisTerm) -> Term:
        return self.alg.plain(a, self.why)

    def unify(self, a: AxisTerm, b: AxisTerm) -> None:
        self.alg.unify_axes(a, b, self.why)

    def freeze(self, x: TV | Dims | AxisTerm | None, reason: str) -> None:
        """Freeze a tensor's axes (or one axis term) with a reason naming the op."""
        if x is None:
            return
        dims = x.dims if isinstance(x, TV) else (x if isinstance(x, tuple) else (x,))
        msg = f"{reason} at {self.why}"
        for j in joints_of(dims):
            self.solver.freeze(j.root, msg)
        for d in dims:
            if not isinstance(d, Lvl):
                self.solver.freeze(d, msg)

    def freeze_axis(self, x: TV, axis: int, reason: str) -> None:
        """Freeze one axis of ``x``; for a joint level, deeper levels are also made independent of it."""
        self.mix(x, [axis])
        self.freeze_term(x.dims[axis], reason)

    def mix(self, x: TV | None, axes: list[int]) -> None:
        """Declare that the op combines the values of ``x`` along ``axes`` (reduction, normalisation, scan).

        Plain axes need nothing (a permutation of the whole axis keeps the set of combined values); an axis
        that is a level of a view-split (``h.view(B, 4, 4).softmax(-1)``) structures the split so that the
        positions combined together stay together. Every rule that combines values along an axis calls it.
        """
        if x is not None and axes:
            self.alg.mix(x.dims, [a % max(x.ndim, 1) for a in axes], self.why)

    def freeze_term(self, d: AxisTerm, reason: str) -> None:
        """Freeze one axis (for a joint level: that level under every outer index)."""
        msg = f"{reason} at {self.why}"
        if isinstance(d, Lvl):
            for t in self.alg.level_terms(d.joint, d.k, self.why):
                self.solver.freeze(t, msg)
        else:
            self.solver.freeze(d, msg)

    # -- structural helpers
    def link(self, operands: list[tuple[TV | Dims, str]], out: str, out_shape) -> Dims:
        ops = [(o.dims if isinstance(o, TV) else o, letters) for o, letters in operands if o is not None]
        for o, letters in operands:
            if isinstance(o, TV) and id(o.value) in self.state_ids:
                for i, c in enumerate(letters):
                    if c not in out and o.shape[i] > 1:
                        self.mark_contracted(o, i)
        return self.alg.link(ops, out, tuple(out_shape), self.why)

    def elementwise(self, call: Call, tensors: list[TV] | None = None) -> Dims | None:
        """Broadcasting element-wise op: right-aligned axes of every tensor operand share a term."""
        out = call.out
        if not isinstance(out, torch.Tensor):
            return None
        tvs = call.tensors() if tensors is None else [t for t in tensors if t is not None]
        letters = LETTERS[: out.ndim]
        ops = [(t, letters[out.ndim - t.ndim :]) for t in tvs if t.ndim <= out.ndim]
        for t in tvs:
            if t.ndim > out.ndim:
                self.freeze(t, "operand of higher rank than the result")
        return self.link(ops, letters, out.shape)

    def reshape(self, x: TV | Dims, in_shape, out_shape) -> Dims:
        dims = x.dims if isinstance(x, TV) else x
        return reshape_dims(self.alg, dims, tuple(in_shape), tuple(out_shape), self.why)

    def normalize(self, dims: Dims) -> Dims:
        return self.alg.normalize(tuple(dims), self.why)
