"""Dimension terms: the algebra that describes how one tensor axis may be permuted.

A term describes the permutations an axis admits:

* :class:`Fixed` -- only the identity (batch, tokens, spatial positions, constants).
* :class:`Bcast` -- the tensor is constant along the axis, so every permutation leaves it unchanged.
* :class:`Atom` -- a permutation variable; atoms joined by the solver form one *group*.
* :class:`Concat` -- a direct sum: each part is permuted independently inside its own range.
* :class:`Product` -- a row-major flattening ``index = o * |inner| + i``. Block ``o`` carries its own inner
  term ``inners[o]`` (heads with per-head dims, GroupNorm groups, grouped conv). Blocks that must share
  one inner permutation reference the *same* term object.

Terms are immutable; refinement of atoms lives in :class:`fxmerge.ir.solver.Solver`. Build composite
terms with :func:`concat` and :func:`product`, which normalise trivial cases (size-1 factors, all-fixed
parts) so that equal meanings get equal shapes.
"""

from __future__ import annotations

from dataclasses import dataclass


class Term:
    """Base class of dimension terms. Every term has a ``size`` (the axis length)."""

    __slots__ = ()
    size: int


@dataclass(frozen=True, eq=False, slots=True)
class Fixed(Term):
    """An axis that only admits the identity permutation; ``why`` says where it comes from."""

    size: int
    why: str = ""


@dataclass(frozen=True, eq=False, slots=True)
class Bcast(Term):
    """An axis along which the tensor is constant: any permutation leaves it unchanged."""

    size: int


@dataclass(frozen=True, eq=False, slots=True)
class Atom(Term):
    """A permutation variable. ``id`` indexes the solver's union-find."""

    id: int
    size: int


@dataclass(frozen=True, eq=False, slots=True)
class Concat(Term):
    """Direct sum of parts laid out one after another."""

    parts: tuple[Term, ...]
    size: int


@dataclass(frozen=True, eq=False, slots=True)
class Product(Term):
    """Row-major product ``outer x inner``; ``inners[b]`` is the inner term carried by block ``b``."""

    outer: Term
    inners: tuple[Term, ...]
    size: int

    @property
    def inner_size(self) -> int:
        return self.inners[0].size


TRIVIAL = Bcast(1)


def is_const(t: Term) -> bool:
    """True for terms without permutation freedom of their own (Fixed or size <= 1)."""
    return isinstance(t, Fixed) or t.size <= 1


def concat(parts: list[Term] | tuple[Term, ...]) -> Term:
    """Build a normalised :class:`Concat` (drops empty parts, merges all-fixed parts)."""
    parts = tuple(p for p in parts if p.size > 0)
    if len(parts) == 1:
        return parts[0]
    total = sum(p.size for p in parts)
    if all(is_const(p) for p in parts):
        return Fixed(total)
    return Concat(parts, total)


def product(outer: Term, inners: list[Term] | tuple[Term, ...]) -> Term:
    """Build a normalised :class:`Product`; ``inners`` has one entry per outer index."""
    inners = tuple(inners)
    if len(inners) != outer.size:
        raise ValueError(f"product: {len(inners)} inner terms for an outer axis of size {outer.size}")
    m = inners[0].size
    if outer.size == 1:
        return inners[0]
    if m == 1:
        return outer
    first = inners[0]
    if isinstance(outer, Fixed) and all(isinstance(t, Fixed) for t in inners):
        return Fixed(outer.size * m)
    if isinstance(outer, Bcast) and isinstance(first, Bcast) and all(t is first for t in inners):
        return Bcast(outer.size * m)
    return Product(outer, inners, outer.size * m)


def chain(terms: list[Term]) -> Term:
    """Row-major product of independent axis terms (every block shares the inner term)."""
    terms = [t for t in terms if t.size != 1] or [TRIVIAL]
    acc = terms[-1]
    for t in reversed(terms[:-1]):
        acc = product(t, [acc] * t.size)
    return acc
