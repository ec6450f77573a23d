"""Writing an ONNX file with one of torch's exporters, chosen by the caller; nothing falls back silently.

* ``"dynamo"`` (default): ``torch.export`` captures the graph symbolically. When it cannot (data-dependent
  control flow, an op without translation) the export fails with the reason and the blamed source line.
* ``"trace"``: the TorchScript tracer records the ops the example inputs run through, so a value-dependent
  branch is baked in; :mod:`fxmerge.export._onnx` then checks the file on inputs that take other branches.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from fxmerge.errors import ExportError
from fxmerge.export import _diagnose
from fxmerge.export._flat import FlatModule
from fxmerge.export._translations import translation_table
from fxmerge.outputs import name

EXPORTERS = ("dynamo", "trace")
TRACE_KEYWORD = "exporter='trace'"
MARK_KEY = "fxmerge"  # ONNX metadata_props entry naming the exporter: marks the file as written by fxmerge
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
    """Which exporter produced the file and the tracer warnings worth reading."""

    exporter: str
    warnings: tuple[str, ...]


def write_onnx(spec: WriteSpec, staged: Path, exporter: str) -> WriteResult:
    """Export ``spec`` to ``staged`` with ``exporter``, marked as fxmerge's; raise an ExportError naming the
    blocker when the exporter fails."""
    result = _write_dynamo(spec, staged) if exporter == "dynamo" else _write_trace(spec, staged)
    _mark(staged, exporter)
    return result


def is_fxmerge_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file written by fxmerge (carries the metadata entry :data:`MARK_KEY`)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(p.key == MARK_KEY for p in proto.metadata_props)


def _mark(staged: Path, exporter: str) -> None:
    proto = onnx.load(str(staged), load_external_data=False)
    entry = proto.metadata_props.add()
    entry.key, entry.value = MARK_KEY, exporter
    onnx.save(proto, str(staged))


def _write_dynamo(spec: WriteSpec, staged: Path) -> WriteResult:
    chatter = io.StringIO()  # torch.export prints the partial graph to stderr when it fails
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            _export_dynamo(spec, staged)
    except Exception as exc:
        _remove_partial(staged)
        raise _dynamo_failure(spec, exc) from exc
    return WriteResult("dynamo", ())


def _write_trace(spec: WriteSpec, staged: Path) -> WriteResult:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _export_torchscript(spec, staged)
    except Exception as exc:
        _remove_partial(staged)
        raise _trace_failure(spec, exc) from exc
    tracer = tuple(
        dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning))
    )
    return WriteResult("trace", tracer)


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
        custom_translation_table=translation_table(),
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


def is_data_dependent(texts: Sequence[str]) -> bool:
    """Whether an exporter error is torch.export refusing value-dependent control flow."""
    joined = _diagnose.clean("\n".join(texts))
    return "data-dependent" in joined or "DataDependent" in joined


def _dynamo_failure(spec: WriteSpec, exc: BaseException) -> ExportError:
    texts = [str(exc)]
    model_class = type(spec.module.model).__name__
    location = _diagnose.user_code(texts)
    if is_data_dependent(texts):
        where = f" at {location}" if location else ""
        return ExportError(
            f"torch.export cannot capture {model_class}: its control flow depends on input values (a data-dependent "
            f"branch{where}). An ONNX graph would compute only the branch the example inputs take, so no file was "
            "written.\nHint: rewrite the branch with torch.where or torch.cond, or pass "
            f"{name(TRACE_KEYWORD)} to export the traced branch, which is then checked on your data "
            f"({name('check_data')}) and on inputs that take other branches."
        )
    return _blocker_failure(spec, "dynamo", exc, location)


def _trace_failure(spec: WriteSpec, exc: BaseException) -> ExportError:
    return _blocker_failure(spec, "trace", exc, _diagnose.user_code([str(exc)]))


def _blocker_failure(spec: WriteSpec, exporter: str, exc: BaseException, location: str | None) -> ExportError:
    texts = [str(exc)]
    model_class = type(spec.module.model).__name__
    op = _diagnose.blocking_op(texts)
    if op is not None:
        reason = f"op {op} has no ONNX translation"
        modules = _diagnose.locate_op(spec.module, spec.tensors, op)
        if modules:
            reason += f"; it is called in module {', '.join(modules)}"
    else:
        reason = f"the {exporter} exporter failed"
    where = f"\n  blamed code: {location}" if location else ""
    return ExportError(
        f"torch.onnx could not export {model_class} ({exporter} exporter): {reason}.{where}\n"
        f"  {exporter} exporter: {_diagnose.summary(exc)}\n"
        f"Hint: {_diagnose.hint_for(texts, op)}"
    )
