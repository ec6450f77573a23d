"""Figures on matplotlib's Agg canvas (no pyplot, no global backend switch), saved atomically as PNG.

matplotlib is imported only when a figure is made, so importing :mod:`fxmerge.plots` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A ``matplotlib.figure.Figure`` attached to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_SOFTWARE = "fxmerge"


def _written_by_fxmerge(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get("Software") == _SOFTWARE
    except Exception:
        return False


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically (no partial file on failure).

    The PNG is tagged as fxmerge's; an existing file at ``path`` is replaced only if fxmerge wrote it
    (:class:`~fxmerge.errors.OutputPathError` otherwise), so a plot never destroys a user's file.
    """
    from fxmerge.errors import OutputPathError
    from fxmerge.outputs import write_owned_file

    def write(fh) -> None:
        fig.savefig(fh, format="png", dpi=dpi, metadata={"Software": _SOFTWARE})

    return write_owned_file(Path(path), write, _written_by_fxmerge, OutputPathError)
