"""Constructor specs ``"package.module:callable"``: validation, import and call.

A spec names code that :func:`fxmerge.export.load_state` imports and calls, so a state file is as trusted as
the code it names. Standard-library callables (``os:system``, ``builtins:eval`` ...) are refused outright.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fxmerge.errors import ExportInputError

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def resolve_constructor(spec: str) -> Callable[..., Any]:
    """Import the callable named by ``spec`` (``"package.module:attr.path"``) and return it."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ExportInputError(
            f"constructor {spec!r} is not of the form 'package.module:callable' (e.g. 'mypackage.models:build_model')."
        )
    module_name, attr_path = spec.split(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top == "__main__":
        raise ExportInputError(
            f"constructor {spec!r} points into {top!r}, which cannot rebuild a model in another process (or is "
            "the standard library); name a function or class in an importable package of yours."
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a missing module, or any error (even a SyntaxError) raised while importing it
        raise ExportInputError(
            f"constructor {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})."
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ExportInputError(f"constructor {spec!r}: {module_name!r} has no attribute {attr_path!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise ExportInputError(f"constructor {spec!r} names a {type(target).__name__}, not a callable.")
    return target


def build_model(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call the constructor named by ``spec`` with ``kwargs`` and check that it returns an nn.Module."""
    constructor = resolve_constructor(spec)
    try:
        model = constructor(**kwargs)
    except Exception as exc:
        raise ExportInputError(
            f"constructor {spec!r} failed with kwargs {dict(kwargs)!r} ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ExportInputError(f"constructor {spec!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def check_json(value: object, field: str) -> None:
    """Raise an ExportError naming ``field`` when ``value`` cannot be written as JSON."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExportInputError(
            f"{field} must be JSON-serialisable (str, numbers, bools, None, lists, dicts with str keys): {exc}."
        ) from exc
