"""Validation errors as the YAML user reads them: one ``field.path: message`` line per problem."""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

__all__ = ["config_message", "format_validation_error", "suggest"]


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """``field.path: message`` lines; unknown keys list the allowed keys of the model that holds them (fields of
    ``root``, the validated top-level model, followed down the path) and the closest match."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _dotted(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            msg = f"unknown key {loc[-1]!r}"
            if allowed:
                msg += f"; allowed: {', '.join(allowed)}{suggest(str(loc[-1]), allowed)}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                msg += f" (got {err['input']!r})"
        lines.append(f"{path or '<top level>'}: {msg}")
    return lines


def _dotted(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        cls = _inner_model(field.annotation) if field is not None else None
    return list(cls.model_fields) if cls is not None else []


def _inner_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def config_message(source: str, lines: list[str]) -> str:
    return f"{source} is invalid:\n" + "\n".join(f"  {line}" for line in lines)
