"""Group sizes and coverage (permutable vs frozen parameter axes) of a PermutationSpec."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from fxmerge.ir.spec import PermutationSpec
from fxmerge.plots._png import new_figure, save_png

KIND_COLORS = {"plain": "#1f77b4", "blocks": "#ff7f0e", "inner": "#2ca02c"}
MAX_REASONS = 8


def frozen_reasons(spec: PermutationSpec) -> Counter[str]:
    """Frozen parameter axes counted by reason, the reason cut before its location details."""
    return Counter(_short(f.reason) for f in spec.coverage.frozen)


def _short(reason: str) -> str:
    head = re.split(r" \(| at |;", reason, maxsplit=1)[0].strip()
    return head if len(head) <= 40 else head[:37] + "..."


def plot_groups(spec: PermutationSpec, path: str | os.PathLike[str], *, title: str | None = None,
                dpi: int = 100) -> Path:
    """Left: the size of every group (coloured by kind: plain, blocks of heads, inner). Right: parameter axes
    that are permutable vs frozen, frozen ones split by reason."""
    fig = new_figure(12.0, 4.5)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    ids = np.arange(len(spec.groups))
    sizes = [g.size for g in spec.groups]
    colors = [KIND_COLORS.get(g.kind, "#7f7f7f") for g in spec.groups]
    left.bar(ids, sizes, color=colors, width=0.8 if len(ids) < 80 else 1.0)
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    kinds = [k for k in KIND_COLORS if any(g.kind == k for g in spec.groups)]
    if kinds:
        left.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in kinds], fontsize="small")

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("group id")
    left.set_ylabel("group size (units)")
    left.set_title(f"{len(spec.groups)} permutation groups")
    _coverage(right, spec)
    cov = spec.coverage
    fig.suptitle(title or f"coverage: {cov.n_permutable_axes}/{cov.n_axes} parameter axes permutable, "
                          f"{100 * cov.permutable_fraction:.1f}% of elements touched by a group")  # fmt: skip
    return save_png(fig, path, dpi)


def _coverage(ax, spec: PermutationSpec) -> None:
    cov = spec.coverage
    reasons = frozen_reasons(spec).most_common()
    shown = reasons[:MAX_REASONS]
    rest = sum(n for _, n in reasons[MAX_REASONS:])
    labels = ["permutable", *[f"frozen: {r}" for r, _ in shown]] + (["frozen: other"] if rest else [])
    counts = [cov.n_permutable_axes, *[n for _, n in shown]] + ([rest] if rest else [])
    colors = ["#2ca02c"] + ["#d62728"] * (len(counts) - 1)
    y = np.arange(len(labels))
    ax.barh(y, counts, color=colors)
    ax.set_yticks(y, labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("parameter axes")
    ax.set_title(f"{cov.n_axes} parameter axes")
