"""Atomic output: everything is written into a locked hidden staging folder next to the target, checked there,
and moved into place with :func:`os.replace` only when complete. A failure (or Ctrl-C, or SIGTERM) leaves no
partial file behind and an existing file at the target untouched; an existing file is replaced only when
fxmerge wrote it (see :mod:`fxmerge.outputs`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from fxmerge.errors import ExportPathError
from fxmerge.outputs import check_file_replaceable, name, staging


def resolve_target(path: str | os.PathLike[str], suffixes: tuple[str, ...] = ()) -> Path:
    """The absolute output path; rejects a folder or a wrong suffix and creates the parent folder."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise ExportPathError(
            f"{name('path')} {target} is a directory; give a file path such as {target / 'model'}{suffixes[0] if suffixes else ''}."
        )
    if suffixes and target.suffix not in suffixes:
        raise ExportPathError(f"{name('path')} {target} should end in {' or '.join(suffixes)}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportPathError(f"cannot create the output folder {target.parent}: {exc.strerror or exc}") from exc
    return target


def check_replaceable(targets: dict[Path, Callable[[Path], bool]]) -> None:
    """Refuse to go on when one of ``targets`` exists and its ownership test does not recognise it."""
    for target, owned in targets.items():
        check_file_replaceable(target, owned, ExportPathError)


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A locked staging folder in ``target``'s folder (same file system), removed on exit whatever happens."""
    with staging(target.parent, target.name, ExportPathError) as stage:
        yield stage


def publish(stage: Path, main: Path, destinations: dict[str, Path]) -> None:
    """Move every file of ``stage`` to ``destinations[name]`` (default: next to ``main``'s target), ``main`` last.

    Side files (such as ONNX external data) land first so that the main file never points at missing data.
    """
    main_target = destinations[main.name]
    for staged in sorted(stage.iterdir()):
        if staged != main:
            os.replace(staged, destinations.get(staged.name, main_target.parent / staged.name))
    os.replace(main, main_target)
