"""Axis terms of tensors, including *joint* axes whose permutation depends on another axis.

After ``x.view(B, T, H, D)`` the head-dim axis ``D`` is permuted per head: its permutation depends on
the index along ``H``. Such axes are levels of one :class:`Joint`: a term (the flattened ``H*D`` axis)
viewed as nested products with the given level sizes. A tensor's dims are a tuple of
:class:`~fxmerge.ir.terms.Term` (independent axes) and :class:`Lvl` (level ``k`` of a joint). Invariant:
when a tensor references a joint, all of the joint's levels are axes of that tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxmerge.ir.solver import Solver
from fxmerge.ir.terms import TRIVIAL, Bcast, Term, chain, product


@dataclass(frozen=True, eq=False, slots=True)
class Joint:
    """A term viewed as nested products with the given level sizes."""

    root: Term
    sizes: tuple[int, ...]


@dataclass(frozen=True, eq=False, slots=True)
class Lvl:
    """Level ``k`` of ``joint`` as a tensor axis."""

    joint: Joint
    k: int

    @property
    def size(self) -> int:
        return self.joint.sizes[self.k]


AxisTerm = Term | Lvl
Dims = tuple[AxisTerm, ...]


def joints_of(dims: Dims) -> list[Joint]:
    seen: dict[int, Joint] = {}
    for d in dims:
        if isinstance(d, Lvl):
            seen.setdefault(id(d.joint), d.joint)
    return list(seen.values())


def make_joint(root: Term, sizes: tuple[int, ...]) -> list[AxisTerm]:
    """Axis terms for splitting ``root`` into axes of ``sizes`` (size-1 axes become trivial)."""
    real = tuple(s for s in sizes if s != 1)
    if len(real) <= 1:
        return [root if s != 1 else TRIVIAL for s in sizes]
    j = Joint(root, real)
    out: list[AxisTerm] = []
    k = 0
    for s in sizes:
        if s == 1:
            out.append(TRIVIAL)
        else:
            out.append(Lvl(j, k))
            k += 1
    return out


class DimAlgebra:
    """Tensor-level operations (levels, merging, einsum-style linking) on top of a :class:`Solver`."""

    def __init__(self, solver: Solver) -> None:
        self.s = solver

    # ---------------------------------------------------------------- levels
    def level_terms(self, j: Joint, k: int, why: str) -> list[Term]:
        """Terms of level ``k`` for every index of the levels above it (row-major)."""
        cur = [j.root]
        for i in range(k):
            nxt: list[Term] = []
            memo: dict[int, list[Term]] = {}
            for t in cur:
                if id(t) not in memo:
                    memo[id(t)] = self.s.as_product(t, j.sizes[i], why)[1]
                nxt.extend(memo[id(t)])
            cur = nxt
        if k == len(j.sizes) - 1:
            return cur
        memo2: dict[int, Term] = {}
        out = []
        for t in cur:
            if id(t) not in memo2:
                memo2[id(t)] = self.s.as_product(t, j.sizes[k], why)[0]
            out.append(memo2[id(t)])
        return out

    def shared_level(self, j: Joint, k: int, why: str) -> Term:
        """Force level ``k`` to one permutation for all outer indices; return that term."""
        ts = self.level_terms(j, k, why)
        for t in ts[1:]:
            self.s.unify(ts[0], t, why)
        return ts[0]

    def prefix_term(self, j: Joint, last: int, why: str) -> Term:
        """The term of levels ``0..last`` (the joint with deeper levels ignored)."""

        def build(t: Term, i: int) -> Term:
            outer, inners = self.s.as_product(t, j.sizes[i], why)
            if i == last:
                return outer
            memo: dict[int, Term] = {}
            kids = []
            for x in inners:
                if id(x) not in memo:
                    memo[id(x)] = build(x, i + 1)
                kids.append(memo[id(x)])
            return product(outer, kids)

        if last == len(j.sizes) - 1:
            return j.root
        return build(j.root, 0)

    def flatten(self, dims: Dims, joint: Joint, why: str) -> list[AxisTerm]:
        """Replace every level of ``joint`` by a plain term, forcing levels to be shared."""
        plain = [self.shared_level(joint, k, why) for k in range(len(joint.sizes))]
        return [plain[d.k] if isinstance(d, Lvl) and d.joint is joint else d for d in dims]

    def plain(self, a: AxisTerm, why: str) -> Term:
        """A plain term for one axis (levels are forced shared)."""
        if isinstance(a, Lvl):
            return self.shared_level(a.joint, a.k, why)
        return a

    # ---------------------------------------------------------------- merging
    def collapse(self, dims: Dims, positions: list[int], why: str) -> Term:
        """One term for the row-major merge of ``positions`` (in that order)."""
        axes = [dims[p] for p in positions if dims[p].size != 1]
        if not axes:
            return TRIVIAL
        if all(isinstance(a, Lvl) for a in axes):
            j = axes[0].joint  # type: ignore[union-attr]
            ks = [a.k for a in axes]  # type: ignore[union-attr]
            same = all(a.joint is j for a in axes)  # type: ignore[union-attr]
            if same and ks == list(range(ks[0], ks[0] + len(ks))) and ks[0] == 0:
                return self.prefix_term(j, ks[-1], why)
        return chain([self.plain(a, why) for a in axes])

    def unify_axes(self, a: AxisTerm, b: AxisTerm, why: str) -> None:
        """Constrain two axes to carry the same permutation."""
        if a is b or a.size == 1:
            return
        if isinstance(a, Lvl) and isinstance(b, Lvl) and a.joint is b.joint and a.k == b.k:
            return
        if isinstance(a, Lvl):
            a, b = b, a
        if isinstance(b, Lvl):
            t = self.plain(a, why)
            for x in self.level_terms(b.joint, b.k, why):
                self.s.unify(t, x, why)
        else:
            self.s.unify(a, b, why)

    # ------------------------------------------------------------------ link
    def link(self, operands: list[tuple[Dims, str]], out: str, out_shape: tuple[int, ...], why: str) -> Dims:
        """Einsum-style constraint: axes sharing a letter carry one permutation.

        ``operands`` are (dims, letters) pairs; size-1 occurrences broadcast and impose nothing.
        Joints whose levels carry the same letters in two operands are unified whole, which keeps
        per-block (e.g. per-head) independence. Returns the dims of the output ``out``.
        """
        occ: dict[str, list[AxisTerm]] = {}
        sig_groups: dict[tuple[str, ...], list[Joint]] = {}
        for dims, letters in operands:
            if len(dims) != len(letters):
                raise AssertionError(f"link: {len(dims)} dims for letters {letters!r} ({why})")
            for d, c in zip(dims, letters, strict=True):
                if d.size != 1:
                    occ.setdefault(c, []).append(d)
            for j in joints_of(dims):
                sig = _signature(dims, letters, j)
                sig_groups.setdefault(sig, []).append(j)
        rep_joint: dict[int, Joint] = {}
        for js in sig_groups.values():
            for j in js[1:]:
                self.s.unify(js[0].root, j.root, why)
            for j in js:
                rep_joint[id(j)] = js[0]
        reps: dict[str, AxisTerm] = {}
        for c, terms in occ.items():
            rep = next((t for t in terms if isinstance(t, Lvl)), None) or _best_plain(terms)
            if isinstance(rep, Lvl):
                rep = Lvl(rep_joint.get(id(rep.joint), rep.joint), rep.k)
            reps[c] = rep
            for t in terms:
                if not _linked(rep, t, rep_joint):
                    self.unify_axes(rep, t, why)
        complete = {sig: js[0] for sig, js in sig_groups.items() if set(sig) <= set(out)}
        for sig, j in complete.items():
            j = self._overlay_joint(j, sig, sig_groups[sig], occ)
            for k, c in enumerate(sig):
                reps[c] = Lvl(j, k)
        for c, rep in reps.items():
            if not isinstance(rep, Lvl) and self.s.has_bcast(rep):
                for t in occ[c]:
                    if not isinstance(t, Lvl):
                        rep = self.s.overlay(rep, t, why)
                reps[c] = rep
        result: list[AxisTerm] = []
        for c, n in zip(out, out_shape, strict=True):
            rep = reps.get(c)
            if n == 1:
                result.append(TRIVIAL)
            elif rep is None:
                result.append(Bcast(n))
            elif rep.size != n:
                raise AssertionError(f"link: output axis {c!r} has size {n}, operands say {rep.size} ({why})")
            else:
                result.append(rep)
        return self.normalize(tuple(result), why)

    def _overlay_joint(
        self, j: Joint, sig: tuple[str, ...], same: list[Joint], occ: dict[str, list[AxisTerm]]
    ) -> Joint:
        """``j`` with its broadcast parts replaced by what the other operands carry on the same letters."""
        why = "broadcast operand"
        if not self.s.has_bcast(j.root):
            return j
        root = j.root
        for other in same[1:]:
            root = self.s.overlay(root, other.root, why)
        members = {id(x) for x in same}
        for k, c in enumerate(sig):
            for t in occ.get(c, []):
                if isinstance(t, Lvl) and id(t.joint) in members:
                    continue
                root = self.s.overlay(root, _level_root(j.sizes, k, self.plain(t, why)), why)
        return Joint(root, j.sizes) if root is not j.root else j

    def mix(self, dims: Dims, axes: list[int], why: str) -> None:
        """Values are combined along ``axes`` (reduction, normalisation, scan, sort): constrain joints so
        that every permutation maps the positions combined together onto positions combined together.

        For a joint (e.g. ``h.view(B, 4, 4)``) whose levels ``ks`` are mixed: if ``ks`` is a suffix of the
        levels, the joint becomes a product over the levels above it (each block permuted as a whole);
        otherwise the first mixed level is structured and every deeper level is shared across blocks.
        """
        for j in joints_of(dims):
            ks = sorted({dims[a].k for a in axes if isinstance(dims[a], Lvl) and dims[a].joint is j})
            if not ks:
                continue
            n = len(j.sizes)
            if ks == list(range(ks[0], n)):
                if ks[0] > 0:
                    self.prefix_term(j, ks[0] - 1, why)
                continue
            self.level_terms(j, ks[0], why)
            for m in range(ks[0] + 1, n):
                self.shared_level(j, m, why)

    def normalize(self, dims: Dims, why: str) -> Dims:
        """Restore the invariant that every referenced joint has all its levels present."""
        out = list(dims)
        for j in joints_of(dims):
            ks = sorted({d.k for d in out if isinstance(d, Lvl) and d.joint is j})
            if len(ks) == len(j.sizes):
                continue
            if ks == list(range(len(ks))):
                sub = self.prefix_term(j, ks[-1], why)
                sizes = j.sizes[: len(ks)]
                repl = make_joint(sub, sizes) if len(sizes) > 1 else [sub]
                out = [repl[d.k] if isinstance(d, Lvl) and d.joint is j else d for d in out]
            else:
                out = self.flatten(tuple(out), j, why)
        return tuple(out)


def _level_root(sizes: tuple[int, ...], k: int, t: Term) -> Term:
    """A joint root that carries ``t`` on level ``k`` (shared over the levels above) and is constant on the
    others: the joint-shaped view of a plain operand axis."""
    acc: Term = Bcast(math.prod(sizes[k + 1 :])) if k + 1 < len(sizes) else TRIVIAL
    acc = product(t, [acc] * t.size) if acc.size > 1 else t
    for i in reversed(range(k)):
        acc = product(Bcast(sizes[i]), [acc] * sizes[i])
    return acc


def _signature(dims: Dims, letters: str, j: Joint) -> tuple[str, ...]:
    sig = [""] * len(j.sizes)
    for d, c in zip(dims, letters, strict=True):
        if isinstance(d, Lvl) and d.joint is j:
            sig[d.k] = c
    return tuple(sig)


def _linked(rep: AxisTerm, t: AxisTerm, rep_joint: dict[int, Joint]) -> bool:
    if rep is t:
        return True
    if isinstance(rep, Lvl) and isinstance(t, Lvl) and rep.k == t.k:
        return rep_joint.get(id(rep.joint)) is rep_joint.get(id(t.joint), t.joint)
    return False


def _best_plain(terms: list[AxisTerm]) -> AxisTerm:
    for t in terms:
        if not isinstance(t, Bcast):
            return t
    return terms[0]

