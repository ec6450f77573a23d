"""CKA alignment heatmap: a valid PNG of the requested size, written atomically."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from fxmerge.errors import MergeError, OutputPathError
from fxmerge.hetero.depth import align_stages
from fxmerge.hetero.plot import plot_cka_alignment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must directly follow the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def matrix_and_segmentation() -> tuple[np.ndarray, object]:
    c = np.random.default_rng(0).random((10, 6))
    return c, align_stages(c, [6, 4], [3, 3], method="lma")


def red_pixels(path: Path) -> int:
    rgb = imread(path)[..., :3]
    return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)).sum())


def test_png_written_with_requested_size(tmp_path: Path) -> None:
    c, seg = matrix_and_segmentation()
    out = plot_cka_alignment(c, seg, tmp_path / "align.png", title="test", figsize=(4.0, 6.0), dpi=50)
    assert out == tmp_path / "align.png"
    assert png_size(out) == (200, 300)
    assert out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align.png"]  # no temp file left


def test_segments_are_drawn(tmp_path: Path) -> None:
    """Segment outlines are pure red, a colour the viridis heatmap never produces."""
    c, seg = matrix_and_segmentation()
    path = plot_cka_alignment(c, seg, tmp_path / "a.png", figsize=(4.0, 6.0), dpi=60, where="end")
    assert red_pixels(path) > 500
    plain = Figure(figsize=(4.0, 6.0), dpi=60)
    plain.add_subplot(1, 1, 1).imshow(c, cmap="viridis", aspect="auto")
    plain.savefig(tmp_path / "plain.png", format="png")
    assert red_pixels(tmp_path / "plain.png") == 0


def test_existing_file_replaced_only_on_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c, seg = matrix_and_segmentation()
    target = tmp_path / "align.png"
    plot_cka_alignment(c, seg, target, figsize=(2.0, 2.0), dpi=40)  # an earlier fxmerge plot
    old = target.read_bytes()

    def failing_savefig(self: Figure, fh, **kwargs) -> None:
        fh.write(PNG_SIGNATURE + b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_cka_alignment(c, seg, target)
    assert target.read_bytes() == old
    with pytest.raises(OSError, match="disk full"):
        plot_cka_alignment(c, seg, tmp_path / "new.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align.png"]
    monkeypatch.undo()
    plot_cka_alignment(c, seg, target, figsize=(3.0, 3.0), dpi=40)
    assert png_size(target) == (120, 120)
    foreign = tmp_path / "photo.png"
    foreign.write_bytes(b"old contents")
    with pytest.raises(OutputPathError, match="not written by fxmerge"):
        plot_cka_alignment(c, seg, foreign)
    assert foreign.read_bytes() == b"old contents"


def test_invalid_inputs_write_nothing(tmp_path: Path) -> None:
    c, seg = matrix_and_segmentation()
    with pytest.raises(MergeError, match="shape \\(9, 6\\)"):
        plot_cka_alignment(c[:9], seg, tmp_path / "x.png")
    with pytest.raises(MergeError, match="does not exist"):
        plot_cka_alignment(c, seg, tmp_path / "missing" / "x.png")
    with pytest.raises(MergeError, match="'start' or 'end'"):
        plot_cka_alignment(c, seg, tmp_path / "x.png", where="middle")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
