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
    similarity: torch.Tensor  # [N*C, N*C], the matrix the final matching was solved on (float16 for correlations)
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
    if (
        isinstance(key, Prod)
        and isinstance(key.outer, G)
        and all(isinstance(i, (G, LFixed)) for i in key.inners)
    ):
        inner = ",".join(dict.fromkeys(f"g{i.gid}" if isinstance(i, G) else "fixed" for i in key.inners))
        return f"g{key.outer.gid}x[{inner}]"
    return describe(key)  # nested blocks / fused per-block layouts, e.g. g4xg3x(g1,g2)


def matched_similarity(sim: torch.Tensor, unmerge: list[torch.Tensor] | torch.Tensor) -> float:
    """Mean similarity over the pairs of distinct units (of any models) merged into the same unit.

    ``unmerge`` is the per-model 0/1 [C_m, K] matrices, or directly the merged unit of every stacked unit
    (a LongTensor [O], -1 for dropped units). O(O^2), no dense [O, K] product.
    """
    if isinstance(unmerge, torch.Tensor):
        cols = unmerge.to(sim.device)
    else:
        u = torch.cat([x.to(sim.dtype) for x in unmerge], dim=0)
        cols = torch.where(u.sum(dim=1) > 0, u.argmax(dim=1), torch.full((u.shape[0],), -1, device=u.device))
    keep = cols >= 0
    idx = torch.nonzero(keep).squeeze(1)
    c = cols[idx]
    if c.numel() == 0:
        return float("nan")
    k = int(c.max()) + 1
    sub = sim if idx.numel() == sim.shape[0] else sim.index_select(0, idx).index_select(1, idx)
    per_row = sub.new_zeros(sub.shape[0], k).index_add_(1, c, sub)  # row i: sum over units in each cluster
    within = per_row.gather(1, c[:, None]).squeeze(1) - sub.diagonal()  # row i's sum over its cluster mates
    pair_sum = sub.new_zeros(k).index_add_(0, c, within)
    counts = torch.bincount(c, minlength=k).to(sub.dtype)
    pairs = counts * (counts - 1)
    ok = pairs > 0
    if not bool(ok.any()):
        return float("nan")
    return float((pair_sum[ok] / pairs[ok]).mean())


def identity_pairs(size: int, n: int) -> torch.Tensor:
    """The identity pairing of ``n`` models of ``size`` units, as stacked merged-unit indices."""
    return torch.arange(size).repeat(n)


def space_detail(key: Layout, space: Space, sim: torch.Tensor, mt: Matching, n: int) -> SpaceDetail:
    members = [f"{s.param}[{s.axis}]" for s in space.slots[:6]]
    wide = sim.detach().cpu()
    wide = wide if wide.dtype in (torch.float32, torch.float64) else wide.float()  # sums in float32 at least
    return SpaceDetail(
        name=space_name(key),
        groups=sorted(space.groups),
        size=space.size,
        n_blocks=space.n_blocks,
        members=members,
        similarity=sim.detach().cpu(),
        matching=mt,
        before=matched_similarity(wide, identity_pairs(space.size, n)),
        after=matched_similarity(wide, torch.cat([mt.assignment(m).cpu() for m in range(n)])),
    )
