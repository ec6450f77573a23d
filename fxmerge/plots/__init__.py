"""Charts of a merge: per-space similarity heatmaps with the matching, group sizes and coverage, metrics.

All functions write a PNG with matplotlib's Agg canvas (imported lazily) and return its path;
:func:`write_merge_plots` writes the full set for a :class:`~fxmerge.merge.MergeResult`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from fxmerge.plots.groups import frozen_reasons, plot_groups
from fxmerge.plots.metrics import plot_metrics
from fxmerge.plots.similarity import CrossBlock, cross_block, plot_similarity, plot_similarity_summary

__all__ = [
    "CrossBlock",
    "cross_block",
    "frozen_reasons",
    "plot_groups",
    "plot_metrics",
    "plot_similarity",
    "plot_similarity_summary",
    "write_merge_plots",
]


def file_stem(name: str) -> str:
    """A space name such as ``g3x[4 blocks]`` as a safe file-name part (``g3x_4_blocks``)."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "space"


def write_merge_plots(
    result: object,
    folder: str | os.PathLike[str],
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    max_heatmaps: int = 24,
) -> list[Path]:
    """Write ``groups.png``, ``similarity_summary.png``, ``similarity_<space>.png`` (the first
    ``max_heatmaps`` spaces) and, given ``metrics``, ``metrics.png`` into ``folder``; returns the paths."""
    out = Path(folder)
    details = getattr(result, "details", {})
    written = [plot_groups(result.spec, out / "groups.png")]  # type: ignore[attr-defined]
    similarity = result.report.get("similarity", {})  # type: ignore[attr-defined]
    if similarity:
        written.append(plot_similarity_summary(similarity, out / "similarity_summary.png"))
    for name in list(details)[:max_heatmaps]:
        written.append(plot_similarity(details[name], out / f"similarity_{file_stem(name)}.png"))
    if metrics:
        written.append(plot_metrics(metrics, out / "metrics.png"))
    return written
