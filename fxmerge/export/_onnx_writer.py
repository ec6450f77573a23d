"""Writing an ONNX file with torch's exporters: the dynamo exporter first, the TorchScript exporter as fallback."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fxmerge.errors import ExportError
from fxmerge.export import _diagnose
from fxmerge.export._flat import FlatModule

_EXTERNAL_DATA_BYTES = (
    1_500_000_000  # protobuf caps a single ONNX file at 2 GB: larger weights go to a side file
)


@dataclass(frozen=True)
class WriteSpec:
    """What to export: the flat module, its example tensors, names and which inputs/outputs are batched."""

    module: FlatModule
    tensors: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_batched: tuple[bool, ...]
    output_batched: tuple[bool, ...]
    opset: int | None


@dataclass(frozen=True)
class WriteResult:
    """Which exporter produced the file, why the first one was skipped, and tracer warnings worth reading."""

    exporter: str
    fallback_reason: str | None
    warnings: tuple[str, ...]


def write_onnx(spec: WriteSpec, staged: Path) -> WriteResult:
    """Export ``spec`` to ``staged``; on failure of both exporters raise an ExportError naming the blocker."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export_dynamo(spec, staged)
        return WriteResult("dynamo", None, ())
    except Exception as dynamo_exc:
        _remove_partial(staged)
        first_error = dynamo_exc
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _export_torchscript(spec, staged)
    except Exception as script_exc:
        _remove_partial(staged)
        raise _export_failure(spec, first_error, script_exc) from script_exc
    tracer = tuple(
        dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning))
    )
    return WriteResult("torchscript", _diagnose.summary(first_error), tracer)


def _export_dynamo(spec: WriteSpec, staged: Path) -> None:
    shapes = None
    if any(spec.input_batched):
        batch = torch.export.Dim("batch")
        shapes = (tuple({0: batch} if flag else None for flag in spec.input_batched),)
    program = torch.onnx.export(
        spec.module,
        spec.tensors,
        dynamo=True,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        opset_version=spec.opset,
        dynamic_shapes=shapes,
        verbose=False,
    )
    program.save(str(staged), external_data=_weight_bytes(spec) > _EXTERNAL_DATA_BYTES)


def _export_torchscript(spec: WriteSpec, staged: Path) -> None:
    axes = _dynamic_axes(spec.input_names, spec.input_batched)
    axes.update(_dynamic_axes(spec.output_names, spec.output_batched))
    torch.onnx.export(
        spec.module,
        spec.tensors,
        str(staged),
        dynamo=False,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        opset_version=spec.opset,
        dynamic_axes=axes or None,
        do_constant_folding=True,
    )


def _dynamic_axes(names: Sequence[str], batched: Sequence[bool]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name, flag in zip(names, batched, strict=True) if flag}


def _weight_bytes(spec: WriteSpec) -> int:
    state = spec.module.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


def _remove_partial(staged: Path) -> None:
    for leftover in staged.parent.iterdir():
        leftover.unlink(missing_ok=True)


def _export_failure(spec: WriteSpec, dynamo_exc: BaseException, script_exc: BaseException) -> ExportError:
    texts = [str(dynamo_exc), str(script_exc)]
    model_class = type(spec.module.model).__name__
    op = _diagnose.blocking_op(texts)
    if op is not None:
        reason = f"op {op} has no ONNX translation"
        modules = _diagnose.locate_op(spec.module, spec.tensors, op)
        if modules:
            reason += f"; it is called in module {', '.join(modules)}"
    else:
        reason = "both torch exporters failed"
    location = _diagnose.user_code(texts)
    where = f"\n  blamed code: {location}" if location else ""
    return ExportError(
        f"torch.onnx could not export {model_class}: {reason}.{where}\n"
        f"  dynamo exporter: {_diagnose.summary(dynamo_exc)}\n"
        f"  TorchScript exporter: {_diagnose.summary(script_exc)}\n"
        f"Hint: {_diagnose.hint_for(texts, op)}"
    )
