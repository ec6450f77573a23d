"""Merge spaces: the unit sets that get one matching each, read off the spec's layouts.

* a plain group ``G(g)`` is a space of ``size(g)`` units (a unit may span several consecutive entries of
  an axis, e.g. the ``H*W`` positions of a flattened conv channel, or the fixed dims of a head);
* a structured layout ``Prod(outer, inners)`` whose outer and inners both carry groups (attention heads with
  per-head dims, GroupNorm groups, grouped convolution, GQA's kv heads x query heads x head dims, a fused
  qkv laid out per head) is one space whose units are the layout's positions; its matching moves whole blocks
  of the outer and permutes (or zips) inside them.

Spaces that share a group form a *family* (:func:`families`) and are solved together, so that every group gets
one matching wherever it appears: the heads of q/k and v share one head assignment, a shared inner group (one
head-dim permutation for all heads, the query heads of every kv group) one inner matching. Families whose
structured spaces are all ``G(h) x [independent inner groups]`` with one outer ``h`` and no plain member are
*simple* and solved by the group matchers of :mod:`fxmerge.match.groups`; the others by
:mod:`fxmerge.merge.structured`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod, groups_in
from fxmerge.ir.spec import PermutationSpec


@dataclass(frozen=True)
class Slot:
    """Where a space lives on one parameter axis: unit ``u`` covers ``offset + u*unit .. +unit``."""

    param: str
    axis: int
    offset: int
    unit: int


@dataclass
class Space:
    key: Layout
    size: int
    n_blocks: int = 1
    outer: int | None = None
    slots: list[Slot] = field(default_factory=list)

    @property
    def structured(self) -> bool:
        return isinstance(self.key, Prod)

    @property
    def groups(self) -> list[int]:
        return groups_in(self.key)


def is_structured(lay: Layout) -> bool:
    """A ``Prod`` whose outer and inners both carry groups: matched block-wise as one space."""
    return isinstance(lay, Prod) and bool(groups_in(lay.outer)) and any(groups_in(i) for i in lay.inners)


def occurrences(lay: Layout, offset: int = 0, unit: int = 1):
    """``(key, offset, unit)`` for every space key inside ``lay`` (an axis layout), in position order.

    Position ``p`` of the key covers entries ``offset + p*unit .. + unit`` of the axis. Apply-side code
    (``transform.apply_layout``) walks layouts the same way.
    """
    if isinstance(lay, G):
        yield lay, offset, unit
    elif isinstance(lay, Cat):
        off = offset
        for p in lay.parts:
            yield from occurrences(p, off, unit)
            off += p.size * unit
    elif isinstance(lay, Prod):
        m = lay.inners[0].size
        if is_structured(lay):
            yield lay, offset, unit
        elif not any(groups_in(i) for i in lay.inners):  # whole blocks of fixed entries
            yield from occurrences(lay.outer, offset, unit * m)
        elif not groups_in(lay.outer):  # blocks that never move: each inner on its own
            for b, inner in enumerate(lay.inners):
                yield from occurrences(inner, offset + b * m * unit, unit)


def find_spaces(spec: PermutationSpec) -> tuple[dict[Layout, Space], set[int]]:
    """All merge spaces of ``spec`` and the groups that no space carries (kept at the identity)."""
    spaces: dict[Layout, Space] = {}
    for name, layouts in spec.axes.items():
        for axis, lay in enumerate(layouts):
            for key, offset, unit in occurrences(lay):
                if key not in spaces:
                    spaces[key] = _space(key)
                spaces[key].slots.append(Slot(name, axis, offset, unit))
    covered = {g for sp in spaces.values() for g in sp.groups}
    return spaces, {g.id for g in spec.groups} - covered


def _space(key: Layout) -> Space:
    if not isinstance(key, Prod):
        return Space(key, key.size)
    outer = groups_in(key.outer)
    return Space(key, key.size, key.outer.size, outer[0] if outer else None)


def families(spaces: dict[Layout, Space]) -> list[list[Layout]]:
    """Spaces connected by shared groups, each list in the order of ``spaces``."""
    parent: dict[int, int] = {}

    def find(g: int) -> int:
        while parent.setdefault(g, g) != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for sp in spaces.values():
        gs = sp.groups
        for g in gs[1:]:
            parent[find(g)] = find(gs[0])
    out: dict[int, list[Layout]] = {}
    for key, sp in spaces.items():
        gs = sp.groups
        root = find(gs[0]) if gs else -1 - len(out)
        out.setdefault(root, []).append(key)
    return list(out.values())


def is_simple(keys: list[Layout]) -> bool:
    """Structured spaces ``G(h) x [G | fixed, ...]`` of one outer ``h`` whose inner groups are independent (one
    block each, in one space) and no plain space: the group matchers of ``fxmerge.match`` solve them exactly."""
    outers, seen = set(), set()
    for key in keys:
        if not isinstance(key, Prod) or not isinstance(key.outer, G):
            return False
        if not all(isinstance(i, (G, LFixed)) for i in key.inners):
            return False
        outers.add(key.outer.gid)
        inner = [i.gid for i in key.inners if isinstance(i, G)]
        if len(set(inner)) != len(inner) or seen & set(inner) or key.outer.gid in inner:
            return False
        seen.update(inner)
    return len(outers) == 1 and not (outers & seen)
