"""Where fxmerge writes, and what it may replace.

* **Outputs never touch inputs.** :func:`check_disjoint` refuses an output path that is, contains or lies
  inside an input path; both are resolved through symlinks first.
* **Only fxmerge's own files are replaced.** An output folder carries a manifest (:data:`MANIFEST`) listing the
  files fxmerge wrote there, with their sizes; replacing the folder is refused while it holds anything else
  (:func:`check_output_dir`). A single output file is replaced only when it carries fxmerge's mark
  (:func:`check_file_replaceable` with a format-specific test).
* **Staging.** Every output is written into a hidden staging folder next to its target and moved into place
  only when complete (:func:`staging`). The folder is locked (``flock``) while its run lives, removed on
  errors, Ctrl-C and SIGTERM, and a later run into the same place removes the ones whose run died (SIGKILL,
  power loss): an unlocked staging folder belongs to no living process.
* **Wording.** Messages name an option by its Python keyword (``overwrite=True``), or by the command-line flag
  (``--overwrite``) while a CLI command runs (:func:`cli_names`, :func:`name`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no locks, so no stale-folder cleaning
    fcntl = None  # type: ignore[assignment]

MANIFEST = ".fxmerge-manifest.json"
MANIFEST_FORMAT = "fxmerge-output"
STAGE_SUFFIX = ".fxmerge-stage"
_NEW_SUFFIX = ".fxmerge-new"
_MAX_LISTED = 6

ErrorType = Callable[[str], Exception]
Inputs = Iterable[tuple[str, "str | os.PathLike[str]"]]

# ------------------------------------------------------------------------------------------- wording

_NAMES: ContextVar[Mapping[str, str] | None] = ContextVar("fxmerge_cli_names", default=None)


def name(keyword: str) -> str:
    """How a message names an option: ``keyword`` (e.g. ``"overwrite=True"``), or its CLI flag while a command
    runs under :func:`cli_names`."""
    names = _NAMES.get()
    return names.get(keyword, keyword) if names else keyword


@contextlib.contextmanager
def cli_names(names: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`name` maps Python keywords to the command's flags (``{"out": "--out"}``)."""
    token = _NAMES.set(dict(names))
    try:
        yield
    finally:
        _NAMES.reset(token)


# ------------------------------------------------------------------------------------ inputs vs outputs


def real(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with ``~`` expanded and every symlink resolved (the path need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def overlap(out: Path, inp: Path) -> str | None:
    """How the resolved output ``out`` relates to the resolved input ``inp``: ``"is"``, ``"contains"``,
    ``"lies inside"``, or None when they are disjoint."""
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def check_disjoint(out: str | os.PathLike[str], inputs: Inputs, error: ErrorType, keyword: str = "out") -> None:
    """Raise ``error`` when the output path is, contains or lies inside one of ``inputs`` (label, path);
    ``keyword`` names the output in the message."""
    target = real(out)
    for label, path in inputs:
        source = real(path)
        relation = overlap(target, source)
        if relation is not None:
            raise error(
                f"{name(keyword)} {out} {relation} the input {label} ({source}); fxmerge never writes where its "
                f"inputs are: choose another {name(keyword)}"
            )


# ------------------------------------------------------------------------------------------- staging


def _stage_pattern(base: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(base)}\.[0-9a-f]{{16}}{re.escape(STAGE_SUFFIX)}$")


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_stale(parent: Path, base: str) -> list[Path]:
    """Remove the staging folders for output ``base`` in ``parent`` whose run is gone (not locked); returns them."""
    if fcntl is None or not parent.is_dir():
        return []
    pattern, removed = _stage_pattern(base), []
    with os.scandir(parent) as entries:
        candidates = [Path(e.path) for e in entries if pattern.match(e.name) and e.is_dir(follow_symlinks=False)]
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


class Stage:
    """A hidden folder ``.BASE.<16 hex>.fxmerge-stage`` in ``parent``, locked until :meth:`discard`.

    It is created under a temporary name and renamed only once locked, so a concurrent run's stale-folder
    cleaning can never take it for a dead one.
    """

    def __init__(self, parent: Path, base: str, error: ErrorType) -> None:
        token = secrets.token_hex(8)
        fresh = parent / f".{base}.{token}{_NEW_SUFFIX}"
        self.path = parent / f".{base}.{token}{STAGE_SUFFIX}"
        self._fd: int | None = None
        try:
            fresh.mkdir(mode=0o700)
            self._fd = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY)
            _try_lock(self._fd)
            os.rename(fresh, self.path)
        except OSError as exc:
            self.release()
            with contextlib.suppress(OSError):
                fresh.rmdir()
            raise error(f"cannot write in {parent}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        """Drop the lock (the folder stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the folder if it is still there (it is gone once published), then drop the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()


def open_stage(parent: Path, base: str, error: ErrorType) -> Stage:
    """Clean dead staging folders of ``base`` in ``parent``, then make a fresh locked one."""
    remove_stale(parent, base)
    return Stage(parent, base, error)


@contextlib.contextmanager
def staging(parent: Path, base: str, error: ErrorType) -> Iterator[Path]:
    """A locked staging folder for output ``base`` in ``parent``, removed on exit whatever happens (SIGTERM
    included); dead ones from earlier runs are removed first."""
    stage = open_stage(parent, base, error)
    try:
        with terminate_raises():
            yield stage.path
    finally:
        stage.discard()


def _raise_terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While active, SIGTERM raises ``SystemExit(143)`` in the main thread, so ``finally`` blocks (staging
    clean-up) run before the process ends. Only installed over the default handler, from the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------- output folders


def _listing(folder: Path) -> dict[str, int]:
    files = (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files if p != folder / MANIFEST}


def write_manifest(folder: Path) -> None:
    """Record every file under ``folder`` (relative path -> size) in its manifest; deterministic bytes."""
    doc = {"format": MANIFEST_FORMAT, "version": 1, "files": dict(sorted(_listing(folder).items()))}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")


def read_manifest(folder: Path) -> dict[str, int]:
    """The files the manifest of ``folder`` lists (empty when it has none or it is unreadable)."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None
    return {str(k): v for k, v in files.items() if isinstance(v, int)} if isinstance(files, dict) else {}


def foreign_entries(folder: Path) -> list[str]:
    """Everything under ``folder`` that fxmerge did not write there: files its manifest does not list (or lists
    with another size), symlinks and special files. Empty folders are not counted."""
    listed, found = read_manifest(folder), []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or listed.get(rel) != path.stat().st_size:
            found.append(rel)
    return found


def _shown(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def check_replaceable_dir(out: Path, error: ErrorType, keyword: str = "out") -> None:
    """Raise ``error`` unless every file in the existing folder ``out`` was written there by fxmerge."""
    foreign = foreign_entries(out)
    if foreign:
        raise error(
            f"{name(keyword)} {out} holds files fxmerge did not write ({_shown(foreign)}); fxmerge replaces only "
            f"its own earlier output and never deletes other files: move them, or choose another {name(keyword)}"
        )


def check_output_dir(out: str | os.PathLike[str], *, overwrite: bool, inputs: Inputs, error: ErrorType,
                     keyword: str = "out") -> Path:  # fmt: skip
    """The absolute output folder after every check that needs no work: it is disjoint from ``inputs``, is not
    a file or a symlink, and is new, empty, or (with ``overwrite``) an earlier fxmerge output. ``keyword``
    names the output in messages."""
    path = Path(out).expanduser().absolute()
    check_disjoint(path, inputs, error, keyword)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise error(f"{name(keyword)} {path} exists and is not a folder; give the path of a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise error(
                f"{name(keyword)} {path} exists and is not empty; pass {name('overwrite=True')} to replace an "
                f"earlier fxmerge output, or choose a new {name(keyword)}"
            )
        check_replaceable_dir(path, error, keyword)
    existing_ancestor(path, error)
    return path


def existing_ancestor(path: Path, error: ErrorType) -> Path:
    """The nearest existing folder above ``path``."""
    for parent in path.parents:
        if parent.is_dir():
            return parent
    raise error(f"no existing folder above {path}")


def _share(folder: Path) -> None:
    """Give the staged tree the permissions the umask allows (staging folders are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def publish_dir(stage: Path, out: Path, error: ErrorType, *, overwrite: bool, keyword: str = "out") -> None:
    """Write ``stage``'s manifest and move it to ``out``; an existing ``out`` (an earlier fxmerge output, checked
    again now: it may have appeared while the run worked) is moved into a staging folder first and removed once
    the new one is in place."""
    write_manifest(stage)
    _share(stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out.is_dir() and any(out.iterdir())):
        os.replace(stage, out)
        return
    if not overwrite:
        raise error(f"{name(keyword)} {out} was filled while this run worked; pass {name('overwrite=True')} to "
                    "replace it, or choose a new one")  # fmt: skip
    check_replaceable_dir(out, error, keyword)
    old = open_stage(out.parent, out.name, error)
    try:
        os.replace(out, old.path / "previous")
        try:
            os.replace(stage, out)
        except OSError:
            os.replace(old.path / "previous", out)
            raise
    finally:
        old.discard()


# -------------------------------------------------------------------------------------- output files


def check_file_replaceable(target: Path, owned: Callable[[Path], bool], error: ErrorType,
                           keyword: str = "path") -> None:  # fmt: skip
    """Raise ``error`` when ``target`` exists and ``owned(target)`` does not recognise it as fxmerge's."""
    if target.is_symlink() or (target.exists() and not (target.is_file() and owned(target))):
        raise error(
            f"{target} exists and was not written by fxmerge; fxmerge never replaces other files: delete it "
            f"yourself, or choose another {name(keyword)}"
        )


def write_owned_file(target: Path, write: Callable[[IO[bytes]], None], owned: Callable[[Path], bool],
                     error: ErrorType, keyword: str = "path") -> Path:  # fmt: skip
    """Write one user-named file atomically (temporary file + rename, usual permissions); an existing file is
    replaced only if ``owned`` recognises it as fxmerge's."""
    check_file_replaceable(target, owned, error, keyword)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
