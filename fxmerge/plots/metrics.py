"""Grouped bar chart of evaluation metrics across methods (or across the parents and the merged model)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fxmerge.errors import MergeError
from fxmerge.plots._png import new_figure, save_png


def plot_metrics(
    metrics: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    ylabel: str = "value",
    dpi: int = 100,
) -> Path:
    """One group of bars per metric, one bar per entry of ``metrics`` (e.g. ``{"average": {"acc": 0.4}, ...}``).

    Metrics missing for an entry are left empty; every bar is labelled with its value.
    """
    if not metrics:
        raise MergeError("plot_metrics needs at least one entry, e.g. {'mudsc': {'accuracy': 0.9}}")
    names = list(metrics)
    keys = list(dict.fromkeys(k for m in metrics.values() for k in m))
    if not keys:
        raise MergeError("plot_metrics: no entry has any metric")
    width = 0.8 / len(names)
    fig = new_figure(min(3.0 + 0.6 * len(keys) * len(names), 20.0), 4.5)
    ax = fig.subplots()
    x = np.arange(len(keys))
    for i, name in enumerate(names):
        values = [_value(metrics[name].get(k)) for k in keys]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in values], fontsize="x-small",
                     padding=1)  # fmt: skip
    ax.set_xticks(x, keys)
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=min(len(names), 4),
              frameon=False)  # fmt: skip
    ax.set_title(title or "metrics")
    return save_png(fig, path, dpi)


def _value(v: float | None) -> float:
    return float("nan") if v is None else float(v)
