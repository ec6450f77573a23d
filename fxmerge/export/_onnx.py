"""Verified ONNX export: write atomically, run the ONNX checker, compare onnxruntime against PyTorch."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fxmerge.errors import ExportError
from fxmerge.export._atomic import publish, resolve_target, staging_dir
from fxmerge.export._compare import CheckResult, compare_outputs
from fxmerge.export._flat import FlatModule, output_name, reference_outputs
from fxmerge.export._inputs import (
    ExampleInputs,
    eval_copy,
    other_batch_size,
    parse_example_inputs,
    random_inputs,
    unique_names,
)
from fxmerge.export._onnx_writer import WriteResult, WriteSpec, write_onnx


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduced PyTorch.

    ``max_abs_diff`` / ``max_rel_diff`` are the worst over all checks (see :mod:`fxmerge.export._compare`
    for the definitions); ``checks`` holds one entry per compared batch.
    """

    path: Path
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    checked_batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    dynamic_batch: bool
    checks: tuple[CheckResult, ...]
    fallback_reason: str | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the report."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data


def export_onnx(
    model: nn.Module,
    example_inputs: object,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    n_random_checks: int = 1,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and verify it in onnxruntime against PyTorch.

    A deep copy of the model in eval mode is exported (dynamo exporter first, TorchScript exporter as
    fallback), the file is checked with ``onnx.checker`` and run with the CPU execution provider on the
    example inputs and on ``n_random_checks`` fresh random batches (same dtype and value range; another batch
    size when ``dynamic_batch``). The file appears at ``path`` only when every check passes.

    Args:
        model: the module to export; it is never modified.
        example_inputs: a tensor, a tuple of tensors, or a tuple whose last element is a dict of keyword tensors.
        path: output ``.onnx`` file; missing parent folders are created.
        dynamic_batch: make dim 0 of every input whose dim 0 equals the example batch size dynamic.
        opset: ONNX opset to target (torch's default when None).
        atol, rtol: an element passes when ``|ort - torch| <= atol + rtol * |torch|``.
        n_random_checks: number of random batches compared in addition to the examples.
        seed: seed of the torch.Generator drawing the random batches.

    Raises:
        ExportError: the model cannot be exported (names the blocking op and module), the ONNX checker or
            onnxruntime rejects the file, or the outputs differ beyond tolerance (``.max_abs_diff`` and
            ``.max_rel_diff`` set).
    """
    _validate_options(atol, rtol, n_random_checks, opset)
    target = resolve_target(path, (".onnx",))
    inputs = parse_example_inputs(model, example_inputs)
    flat_model = FlatModule(eval_copy(model), inputs).eval()
    spec = _write_spec(flat_model, inputs, dynamic_batch, opset)
    with staging_dir(target) as stage:
        staged = stage / target.name
        written = write_onnx(spec, staged)
        _check_model(staged)
        checks = _run_checks(staged, spec, inputs, n_random_checks, seed, atol, rtol, dynamic_batch)
        _raise_on_mismatch(checks, atol, rtol, written)
        opset_used = _opset_of(staged)
        publish(stage, staged, {target.name: target})
    return _report(target, spec, written, checks, opset_used, atol, rtol, dynamic_batch)


def _validate_options(atol: float, rtol: float, n_random_checks: int, opset: int | None) -> None:
    if atol < 0 or rtol < 0:
        raise ExportError(f"atol and rtol must be >= 0; got atol={atol}, rtol={rtol}.")
    if isinstance(n_random_checks, bool) or not isinstance(n_random_checks, int) or n_random_checks < 0:
        raise ExportError(f"n_random_checks must be an integer >= 0; got {n_random_checks!r}.")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ExportError(f"opset must be None or an ONNX opset number such as 18; got {opset!r}.")


def _write_spec(
    flat_model: FlatModule, inputs: ExampleInputs, dynamic_batch: bool, opset: int | None
) -> WriteSpec:
    batch = inputs.batch_size()
    if dynamic_batch and batch is None:
        raise ExportError(
            "dynamic_batch=True needs an input with a batch dimension (dim 0), but every example input is a "
            "scalar; pass dynamic_batch=False."
        )
    outputs = reference_outputs(flat_model, inputs.tensors)
    input_batched = inputs.batch_flags() if dynamic_batch else tuple(False for _ in inputs.tensors)
    output_batched = tuple(dynamic_batch and t.dim() >= 1 and int(t.shape[0]) == batch for _, t in outputs)
    output_names = unique_names([output_name(p) for p, _ in outputs], taken=inputs.names)
    return WriteSpec(
        module=flat_model,
        tensors=inputs.tensors,
        input_names=inputs.names,
        output_names=tuple(output_names),
        input_batched=input_batched,
        output_batched=output_batched,
        opset=opset,
    )


def _check_model(staged: Path) -> None:
    try:
        onnx.checker.check_model(str(staged))
    except Exception as exc:
        raise ExportError(f"the exported file fails onnx.checker: {exc}") from exc


def _run_checks(
    staged: Path,
    spec: WriteSpec,
    inputs: ExampleInputs,
    n_random: int,
    seed: int,
    atol: float,
    rtol: float,
    dynamic_batch: bool,
) -> tuple[CheckResult, ...]:
    session = _session(staged)
    batch = inputs.batch_size()
    random_batch = other_batch_size(batch) if dynamic_batch and batch is not None else batch
    generator = torch.Generator().manual_seed(seed)
    cases = [("example inputs", inputs.tensors, batch)]
    cases += [
        (f"random inputs #{k + 1}", random_inputs(inputs, random_batch, generator), random_batch)
        for k in range(n_random)
    ]
    results = []
    for label, tensors, size in cases:
        want = [t for _, t in reference_outputs(spec.module, tensors)]
        got = _run_session(session, spec, tensors, label)
        results.append(
            compare_outputs(spec.output_names, got, want, atol=atol, rtol=rtol, label=label, batch_size=size)
        )
    return tuple(results)


def _session(staged: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported file: {exc}") from exc


def _run_session(
    session: ort.InferenceSession, spec: WriteSpec, tensors: tuple[torch.Tensor, ...], label: str
) -> list[np.ndarray]:
    available = dict(zip(spec.input_names, tensors, strict=True))
    wanted = [i.name for i in session.get_inputs()]
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ExportError(
            f"the exported model expects inputs {unknown} that fxmerge did not name; got {list(available)}."
        )
    feed = {name: _to_numpy(available[name], name) for name in wanted}
    names = [o.name for o in session.get_outputs()]
    order = spec.output_names if set(names) == set(spec.output_names) else None
    try:
        outputs = session.run(list(order) if order else None, feed)
    except Exception as exc:
        raise ExportError(
            f"onnxruntime failed on the {label} (batch {_batch_of(tensors)}): {exc}. If the example batch works "
            "and another does not, the export fixed the batch size: pass dynamic_batch=False."
        ) from exc
    return list(outputs)


def _to_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise ExportError(
            f"input {name!r} is bfloat16, which numpy/onnxruntime cannot feed; use float32 or float16."
        )
    return tensor.detach().to("cpu").contiguous().numpy()


def _batch_of(tensors: tuple[torch.Tensor, ...]) -> int | None:
    return next((int(t.shape[0]) for t in tensors if t.dim() >= 1), None)


def _raise_on_mismatch(
    checks: tuple[CheckResult, ...], atol: float, rtol: float, written: WriteResult
) -> None:
    failed = [c for c in checks if not c.passed]
    if not failed:
        return
    details = "; ".join(
        f"{c.label} (batch {c.batch_size}): output {c.worst_output!r} max abs diff {c.max_abs_diff:.3g}, "
        f"max rel diff {c.max_rel_diff:.3g}"
        for c in failed
    )
    tracer = f" Tracer warnings: {' | '.join(written.warnings)}" if written.warnings else ""
    if written.fallback_reason:
        tracer = f" The dynamo exporter failed ({written.fallback_reason}), so the TorchScript exporter was used.{tracer}"
    raise ExportError(
        f"onnxruntime disagrees with PyTorch beyond atol={atol:g}, rtol={rtol:g} ({written.exporter} exporter): "
        f"{details}. No file was written.{tracer}",
        max_abs_diff=max(c.max_abs_diff for c in failed),
        max_rel_diff=max(c.max_rel_diff for c in failed),
    )


def _opset_of(staged: Path) -> int:
    proto = onnx.load(str(staged), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _report(
    target: Path,
    spec: WriteSpec,
    written: WriteResult,
    checks: tuple[CheckResult, ...],
    opset: int,
    atol: float,
    rtol: float,
    dynamic_batch: bool,
) -> ExportReport:
    sizes = tuple(dict.fromkeys(c.batch_size for c in checks if c.batch_size is not None))
    return ExportReport(
        path=target,
        exporter=written.exporter,
        opset=opset,
        input_names=spec.input_names,
        output_names=spec.output_names,
        checked_batch_sizes=sizes,
        max_abs_diff=max(c.max_abs_diff for c in checks),
        max_rel_diff=max(c.max_rel_diff for c in checks),
        atol=atol,
        rtol=rtol,
        dynamic_batch=dynamic_batch,
        checks=checks,
        fallback_reason=written.fallback_reason,
        warnings=written.warnings,
    )
