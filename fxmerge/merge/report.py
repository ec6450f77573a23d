"""Per-space similarity before/after merging: what the JSON report and the heatmap plots show."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxmerge.ir.layout import G, Layout, LFixed, Prod, describe
from fxmerge.match import Matching
from fxmerge.merge.spaces import Space


@dataclass
class SpaceDetail:
    """One merge space: its final similarity over the stacked units of all models and the matching."""

    name: str
    groups: list[int]
    size: int
    n_blocks: int
    members: list[str]
    similarity: torch.Tensor  # [N*C, N*C], the matrix the final matching was solved on
    matching: Matching
    before: float  # mean cross-model similarity (on ``similarity``) of the units paired by the identity
    after: float  # the same for the units the matching merged

    def to_obj(self) -> dict:
        return {"groups": self.groups, "size": self.size, "n_blocks": self.n_blocks, "members": self.members,
                "before": self.before, "after": self.after}  # fmt: skip


def space_name(key: Layout) -> str:
    """``g3`` for a plain group; ``g5x[g6,g7]`` for heads of outer group 5 with inner groups 6 and 7; the layout's
    compact form (``g4xg3x(g1,g2)``) for other block layouts."""
    if isinstance(key, G):
        return f"g{key.gid}"
    if isinstance(key, Prod) and isinstance(key.outer, G) and all(isinstance(i, (G, LFixed)) for i in key.inners):
        inner = ",".join(dict.fromkeys(f"g{i.gid}" if isinstance(i, G) else "fixed" for i in key.inners))
        return f"g{key.outer.gid}x[{inner}]"
    return describe(key)  # nested blocks / fused per-block layouts, e.g. g4xg3x(g1,g2)


def matched_similarity(sim: torch.Tensor, unmerge: list[torch.Tensor]) -> float:
    """Mean similarity over the pairs of distinct units (of any models) merged into the same unit."""
    u = torch.cat([x.to(sim.dtype) for x in unmerge], dim=0)  # [O, K] 0/1
    pair_sum = ((u.T @ sim) * u.T).sum(dim=1) - (u * sim.diagonal()[:, None]).sum(dim=0)
    counts = u.sum(dim=0)
    pairs = counts * (counts - 1)
    keep = pairs > 0
    if not bool(keep.any()):
        return float("nan")
    return float((pair_sum[keep] / pairs[keep]).mean())


def identity_pairs(size: int, n: int) -> list[torch.Tensor]:
    eye = torch.eye(size, dtype=torch.float64)
    return [eye] * n


def space_detail(key: Layout, space: Space, sim: torch.Tensor, mt: Matching, n: int) -> SpaceDetail:
    members = [f"{s.param}[{s.axis}]" for s in space.slots[:6]]
    return SpaceDetail(
        name=space_name(key),
        groups=sorted(space.groups),
        size=space.size,
        n_blocks=space.n_blocks,
        members=members,
        similarity=sim.detach().cpu(),
        matching=mt,
        before=matched_similarity(sim.double().cpu(), identity_pairs(space.size, n)),
        after=matched_similarity(sim.double().cpu(), [u.double().cpu() for u in mt.unmerge]),
    )
