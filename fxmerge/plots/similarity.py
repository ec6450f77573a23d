"""Per-space similarity heatmaps with the chosen matching drawn on, and a before/after summary chart."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxmerge.errors import MergeError
from fxmerge.merge.report import SpaceDetail
from fxmerge.plots._png import new_figure, save_png

MARK_LIMIT = 96  # draw a marker per matched pair only up to this many units per model


@dataclass(frozen=True)
class CrossBlock:
    """The similarity of model ``a``'s units (rows) to model ``b``'s units (columns).

    ``before`` is in the models' own unit order (the identity pairing sits on the diagonal); ``after`` has
    ``b``'s columns reordered by the matching, so that ``b``'s unit merged with row ``i`` sits in column
    ``i`` (units of ``b`` merged with no unit of ``a`` go last). ``pairs`` are the (row, column) cells of
    ``after`` whose units were merged together.
    """

    before: np.ndarray
    after: np.ndarray
    column_order: np.ndarray
    pairs: list[tuple[int, int]]


def cross_block(detail: SpaceDetail, a: int = 0, b: int = 1) -> CrossBlock:
    """Rows of model ``a`` against columns of model ``b``, before and after the matching (see :class:`CrossBlock`)."""
    sizes = detail.matching.sizes
    if not (0 <= a < len(sizes) and 0 <= b < len(sizes)) or a == b:
        raise MergeError(f"models ({a}, {b}) must be two different indices below {len(sizes)}")
    sim = detail.similarity.detach().double().cpu().numpy()
    if sim.shape != (sum(sizes), sum(sizes)):
        raise MergeError(f"space {detail.name}: similarity {sim.shape} does not stack the units {sizes}")
    off = np.cumsum([0, *sizes])
    block = sim[off[a] : off[a + 1], off[b] : off[b + 1]]
    ua = detail.matching.assignment(a).cpu().numpy()
    ub = detail.matching.assignment(b).cpu().numpy()
    first_row: dict[int, int] = {}
    for row, k in enumerate(ua):
        if k >= 0:
            first_row.setdefault(int(k), row)
    keys = [first_row.get(int(k), len(ua) + (int(k) if k >= 0 else len(ub))) for k in ub]
    order = np.argsort(np.asarray(keys), kind="stable")
    after = block[:, order]
    ub_sorted = ub[order]
    rows, cols = np.nonzero((ua[:, None] == ub_sorted[None, :]) & (ua[:, None] >= 0))
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    return CrossBlock(block, after, order, pairs)


def plot_similarity(
    detail: SpaceDetail,
    path: str | os.PathLike[str],
    *,
    models: tuple[int, int] = (0, 1),
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Heatmaps of one merge space: model ``a`` vs ``b`` before (own order) and after the matching.

    The right panel reorders ``b``'s units by the matching, so a good alignment shows a bright diagonal;
    merged pairs are marked (for spaces of at most ``MARK_LIMIT`` units).
    """
    cb = cross_block(detail, *models)
    a, b = models
    fig = new_figure(11.0, 5.0)
    axes = fig.subplots(1, 2)
    finite = np.concatenate([cb.before.ravel(), [0.0]])
    vmax = float(np.nanmax(np.abs(finite))) or 1.0
    panels = [(cb.before, f"before (identity): {_fmt(detail.before)}"),
              (cb.after, f"after ({detail.matching.width} merged units): {_fmt(detail.after)}")]  # fmt: skip
    for ax, (arr, label) in zip(axes, panels, strict=True):
        image = ax.imshow(arr, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
        ax.set_title(label, fontsize="medium")
        ax.set_ylabel(f"model {a} units")
        ax.set_xlabel(f"model {b} units" + (" (matched order)" if arr is cb.after else ""))
    if cb.pairs and max(cb.before.shape) <= MARK_LIMIT:
        rows, cols = zip(*cb.pairs, strict=True)
        axes[1].scatter(cols, rows, s=max(4.0, 400.0 / max(cb.before.shape)), facecolors="none",
                        edgecolors="black", linewidths=0.8, label="merged pair")  # fmt: skip
        axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", frameon=False)
    fig.colorbar(image, ax=list(axes), label="similarity", shrink=0.9)
    fig.suptitle(title or f"space {detail.name} (groups {detail.groups}, {detail.size} units)")
    return save_png(fig, path, dpi)


def plot_similarity_summary(
    similarity: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Mean matched similarity per space, before vs after, from ``result.report["similarity"]``."""
    names = list(similarity)
    before = [_num(similarity[n].get("before")) for n in names]
    after = [_num(similarity[n].get("after")) for n in names]
    fig = new_figure(min(3.0 + 0.35 * len(names), 24.0), 4.0)
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, before, 0.4, label="before (identity)", color="#9e9e9e")
    ax.bar(x + 0.2, after, 0.4, label="after (matching)", color="#1f77b4")
    ax.set_xticks(x, names, rotation=90 if len(names) > 8 else 0, fontsize="small")
    ax.set_ylabel("mean similarity of merged pairs")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.legend(fontsize="small")
    ax.set_title(title or "similarity per merge space")
    return save_png(fig, path, dpi)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
