"""Resolved axis layouts: what a parameter axis looks like in terms of groups.

A layout is a small immutable tree:

* ``Fixed(n)`` -- identity only,
* ``G(gid, n)`` -- the axis is permuted by group ``gid``,
* ``Cat(parts)`` -- parts laid out one after another,
* ``Prod(outer, inners)`` -- ``len(outer)`` blocks; block ``b`` is permuted internally by ``inners[b]``
  and moves with the outer permutation (heads, GroupNorm groups, flattened channels x positions).

Convention for permutations: ``new[k] = old[perm[k]]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LFixed:
    size: int


@dataclass(frozen=True)
class G:
    gid: int
    size: int


@dataclass(frozen=True)
class Cat:
    parts: tuple[Layout, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True)
class Prod:
    outer: Layout
    inners: tuple[Layout, ...]

    @property
    def size(self) -> int:
        return self.outer.size * self.inners[0].size


Layout = LFixed | G | Cat | Prod


def groups_in(layout: Layout) -> list[int]:
    """Group ids referenced by a layout (with repetition removed, in order)."""
    out: list[int] = []

    def walk(x: Layout) -> None:
        if isinstance(x, G):
            if x.gid not in out:
                out.append(x.gid)
        elif isinstance(x, Cat):
            for p in x.parts:
                walk(p)
        elif isinstance(x, Prod):
            walk(x.outer)
            for i in dict.fromkeys(x.inners):
                walk(i)

    walk(layout)
    return out


def index(layout: Layout, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """The gather index realising ``perms`` on an axis with this layout."""
    if isinstance(layout, LFixed):
        return torch.arange(layout.size)
    if isinstance(layout, G):
        p = perms.get(layout.gid)
        return torch.arange(layout.size) if p is None else p.to(torch.long).cpu()
    if isinstance(layout, Cat):
        out, off = [], 0
        for part in layout.parts:
            out.append(index(part, perms) + off)
            off += part.size
        return torch.cat(out)
    outer = index(layout.outer, perms)
    m = layout.inners[0].size
    cache: dict[Layout, torch.Tensor] = {}
    blocks = []
    for b in outer.tolist():
        inner = layout.inners[b]
        if inner not in cache:
            cache[inner] = index(inner, perms)
        blocks.append(cache[inner] + b * m)
    return torch.cat(blocks)


def is_identity(layout: Layout, perms: dict[int, torch.Tensor]) -> bool:
    return not any(g in perms for g in groups_in(layout))


def to_obj(layout: Layout) -> Any:
    """JSON-serialisable form."""
    if isinstance(layout, LFixed):
        return {"fixed": layout.size}
    if isinstance(layout, G):
        return {"group": layout.gid, "size": layout.size}
    if isinstance(layout, Cat):
        return {"concat": [to_obj(p) for p in layout.parts]}
    inners = list(dict.fromkeys(layout.inners))
    if len(inners) == 1:
        return {"product": {"outer": to_obj(layout.outer), "inner": to_obj(inners[0])}}
    return {"product": {"outer": to_obj(layout.outer), "inners": [to_obj(i) for i in layout.inners]}}


def from_obj(obj: Any) -> Layout:
    if "fixed" in obj:
        return LFixed(int(obj["fixed"]))
    if "group" in obj:
        return G(int(obj["group"]), int(obj["size"]))
    if "concat" in obj:
        return Cat(tuple(from_obj(p) for p in obj["concat"]))
    p = obj["product"]
    outer = from_obj(p["outer"])
    if "inner" in p:
        return Prod(outer, (from_obj(p["inner"]),) * outer.size)
    return Prod(outer, tuple(from_obj(i) for i in p["inners"]))


def describe(layout: Layout) -> str:
    """Compact human-readable form, e.g. ``g3`` or ``[g1|g2]`` or ``g4x(g5..g8)``."""
    if isinstance(layout, LFixed):
        return f"fixed{layout.size}"
    if isinstance(layout, G):
        return f"g{layout.gid}"
    if isinstance(layout, Cat):
        return "[" + "|".join(describe(p) for p in layout.parts) + "]"
    inners = list(dict.fromkeys(layout.inners))
    if len(inners) == 1:
        return f"{describe(layout.outer)}x{describe(inners[0])}"
    if len(inners) > 3:
        return f"{describe(layout.outer)}x({describe(inners[0])}..{describe(inners[-1])})"
    return f"{describe(layout.outer)}x(" + ",".join(describe(i) for i in inners) + ")"
