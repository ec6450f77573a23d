"""Union-find with structural unification over dimension terms.

The solver owns every :class:`~fxmerge.ir.terms.Atom`. An atom class can be

* free (a permutation group),
* *refined* into a structure (a :class:`Concat` or :class:`Product` of fresh or existing terms), or
* *frozen* (identity only), with the reason that froze it.

All operations only ever add constraints, so whatever the order in which rules run, the result is the
coarsest set of groups that satisfies every constraint. Whenever a constraint cannot be expressed in the
algebra the solver freezes the terms involved: freezing is always sound.
"""

from __future__ import annotations

import itertools
import math

from fxmerge.ir.terms import TRIVIAL, Atom, Bcast, Concat, Fixed, Product, Term, concat, product

_MAX_REASON = 400


class Solver:
    """Atoms, their union-find classes, refinements and freeze reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._atoms: list[Atom] = []
        self._struct: dict[int, Term] = {}
        self._frozen: dict[int, str] = {}
        self.origin: dict[int, str] = {}

    # ------------------------------------------------------------------ atoms
    def atom(self, size: int, origin: str = "") -> Term:
        """A fresh permutation variable of ``size`` (size <= 1 gives the trivial term)."""
        if size <= 1:
            return TRIVIAL if size == 1 else Fixed(0)
        a = Atom(len(self._atoms), size)
        self._atoms.append(a)
        self._parent.append(a.id)
        if origin:
            self.origin[a.id] = origin
        return a

    def atoms_by_id(self, i: int) -> Atom:
        """The atom with id ``i``."""
        return self._atoms[i]

    def find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def root(self, a: Atom) -> Atom:
        return self._atoms[self.find(a.id)]

    def head(self, t: Term) -> Term:
        """Resolve an atom to its class representative or its refinement; other terms unchanged."""
        while isinstance(t, Atom):
            r = self.find(t.id)
            s = self._struct.get(r)
            if s is None:
                return self._atoms[r]
            t = s
        return t

    def frozen_reason(self, t: Term) -> str | None:
        """The reason a (resolved) atom is frozen, or None."""
        if isinstance(t, Atom):
            return self._frozen.get(self.find(t.id))
        return None

    def is_free_atom(self, t: Term) -> bool:
        h = self.head(t)
        return isinstance(h, Atom) and self.find(h.id) not in self._frozen

    # ----------------------------------------------------------------- freeze
    def freeze(self, t: Term, why: str) -> None:
        """Constrain every atom inside ``t`` to the identity."""
        h = self.head(t)
        if isinstance(h, Atom):
            r = self.find(h.id)
            self._frozen.setdefault(r, why[:_MAX_REASON])
        elif isinstance(h, Concat):
            for p in h.parts:
                self.freeze(p, why)
        elif isinstance(h, Product):
            self.freeze(h.outer, why)
            for inner in _unique(h.inners):
                self.freeze(inner, why)

    # ------------------------------------------------------------------ unify
    def unify(self, a: Term, b: Term, why: str) -> None:
        """Constrain ``a`` and ``b`` to carry the same permutation."""
        if a is b:
            return
        ha, hb = self.head(a), self.head(b)
        if ha is hb:
            return
        if ha.size != hb.size:
            raise AssertionError(f"unify: size mismatch {ha.size} vs {hb.size} ({why})")
        if isinstance(ha, Bcast) or isinstance(hb, Bcast):
            return
        fa, fb = self._const_reason(ha), self._const_reason(hb)
        if fa is not None or fb is not None:
            if fa is not None:
                self.freeze(hb, _chain(fa, why))
            if fb is not None:
                self.freeze(ha, _chain(fb, why))
            return
        if isinstance(ha, Atom) and isinstance(hb, Atom):
            self._parent[self.find(ha.id)] = self.find(hb.id)
        elif isinstance(ha, Atom):
            self._struct[self.find(ha.id)] = self._free_bcast(hb)
        elif isinstance(hb, Atom):
            self._struct[self.find(hb.id)] = self._free_bcast(ha)
        else:
            self._unify_structs(ha, hb, why)

    def _free_bcast(self, t: Term) -> Term:
        """``t`` with every broadcast leaf replaced by its own fresh atom: refining an atom to ``t`` must not
        turn "imposes nothing" (Bcast) into "identity only", nor into "one permutation shared by every block"
        (a Bcast object referenced by several blocks says nothing about sharing). Non-broadcast leaves keep
        their identity, so shared inner permutations stay shared."""
        if not _has_bcast(t):
            return t
        if isinstance(t, Bcast):
            return self.atom(t.size)
        if isinstance(t, Concat):
            return concat([self._free_bcast(p) for p in t.parts])
        if isinstance(t, Product):
            return product(self._free_bcast(t.outer), [self._free_bcast(x) for x in t.inners])
        return t

    def _const_reason(self, h: Term) -> str | None:
        if isinstance(h, Fixed):
            return h.why or "fixed axis"
        return self.frozen_reason(h)

    def _unify_structs(self, a: Term, b: Term, why: str) -> None:
        if isinstance(a, Concat) and isinstance(b, Concat):
            cuts = sorted(set(_cuts(a)) | set(_cuts(b)))
            for pa, pb in zip(self._split_at(a, cuts), self._split_at(b, cuts), strict=True):
                self.unify(pa, pb, why)
        elif isinstance(a, Product) and isinstance(b, Product):
            self._unify_products(a, b, why)
        else:
            c, p = (a, b) if isinstance(a, Concat) else (b, a)
            assert isinstance(c, Concat) and isinstance(p, Product)
            sizes = [q.size for q in c.parts]
            if all(s % p.inner_size == 0 for s in sizes):
                for part, piece in zip(c.parts, self.as_concat(p, sizes, why), strict=True):
                    self.unify(part, piece, why)
            else:
                outer, inners = self.as_product(c, p.outer.size, why)
                self._unify_products(p, _as_product_term(outer, inners), why)

    def _unify_products(self, a: Term, b: Term, why: str) -> None:
        if not (isinstance(a, Product) and isinstance(b, Product)):
            self.unify(a, b, why)
            return
        if a.outer.size != b.outer.size:
            small, big = (a, b) if a.outer.size < b.outer.size else (b, a)
            outer, inners = self.as_product(small, big.outer.size, why)
            self.unify(outer, big.outer, why)
            self._unify_lists(inners, list(big.inners), why)
            return
        self.unify(a.outer, b.outer, why)
        self._unify_lists(list(a.inners), list(b.inners), why)

    def _unify_lists(self, xs: list[Term], ys: list[Term], why: str) -> None:
        seen: set[tuple[int, int]] = set()
        for x, y in zip(xs, ys, strict=True):
            key = (id(x), id(y))
            if key not in seen:
                seen.add(key)
                self.unify(x, y, why)

    # ----------------------------------------------------------- broadcasts
    def has_bcast(self, t: Term) -> bool:
        """True if the resolved ``t`` has a broadcast (size > 1) leaf anywhere inside."""
        h = self.head(t)
        if isinstance(h, Bcast):
            return h.size > 1
        if isinstance(h, Concat):
            return any(self.has_bcast(p) for p in h.parts)
        if isinstance(h, Product):
            return self.has_bcast(h.outer) or any(self.has_bcast(x) for x in _unique(h.inners))
        return False

    def overlay(self, a: Term, b: Term, why: str) -> Term:
        """The term of a value that varies wherever ``a`` or ``b`` varies (``a`` and ``b`` already unified).

        An op whose operands share an axis, one of them constant (broadcast) along part of it, produces a
        result that varies along that part with the other operand: ``softmax(q k^T) @ v`` with ``v``'s heads
        repeated over a group of query heads (GQA) carries the query's head permutation, not ``v``'s
        broadcast. The result takes, leaf by leaf, ``a``'s term where ``a`` is not broadcast and ``b``'s
        term elsewhere.
        """
        ha, hb = self.head(a), self.head(b)
        if isinstance(ha, Bcast):
            return hb
        if isinstance(hb, Bcast) or not self.has_bcast(ha):
            return ha
        if isinstance(ha, Product):
            outer_b, inners_b = self.as_product(hb, ha.outer.size, why)
            memo: dict[tuple[int, int], Term] = {}
            inners = []
            for x, y in zip(ha.inners, inners_b, strict=True):
                key = (id(x), id(y))
                if key not in memo:
                    memo[key] = self.overlay(x, y, why)
                inners.append(memo[key])
            return product(self.overlay(ha.outer, outer_b, why), inners)
        if isinstance(ha, Concat):
            parts_b = self.as_concat(hb, [p.size for p in ha.parts], why)
            return concat([self.overlay(x, y, why) for x, y in zip(ha.parts, parts_b, strict=True)])
        return ha

    # ------------------------------------------------------------- reshaping
    def as_product(self, t: Term, s: int, why: str) -> tuple[Term, list[Term]]:
        """Constrain ``t`` (size n) to a product with outer size ``s``; return (outer, inners)."""
        n = t.size
        if s <= 0 or n % s:
            raise AssertionError(f"as_product: {s} does not divide {n}")
        m = n // s
        if s == 1:
            return TRIVIAL, [t]
        if m == 1:
            return t, [TRIVIAL] * s
        h = self.head(t)
        reason = self._const_reason(h)
        if isinstance(h, Fixed) or reason is not None:
            return Fixed(s), [Fixed(m)] * s
        if isinstance(h, Bcast):
            inner = Bcast(m)
            return Bcast(s), [inner] * s
        if isinstance(h, Atom):
            outer = self.atom(s, self.origin.get(h.id, ""))
            inners = [self.atom(m) for _ in range(s)]
            self._struct[self.find(h.id)] = product(outer, inners)
            return outer, inners
        if isinstance(h, Product):
            return self._regroup(h, s, why)
        assert isinstance(h, Concat)
        return self._concat_as_product(h, s, why)

    def _regroup(self, h: Product, s: int, why: str) -> tuple[Term, list[Term]]:
        k = h.outer.size
        if k == s:
            return h.outer, list(h.inners)
        if s % k == 0:
            b = s // k
            memo: dict[int, tuple[Term, list[Term]]] = {}
            outs, inners = [], []
            for inner in h.inners:
                if id(inner) not in memo:
                    memo[id(inner)] = self.as_product(inner, b, why)
                o2, i2 = memo[id(inner)]
                outs.append(o2)
                inners.extend(i2)
            return product(h.outer, outs), inners
        if k % s == 0:
            c = k // s
            o1, o2s = self.as_product(h.outer, s, why)
            inners = [product(o2s[q], h.inners[q * c : (q + 1) * c]) for q in range(s)]
            return o1, inners
        g = math.gcd(k, s)
        if g > 1:
            o1, i1 = self.as_product(h, g, why)
            return self._regroup(_as_product_term(o1, i1), s, why)
        self.freeze(h, _chain(f"cannot regroup a {k}x{h.inner_size} product into {s} blocks", why))
        return Fixed(s), [Fixed(h.size // s)] * s

    def _concat_as_product(self, h: Concat, s: int, why: str) -> tuple[Term, list[Term]]:
        m = h.size // s
        if any(p.size % m for p in h.parts):
            self.freeze(h, _chain(f"concat parts {[p.size for p in h.parts]} do not tile blocks of {m}", why))
            return Fixed(s), [Fixed(m)] * s
        outs, inners = [], []
        for p in h.parts:
            o, i = self.as_product(p, p.size // m, why)
            outs.append(o)
            inners.extend(i)
        return concat(outs), inners

    def as_concat(self, t: Term, sizes: list[int], why: str) -> list[Term]:
        """Constrain ``t`` to a direct sum with the given part sizes; return the parts."""
        sizes = [int(s) for s in sizes]
        if sum(sizes) != t.size:
            raise AssertionError(f"as_concat: parts {sizes} do not sum to {t.size}")
        if len([s for s in sizes if s > 0]) <= 1:
            return [t if s == t.size else Fixed(0) for s in sizes]
        h = self.head(t)
        if isinstance(h, Fixed) or self._const_reason(h) is not None:
            return [Fixed(s) for s in sizes]
        if isinstance(h, Bcast):
            return [Bcast(s) for s in sizes]
        if isinstance(h, Atom):
            parts = [self.atom(s, self.origin.get(h.id, "")) for s in sizes]
            self._struct[self.find(h.id)] = concat(parts)
            return parts
        if isinstance(h, Concat):
            cuts = _cuts_of_sizes(sizes)
            pieces = self._split_at(h, sorted(set(cuts) | set(_cuts(h))))
            return _group_pieces(pieces, sizes)
        assert isinstance(h, Product)
        m = h.inner_size
        if all(s % m == 0 for s in sizes):
            outer_parts = self.as_concat(h.outer, [s // m for s in sizes], why)
            out, off = [], 0
            for op in outer_parts:
                out.append(product(op, h.inners[off : off + op.size]) if op.size else Fixed(0))
                off += op.size
            return out
        self.freeze(h, _chain(f"split {sizes} cuts through blocks of {m}", why))
        return [Fixed(s) for s in sizes]

    def _split_at(self, c: Concat, cuts: list[int]) -> list[Term]:
        """Split a concat at the given absolute cut points (a superset of its own cuts)."""
        out: list[Term] = []
        off = 0
        for p in c.parts:
            inner = [x - off for x in cuts if off < x < off + p.size]
            bounds = [0, *inner, p.size]
            out.extend(self.as_concat(p, [b - a for a, b in itertools.pairwise(bounds)], "split"))
            off += p.size
        return out

    # ---------------------------------------------------------------- resolve
    def resolve(self, t: Term) -> Term:
        """Fully resolved term: atoms replaced by class roots or refinements, frozen atoms by Fixed."""
        h = self.head(t)
        if isinstance(h, Atom):
            return Fixed(h.size) if self.frozen_reason(h) is not None else h
        if isinstance(h, Concat):
            return concat([self.resolve(p) for p in h.parts])
        if isinstance(h, Product):
            memo: dict[int, Term] = {}
            inners = []
            for x in h.inners:
                if id(x) not in memo:
                    memo[id(x)] = self.resolve(x)
                inners.append(memo[id(x)])
            return product(self.resolve(h.outer), inners)
        return h

    def atoms_in(self, t: Term) -> list[Atom]:
        """Class-root atoms (free or frozen) reachable inside ``t``."""
        h = self.head(t)
        if isinstance(h, Atom):
            return [h]
        if isinstance(h, Concat):
            return [a for p in h.parts for a in self.atoms_in(p)]
        if isinstance(h, Product):
            out = self.atoms_in(h.outer)
            for x in _unique(h.inners):
                out.extend(self.atoms_in(x))
            return out
        return []


def _as_product_term(outer: Term, inners: list[Term]) -> Term:
    p = product(outer, inners)
    if isinstance(p, Product):
        return p
    return Product(outer, tuple(inners), outer.size * inners[0].size)


def _has_bcast(t: Term) -> bool:
    if isinstance(t, Bcast):
        return t.size > 1
    if isinstance(t, Concat):
        return any(_has_bcast(p) for p in t.parts)
    if isinstance(t, Product):
        return _has_bcast(t.outer) or any(_has_bcast(x) for x in _unique(t.inners))
    return False


def _unique(terms: tuple[Term, ...] | list[Term]) -> list[Term]:
    seen: set[int] = set()
    out = []
    for t in terms:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _cuts(c: Concat) -> list[int]:
    return _cuts_of_sizes([p.size for p in c.parts])


def _cuts_of_sizes(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        out.append(acc)
    return out


def _group_pieces(pieces: list[Term], sizes: list[int]) -> list[Term]:
    out, i = [], 0
    for s in sizes:
        group, acc = [], 0
        while acc < s:
            group.append(pieces[i])
            acc += pieces[i].size
            i += 1
        out.append(concat(group) if group else Fixed(0))
    return out


def _chain(cause: str, site: str) -> str:
    if not site or site in cause:
        return cause
    return f"{cause} <- {site}"
