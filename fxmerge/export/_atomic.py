"""Atomic output: everything is written into a hidden staging folder next to the target, checked there, and
moved into place with :func:`os.replace` only when complete. A failure leaves no partial file behind and an
existing file at the target untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fxmerge.errors import ExportError


def resolve_target(path: str | os.PathLike[str], suffixes: tuple[str, ...] = ()) -> Path:
    """The absolute output path; creates its parent folder and rejects a folder or a wrong suffix."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise ExportError(
            f"output path {target} is a directory; give a file path such as {target / 'model'}."
        )
    if suffixes and target.suffix not in suffixes:
        raise ExportError(f"output path {target} should end in {' or '.join(suffixes)}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the output folder {target.parent}: {exc}") from exc
    return target


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temporary folder in ``target``'s folder (same file system), removed on exit whatever happens."""
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, main: Path, destinations: dict[str, Path]) -> None:
    """Move every file of ``stage`` to ``destinations[name]`` (default: next to ``main``'s target), ``main`` last.

    Side files (such as ONNX external data) land first so that the main file never points at missing data.
    """
    main_target = destinations[main.name]
    for staged in sorted(stage.iterdir()):
        if staged != main:
            os.replace(staged, destinations.get(staged.name, main_target.parent / staged.name))
    os.replace(main, main_target)
