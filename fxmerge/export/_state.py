"""Saving weights as safetensors with a JSON sidecar that says how to rebuild the module, and loading them.

Layout for ``merged.safetensors``:

* ``merged.safetensors``: one copy of every distinct tensor; the header metadata key ``fxmerge`` holds
  ``{"aliases": {alias: canonical}}`` so tied weights survive even without the sidecar;
* ``merged.safetensors.json``: ``constructor`` (``"package.module:callable"``), ``constructor_kwargs``,
  ``model_class``, ``training``, ``aliases`` and the user's ``meta``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from fxmerge.errors import ExportInputError
from fxmerge.export._atomic import check_replaceable, publish, resolve_target, staging_dir
from fxmerge.export._constructor import build_model, check_json, resolve_constructor
from fxmerge.export._tensors import check_compatible, match_float_dtype, retie, split_aliases

FORMAT = "fxmerge-state"
VERSION = 1
_METADATA_KEY = "fxmerge"
_MAX_HEADER = 100 * 1024 * 1024
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # fmt: skip


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar that accompanies the safetensors file at ``path``."""
    source = Path(path)
    return source.with_name(source.name + ".json")


def save_state(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    constructor: str | None = None,
    constructor_kwargs: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.state_dict()`` to ``path`` (``.safetensors``) plus a JSON sidecar, atomically.

    Tied tensors (several names for one tensor) are stored once and recorded as aliases. ``constructor``
    (``"package.module:callable"``) and ``constructor_kwargs`` let :func:`load_state` rebuild the module;
    the constructor is imported now so that a typo fails at save time. ``meta`` is free JSON metadata.

    The same model always gives the same bytes. An existing file (or sidecar) at ``path`` is replaced only
    when fxmerge wrote it.

    Returns the safetensors path; the sidecar is :func:`sidecar_path` of it.
    """
    if not isinstance(model, nn.Module):
        raise ExportInputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    target = resolve_target(path, (".safetensors",))
    check_replaceable({target: is_fxmerge_state, sidecar_path(target): is_fxmerge_sidecar})
    kwargs = dict(constructor_kwargs or {})
    if constructor is not None:
        resolve_constructor(constructor)
    elif kwargs:
        raise ExportInputError("constructor_kwargs were given without constructor='package.module:callable'.")
    check_json(kwargs, "constructor_kwargs")
    check_json(dict(meta or {}), "meta")
    state = model.state_dict()
    not_tensors = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ExportInputError(
            f"{type(model).__name__}.state_dict() holds non-tensor entries {not_tensors[:8]} (extra state), which "
            "safetensors cannot store; use save_program, or keep that state in the constructor kwargs."
        )
    meta_tensors = [name for name, t in state.items() if t.is_meta]
    if meta_tensors:
        raise ExportInputError(
            f"{type(model).__name__} has tensors without data (meta device): {meta_tensors[:8]}."
        )
    tensors, aliases = split_aliases(state)
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "constructor": constructor,
        "constructor_kwargs": kwargs,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "training": model.training,
        "aliases": aliases,
        "meta": dict(meta or {}),
    }
    _write(target, tensors, aliases, sidecar)
    return target


def load_state(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a module from ``path`` written by :func:`save_state`, or load the weights into ``model``.

    Without ``model`` the sidecar's constructor is imported and called with its kwargs (a file names code to
    run: load only files you trust), converted to the saved floating dtype and set to the saved train/eval
    mode. With ``model`` the weights are loaded into it in place and it is returned. Either way every key,
    shape and dtype is checked first, so on error the model is left untouched; tied weights recorded at save
    time are re-tied.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise ExportInputError(f"no safetensors file at {source}; write one with fxmerge.export.save_state.")
    sidecar = _read_sidecar(source)
    stored, file_aliases = _read_tensors(source)
    aliases = {**file_aliases, **(sidecar or {}).get("aliases", {})}
    state = _expand(stored, aliases, source)
    if model is None:
        model = _rebuild(source, sidecar, state)
    elif not isinstance(model, nn.Module):
        raise ExportInputError(f"model must be a torch.nn.Module or None, got {type(model).__name__}.")
    check_compatible(model, state, str(source))
    model.load_state_dict(state, strict=True)
    retie(model, aliases)
    return model


def _write(target: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str], sidecar: dict) -> None:
    side_target = sidecar_path(target)
    with staging_dir(target) as stage:
        staged = stage / target.name
        metadata = {"format": "pt", _METADATA_KEY: json.dumps({"version": VERSION, "aliases": aliases}, sort_keys=True)}
        write_safetensors(staged, tensors, metadata)
        (stage / side_target.name).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        publish(stage, staged, {target.name: target, side_target.name: side_target})


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """A safetensors file with a deterministic layout: header keys and data in a fixed order (wider dtypes
    first, then by name, so every tensor is aligned to its element size), metadata keys sorted."""
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _CODES})
    if unknown:
        raise ExportInputError(f"safetensors cannot store dtype(s) {', '.join(unknown)}.")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            flat = tensors[key].detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                fh.write(memoryview(flat.view(torch.uint8).numpy()))


def is_fxmerge_state(path: Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_state` (its header carries fxmerge's key)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size)) if size <= _MAX_HEADER else {}
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(header, dict) and _METADATA_KEY in (header.get("__metadata__") or {})


def is_fxmerge_sidecar(path: Path) -> bool:
    """Whether ``path`` is a JSON sidecar written by :func:`save_state`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _read_sidecar(source: Path) -> dict | None:
    side = sidecar_path(source)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportInputError(f"cannot read the sidecar {side}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportInputError(f'{side} is not an fxmerge state sidecar (expected "format": "{FORMAT}").')
    if data.get("version") != VERSION:
        raise ExportInputError(
            f"{side} has format version {data.get('version')!r}; this fxmerge reads version {VERSION}."
        )
    return data


def _read_tensors(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(source))
    except Exception as exc:
        raise ExportInputError(f"{source} is not a readable safetensors file: {exc}") from exc
    try:
        aliases = json.loads(metadata.get(_METADATA_KEY, "{}")).get("aliases", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ExportInputError(f"{source} has unreadable fxmerge metadata: {exc}") from exc
    return tensors, aliases


def _expand(
    stored: dict[str, torch.Tensor], aliases: dict[str, str], source: Path
) -> dict[str, torch.Tensor]:
    state = dict(stored)
    for alias, canonical in aliases.items():
        if canonical not in stored:
            raise ExportInputError(f"{source} records {alias!r} as a copy of {canonical!r}, which the file lacks.")
        state[alias] = stored[canonical]
    return state


def _rebuild(source: Path, sidecar: dict | None, state: dict[str, torch.Tensor]) -> nn.Module:
    if sidecar is None:
        raise ExportInputError(
            f"no sidecar {sidecar_path(source)} next to {source}, so the module cannot be rebuilt: pass "
            "model=<an instance of the saved architecture>."
        )
    spec = sidecar.get("constructor")
    if spec is None:
        raise ExportInputError(
            f"{source} was saved without a constructor (model class {sidecar.get('model_class')}); pass "
            "model=<an instance of it>, or save with save_state(..., constructor='package.module:callable')."
        )
    model = match_float_dtype(build_model(spec, sidecar.get("constructor_kwargs") or {}), state)
    return model.train(bool(sidecar.get("training", False)))
