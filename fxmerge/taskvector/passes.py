"""Whole-model statistics passes run before any tensor is merged (streamed, scalars/histograms only):
DPPA's layer-adaptive density shifts and the exact global top-k thresholds."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxmerge.taskvector.dppa import BlockStat, ModuleStat, block_of, dp_shifts, is_target, outlier_pct
from fxmerge.taskvector.engine import Context
from fxmerge.taskvector.globalk import GlobalThreshold
from fxmerge.taskvector.plan import Region, TensorPlan
from fxmerge.taskvector.sparsify import keep_count

Tick = Callable[[], None]


def _targets_by_block(plans: list[TensorPlan], target: str) -> dict[str, list[TensorPlan]]:
    groups: dict[str, list[TensorPlan]] = {}
    for p in plans:
        if p.merge and is_target(p.name, len(p.base_region), target):
            groups.setdefault(block_of(p.name), []).append(p)
    return groups


def compute_dp_shifts(ctx: Context, plans: list[TensorPlan], tick: Tick) -> list[dict[str, float]]:
    """DPPA pass 1: per-model DP density shifts from block and module outlier ratios."""
    d = ctx.opts.dppa
    n = len(ctx.models)
    modules: list[dict[str, ModuleStat]] = [{} for _ in range(n)]
    blocks: list[dict[str, BlockStat]] = [{} for _ in range(n)]
    for block, members in _targets_by_block(plans, d.target).items():
        stats = [BlockStat() for _ in range(n)]
        for p in members:
            base = ctx.load_base(p)
            for i in (j for j, r in enumerate(p.regions) if r is not None):
                a = ctx.delta(p, i, base).abs_()
                total = float(a.sum(dtype=torch.float64))
                modules[i][p.name] = ModuleStat(block, a.numel(), total, outlier_pct(a, d.outlier_mult))
                stats[i].numel += a.numel()
                stats[i].abs_sum += total
            tick()
        for p in members:
            base = ctx.load_base(p)
            for i in (j for j, r in enumerate(p.regions) if r is not None):
                mean = stats[i].abs_sum / max(stats[i].numel, 1)
                stats[i].count += int((ctx.delta(p, i, base).abs_() > d.block_outlier_mult * mean).sum())
            tick()
        for i in range(n):
            if stats[i].numel:
                blocks[i][block] = stats[i]
    return [dp_shifts(modules[i], blocks[i], d.shift) for i in range(n)]


def compute_global_thresholds(ctx: Context, plans: list[TensorPlan], densities: list[float],
                              tick: Tick) -> list[GlobalThreshold]:
    """Exact per-model global top-k thresholds (two streamed histogram passes)."""
    merged = [p for p in plans if p.merge]
    totals = [sum(_numel(p.regions[i]) for p in merged if p.regions[i] is not None) for i in range(len(ctx.models))]
    th = [GlobalThreshold(keep_count(densities[i], totals[i])) for i in range(len(ctx.models))]
    for stage in (1, 2):
        for p in merged:
            base = ctx.load_base(p)
            for i in (j for j, r in enumerate(p.regions) if r is not None):
                a = ctx.delta(p, i, base).abs_()
                th[i].add_first(a) if stage == 1 else th[i].add_second(a)
            tick()
        for t in th:
            t.finish_first() if stage == 1 else t.finish_second()
    return th


def _numel(region: Region) -> int:
    n = 1
    for s in region:
        n *= s
    return n
