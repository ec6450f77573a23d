"""How every ``fxmerge`` command reports: the output settings (``--quiet``, ``--json``) and the error surface
(one ``error:`` line, the JSON failure document, the exit status of each kind of failure)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from fxmerge.errors import FxmergeError, InputError
from fxmerge.outputs import cli_names

__all__ = ["DEBUG_ENV", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_WORK", "TERMINATED", "Failure", "Output", "classify",
           "exit_status", "one_line", "report_failure"]  # fmt: skip

EXIT_WORK, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130
TERMINATED = 128 + signal.SIGTERM  # the SystemExit status SIGTERM raises while staging folders are open
DEBUG_ENV = "FXMERGE_TRACEBACK"  # set to 1 to print the traceback of an unexpected error


@dataclass(frozen=True)
class Output:
    """How a command reports: human text or one JSON document, with or without progress and status lines."""

    quiet: bool = False
    as_json: bool = False

    @property
    def progress(self) -> bool:
        return not self.quiet

    def status(self, message: str) -> None:
        """A progress line on stderr (silenced by --quiet and --json)."""
        if not (self.quiet or self.as_json):
            click.echo(message, err=True)

    def result(self, text: str, obj: Any) -> None:
        """The command's result: ``obj`` as JSON with --json, else ``text``."""
        click.echo(json.dumps(obj, indent=1) if self.as_json else text)

    @contextlib.contextmanager
    def working(self, names: Mapping[str, str] | None = None) -> Iterator[None]:
        """Around the work: --quiet drops warnings; --json keeps stray prints off stdout; messages name the
        command's flags (``names``: Python keyword -> flag) instead of the Python keywords."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(cli_names(names or {}))
            if self.quiet:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            if self.as_json:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            yield


# ------------------------------------------------------------------------------------- the error surface


@dataclass(frozen=True)
class Failure:
    """One failed command, as reported: message, error type and exit status."""

    message: str
    error_type: str
    status: int
    details: list[str] = field(default_factory=list)


def classify(exc: BaseException) -> Failure:
    """The report of ``exc``: input errors exit 2, failed work 1, interruptions 130/143."""
    if isinstance(exc, click.ClickException):
        return Failure(exc.format_message(), "UsageError", EXIT_INPUT)
    if isinstance(exc, (click.Abort, KeyboardInterrupt)):
        return Failure("interrupted", "Interrupted", EXIT_INTERRUPTED)
    if isinstance(exc, SystemExit):
        return Failure("terminated", "Terminated", exit_status(exc.code))
    if isinstance(exc, FxmergeError):
        return Failure(str(exc), type(exc).__name__, EXIT_INPUT if isinstance(exc, InputError) else EXIT_WORK)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return Failure(f"{exc.strerror or exc}{where}", type(exc).__name__, EXIT_WORK)
    trace = traceback.format_exception(exc) if os.environ.get(DEBUG_ENV) else []
    return Failure(f"internal error, please report it: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the "
                   "traceback)", type(exc).__name__, EXIT_WORK, trace)  # fmt: skip


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined with ``; `` (or a space after a colon)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def report_failure(failure: Failure, as_json: bool) -> int:
    """Print ``failure`` (one stderr line; the JSON document on stdout with --json); returns the exit status."""
    for chunk in failure.details:
        click.echo(chunk, err=True, nl=False)
    message = one_line(failure.message)
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "error_type": failure.error_type}))
    return failure.status


def exit_status(code: object) -> int:
    """The process exit status ``sys.exit(code)`` would give (a message is printed to stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
