"""Verified ONNX export: write atomically, run the ONNX checker, compare onnxruntime against PyTorch.

A file is written only when it is shown to compute the model's function: the default exporter captures the
graph symbolically (``torch.export``) and refuses models whose control flow depends on input values; the
tracer (``exporter="trace"``, an explicit opt-in) is checked on the user's data and on inputs built to take
other branches (sign flips, scale changes, zeros, another batch size).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fxmerge.errors import ExportError, ExportInputError
from fxmerge.export._atomic import check_replaceable, publish, resolve_target, staging_dir
from fxmerge.export._compare import CheckResult, compare_outputs
from fxmerge.export._flat import FlatModule, output_name, reference_outputs
from fxmerge.export._inputs import (
    Case,
    ExampleInputs,
    branch_cases,
    data_cases,
    eval_copy,
    other_batch_size,
    parse_example_inputs,
    random_inputs,
    unique_names,
)
from fxmerge.export._onnx_writer import EXPORTERS, WriteResult, WriteSpec, is_fxmerge_onnx, write_onnx
from fxmerge.outputs import name


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote, with which exporter, and how closely onnxruntime reproduced PyTorch.

    ``max_abs_diff`` / ``max_rel_diff`` are the worst over all checks (see :mod:`fxmerge.export._compare`
    for the definitions); ``checks`` holds one entry per compared set of inputs.
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
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the report."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class CheckPlan:
    """How the written file is checked: tolerances, random batches, the user's data."""

    atol: float = 1e-4
    rtol: float = 1e-3
    n_random: int = 1
    seed: int = 0
    data: Iterable[object] | None = None
    max_data_batches: int = 8


def export_onnx(
    model: nn.Module,
    example_inputs: object,
    path: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    check_data: Iterable[object] | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    n_random_checks: int = 1,
    max_check_batches: int = 8,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and verify it in onnxruntime against PyTorch.

    A deep copy of the model in eval mode is exported with ``exporter``:

    * ``"dynamo"`` (default): ``torch.export`` captures the graph for every input. A model it cannot capture
      is refused with the reason; a branch on tensor values is named with its source line.
    * ``"trace"``: the TorchScript tracer, which bakes in the branches the example inputs take. Use it only
      when you know the model has no value-dependent control flow (or only branches your inputs never leave):
      the file is additionally checked on sign-flipped, scaled and all-zero example inputs.

    The file is checked with ``onnx.checker`` and run with the CPU execution provider on the example inputs,
    on ``n_random_checks`` fresh random batches (same dtype and value range; another batch size when
    ``dynamic_batch``) and on up to ``max_check_batches`` batches of ``check_data`` (the inputs you will feed
    it). It appears at ``path`` only when every check passes, and replaces an existing file there only when
    fxmerge wrote that one.

    Args:
        model: the module to export; it is never modified.
        example_inputs: a tensor, a tuple of tensors, or a tuple whose last element is a dict of keyword tensors.
        path: output ``.onnx`` file; missing parent folders are created.
        exporter: ``"dynamo"`` or ``"trace"`` (see above); the report says which produced the file.
        check_data: an iterable of input batches (like ``example_inputs``, or ``(inputs, labels)`` pairs).
        dynamic_batch: make dim 0 of every input whose dim 0 equals the example batch size dynamic.
        opset: ONNX opset to target (torch's default when None).
        atol, rtol: an element passes when ``|ort - torch| <= atol + rtol * |torch|``.
        n_random_checks: number of random batches compared in addition to the examples.
        max_check_batches: at most this many batches of ``check_data`` are compared.
        seed: seed of the torch.Generator drawing the random batches.

    Raises:
        ExportInputError: an argument is invalid, or ``path`` is unusable (:class:`~fxmerge.errors.ExportPathError`).
        ExportError: the exporter cannot capture the model (names the reason, op, module or source line), the
            ONNX checker or onnxruntime rejects the file, or the outputs differ beyond tolerance
            (``.max_abs_diff`` and ``.max_rel_diff`` set).
    """
    plan = CheckPlan(atol, rtol, n_random_checks, seed, check_data, max_check_batches)
    _validate_options(plan, opset, exporter)
    target = resolve_target(path, (".onnx",))
    check_replaceable({target: is_fxmerge_onnx})
    inputs = parse_example_inputs(model, example_inputs)
    flat_model = FlatModule(eval_copy(model), inputs).eval()
    spec = _write_spec(flat_model, inputs, dynamic_batch, opset)
    cases = _cases(flat_model, inputs, plan, dynamic_batch, exporter)
    with staging_dir(target) as stage:
        staged = stage / target.name
        written = write_onnx(spec, staged, exporter)
        _check_model(staged)
        checks = _run_checks(staged, spec, cases, plan)
        _raise_on_mismatch(checks, plan, written)
        opset_used = _opset_of(staged)
        check_replaceable({target.parent / p.name: lambda _: is_fxmerge_onnx(target) for p in stage.iterdir()})
        publish(stage, staged, {target.name: target})
    return _report(target, spec, written, checks, opset_used, plan, dynamic_batch)


def _validate_options(plan: CheckPlan, opset: int | None, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ExportInputError(f"{name('exporter')} must be one of {', '.join(map(repr, EXPORTERS))}; got {exporter!r}.")
    for key, value in (("atol", plan.atol), ("rtol", plan.rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ExportInputError(f"{name(key)} must be a number >= 0; got {value!r}.")
    for key, value, low in (("n_random_checks", plan.n_random, 0), ("max_check_batches", plan.max_data_batches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ExportInputError(f"{name(key)} must be an integer >= {low}; got {value!r}.")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ExportInputError(f"{name('opset')} must be None or an ONNX opset number such as 18; got {opset!r}.")


def _cases(flat_model: FlatModule, inputs: ExampleInputs, plan: CheckPlan, dynamic_batch: bool,
           exporter: str) -> list[Case]:  # fmt: skip
    """Every set of inputs the file is checked on: examples, random batches, the user's data and, for the
    tracer, inputs that take other branches."""
    batch = inputs.batch_size()
    other = other_batch_size(batch) if dynamic_batch and batch is not None else batch
    generator = torch.Generator().manual_seed(plan.seed)
    cases = [Case("example inputs", inputs.tensors, batch)]
    cases += [Case(f"random inputs #{k + 1}", random_inputs(inputs, other, generator), other)
              for k in range(plan.n_random)]  # fmt: skip
    cases += data_cases(flat_model.model, plan.data, inputs, dynamic_batch, plan.max_data_batches)
    if exporter == "trace":
        cases += branch_cases(inputs, other)
    return cases


def _write_spec(
    flat_model: FlatModule, inputs: ExampleInputs, dynamic_batch: bool, opset: int | None
) -> WriteSpec:
    batch = inputs.batch_size()
    if dynamic_batch and batch is None:
        raise ExportInputError(
            "dynamic_batch=True needs an input with a batch dimension (dim 0), but every example input is a "
            f"scalar; pass {name('dynamic_batch=False')}."
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


def _run_checks(staged: Path, spec: WriteSpec, cases: list[Case], plan: CheckPlan) -> tuple[CheckResult, ...]:
    session = _session(staged)
    results = []
    for case in cases:
        want = [t for _, t in reference_outputs(spec.module, case.tensors)]
        got = _run_session(session, spec, case.tensors, case.label)
        results.append(compare_outputs(spec.output_names, got, want, atol=plan.atol, rtol=plan.rtol,
                                       label=case.label, batch_size=case.batch_size))  # fmt: skip
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
    unknown = [key for key in wanted if key not in available]
    if unknown:
        raise ExportError(
            f"the exported model expects inputs {unknown} that fxmerge did not name; got {list(available)}."
        )
    feed = {key: _to_numpy(available[key], key) for key in wanted}
    names = [o.name for o in session.get_outputs()]
    order = spec.output_names if set(names) == set(spec.output_names) else None
    try:
        outputs = session.run(list(order) if order else None, feed)
    except Exception as exc:
        raise ExportError(
            f"onnxruntime failed on the {label} (batch {_batch_of(tensors)}): {exc}. If the example batch works "
            f"and another does not, the export fixed the batch size: pass {name('dynamic_batch=False')}."
        ) from exc
    return list(outputs)


def _to_numpy(tensor: torch.Tensor, label: str) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise ExportInputError(
            f"input {label!r} is bfloat16, which numpy/onnxruntime cannot feed; use float32 or float16."
        )
    return tensor.detach().to("cpu").contiguous().numpy()


def _batch_of(tensors: tuple[torch.Tensor, ...]) -> int | None:
    return next((int(t.shape[0]) for t in tensors if t.dim() >= 1), None)


def _raise_on_mismatch(checks: tuple[CheckResult, ...], plan: CheckPlan, written: WriteResult) -> None:
    failed = [c for c in checks if not c.passed]
    if not failed:
        return
    details = "; ".join(
        f"{c.label} (batch {c.batch_size}): output {c.worst_output!r} max abs diff {c.max_abs_diff:.3g}, "
        f"max rel diff {c.max_rel_diff:.3g}"
        for c in failed
    )
    note = ""
    if written.exporter == "trace":
        note = (" The traced graph holds only the branches the example inputs took; the model's control flow "
                "depends on input values, so this file would compute another function.")  # fmt: skip
        if written.warnings:
            note += f" Tracer warnings: {' | '.join(written.warnings)}"
    raise ExportError(
        f"onnxruntime disagrees with PyTorch beyond atol={plan.atol:g}, rtol={plan.rtol:g} ({written.exporter} "
        f"exporter): {details}. No file was written.{note}",
        max_abs_diff=max(c.max_abs_diff for c in failed),
        max_rel_diff=max(c.max_rel_diff for c in failed),
    )


def _opset_of(staged: Path) -> int:
    proto = onnx.load(str(staged), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _report(target: Path, spec: WriteSpec, written: WriteResult, checks: tuple[CheckResult, ...], opset: int,
            plan: CheckPlan, dynamic_batch: bool) -> ExportReport:  # fmt: skip
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
        atol=plan.atol,
        rtol=plan.rtol,
        dynamic_batch=dynamic_batch,
        checks=checks,
        warnings=written.warnings,
    )
