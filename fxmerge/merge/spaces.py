"""Merge spaces: the unit sets that get one matching each, read off the spec's layouts.

* a plain group ``G(g)`` is a space of ``size(g)`` units (a unit may span several consecutive entries of
  an axis, e.g. the ``H*W`` positions of a flattened conv channel);
* a structured layout ``Prod(G(h), [G(i_0), ..., G(i_{H-1})])`` (attention heads with per-head dims,
  GroupNorm groups, grouped convolution) is one space of ``H * c`` units matched group-wise; all
  structured spaces with the same outer group share one block (head) assignment.

Groups that appear only inside layouts the matchers cannot express stay at the identity (sound: they are
simply averaged in place). A nested structured layout (GQA: kv heads x query heads per kv x head dim) is
matched at its outermost level only: whole blocks move together, their inner groups stay at the identity.
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


def find_spaces(spec: PermutationSpec) -> tuple[dict[Layout, Space], set[int]]:
    """All merge spaces of ``spec`` and the groups that no space can carry (kept at identity)."""
    spaces: dict[Layout, Space] = {}
    stuck: set[int] = set()

    def visit(lay: Layout, name: str, axis: int, offset: int, unit: int) -> None:
        if isinstance(lay, LFixed):
            return
        if isinstance(lay, G):
            sp = spaces.setdefault(lay, Space(lay, lay.size))
            sp.slots.append(Slot(name, axis, offset, unit))
        elif isinstance(lay, Cat):
            off = offset
            for p in lay.parts:
                visit(p, name, axis, off, unit)
                off += p.size * unit
        elif isinstance(lay, Prod):
            m = lay.inners[0].size
            if all(isinstance(i, LFixed) for i in lay.inners):
                visit(lay.outer, name, axis, offset, unit * m)
            elif isinstance(lay.outer, LFixed):
                for b, inner in enumerate(lay.inners):
                    visit(inner, name, axis, offset + b * m * unit, unit)
            elif isinstance(lay.outer, G) and unit == 1 and all(isinstance(i, (G, LFixed)) for i in lay.inners):
                sp = spaces.setdefault(lay, Space(lay, lay.size, lay.outer.size, lay.outer.gid))
                sp.slots.append(Slot(name, axis, offset, 1))
            elif isinstance(lay.outer, (G, Prod)):  # nested blocks (e.g. GQA): match whole blocks, inners kept
                visit(lay.outer, name, axis, offset, unit * m)
                stuck.update(g for i in lay.inners for g in groups_in(i))
            else:
                stuck.update(groups_in(lay))

    for name, layouts in spec.axes.items():
        for axis, lay in enumerate(layouts):
            visit(lay, name, axis, 0, 1)
    covered = {g for sp in spaces.values() for g in sp.groups}
    plain = {sp.key.gid: sp for sp in spaces.values() if isinstance(sp.key, G)}
    for sp in spaces.values():
        if sp.structured and sp.outer in plain:  # the outer also lives unstructured: match whole blocks
            stuck.update(set(sp.groups) - {sp.outer})
            block = sp.size // sp.n_blocks
            plain[sp.outer].slots += [Slot(s.param, s.axis, s.offset, s.unit * block) for s in sp.slots]
    kept = {k: v for k, v in spaces.items() if not (set(v.groups) & stuck)}
    return kept, stuck | (set(range(len(spec))) - covered)
