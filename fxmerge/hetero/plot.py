"""Heatmap of a deep-by-shallow similarity (CKA) matrix with a depth alignment drawn on it.

Rendering uses matplotlib's object API with the Agg canvas only: no pyplot, no global backend
switch, no display. The PNG is written to a temporary file next to the target and moved into
place with :func:`os.replace`, so a failed call never leaves a partial file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fxmerge.errors import MergeError
from fxmerge.hetero.depth import MatrixLike, Segmentation, Where, as_similarity_matrix
from fxmerge.plots._png import save_png

__all__ = ["plot_cka_alignment"]

SEGMENT_COLOR = "#ff0000"  # pure red: absent from the viridis colormap, so segments stand out
SLOT_COLOR = "#ffffff"
STAGE_COLOR = "#000000"


def _check_inputs(arr: np.ndarray, segmentation: Segmentation) -> None:
    expected = (segmentation.n_deep, len(segmentation.segments))
    if arr.shape != expected or sum(segmentation.stages_b) != expected[1]:
        raise MergeError(
            f"The matrix has shape {arr.shape} but the segmentation describes {expected[0]} deep and "
            f"{len(segmentation.segments)} shallow blocks; plot the matrix the alignment was computed on."
        )


def _default_figsize(m: int, n: int) -> tuple[float, float]:
    return (min(2.5 + 0.35 * n, 16.0), min(2.0 + 0.3 * m, 16.0))


def _draw(
    fig: Figure, arr: np.ndarray, seg: Segmentation, where: Where, title: str | None, labels: tuple[str, str]
) -> None:
    """Heatmap, one rectangle per segment, a marker at each placement slot, stage boundaries."""
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(arr, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="similarity")
    for k, (start, end) in enumerate(seg.segments):
        ax.add_patch(
            Rectangle(
                (k - 0.5, start - 0.5),
                1.0,
                end - start + 1.0,
                fill=False,
                edgecolor=SEGMENT_COLOR,
                linewidth=2.0,
            )
        )
    slots = seg.slots(where)
    ax.scatter(
        range(len(slots)),
        slots,
        marker="o",
        s=30,
        facecolors=SLOT_COLOR,
        edgecolors=STAGE_COLOR,
        zorder=3,
        label=f"placement ({where})",
    )
    for row in np.cumsum(seg.stages_a)[:-1]:
        ax.axhline(row - 0.5, color=STAGE_COLOR, linestyle="--", linewidth=1.0)
    for col in np.cumsum(seg.stages_b)[:-1]:
        ax.axvline(col - 0.5, color=STAGE_COLOR, linestyle="--", linewidth=1.0)
    ax.set_xlabel(labels[1])
    ax.set_ylabel(labels[0])
    ax.set_title(title if title is not None else f"{seg.method.upper()} alignment, score {seg.score:.3f}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize="small", frameon=False)


def _write_atomic(fig: Figure, path: Path, dpi: int) -> None:
    save_png(fig, path, dpi)


def plot_cka_alignment(
    c: MatrixLike,
    segmentation: Segmentation,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    labels: tuple[str, str] = ("deep model block (A)", "shallow model block (B)"),
    where: Where = "start",
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Save a PNG heatmap of ``c`` (deep rows x shallow columns) with ``segmentation`` drawn on it.

    Each shallow block's deep segment is outlined in red, its placement slot (``where``) is marked
    with a dot, and dashed lines separate stages.

    Args:
        c: the similarity matrix the segmentation was computed on.
        segmentation: result of :func:`fxmerge.hetero.depth.align_stages`.
        path: output PNG path; its directory must exist. An existing file is replaced atomically.
        title: figure title; defaults to the method and score.
        labels: (row axis label, column axis label).
        where: placement convention for the markers, "start" or "end".
        figsize: figure size in inches; the PNG is figsize x dpi pixels. Defaults to a size that
            grows with the matrix.
        dpi: resolution in dots per inch.

    Returns:
        The path written.

    Raises:
        MergeError: if the matrix does not match the segmentation, or the directory is missing.
    """
    arr = as_similarity_matrix(c, need_tall=False)
    _check_inputs(arr, segmentation)
    out = Path(path)
    if not out.parent.is_dir():
        raise MergeError(f"Cannot write {out}: directory {out.parent} does not exist; create it first.")
    if dpi <= 0:
        raise MergeError(f"dpi must be positive, got {dpi}.")
    fig = Figure(figsize=figsize or _default_figsize(*arr.shape), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    _draw(fig, arr, segmentation, where, title, labels)
    _write_atomic(fig, out, dpi)
    return out
