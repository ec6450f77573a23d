"""Figures on matplotlib's Agg canvas (no pyplot, no global backend switch), saved atomically as PNG.

matplotlib is imported only when a figure is made, so importing :mod:`fxmerge.plots` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` via a temporary file and :func:`os.replace` (no partial file on failure).

    The PNG is tagged as fxmerge's; an existing file at ``path`` is replaced only if fxmerge wrote it
    (:class:`~fxmerge.errors.OutputPathError` otherwise), so a plot never destroys a user's file.
    """
    from fxmerge.errors import OutputPathError
    from fxmerge.outputs import check_file_replaceable

    target = Path(path)
    check_file_replaceable(target, _written_by_fxmerge, OutputPathError)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi, metadata={"Software": _SOFTWARE})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
