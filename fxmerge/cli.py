"""The ``fxmerge`` command line. Every command maps onto one public Python function.

Output conventions shared by every command: ``--quiet`` (no progress bars, warnings or status lines; a command
whose output is its result, such as ``inspect``, still prints it) and ``--json`` (exactly one JSON document on
stdout, also on failure: ``{"ok": false, "error": ...}``). Both are accepted before the command
(``fxmerge --json inspect ...``) or after it.

Every failure of every command goes through one handler (:meth:`_Main.main`): one line ``error: ...`` on
stderr, the JSON document on stdout with ``--json``, and the exit status: 2 for anything wrong with the user's
input (arguments, config, paths, model and data references and what their code raises: every
:class:`~fxmerge.errors.InputError`), 1 when the work itself fails (merge, export check, invariance), 130 on
Ctrl-C and 143 on SIGTERM (staging folders are removed first).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from fxmerge.cli_report import (
    TERMINATED,
    Output,
    classify,
    exit_status,
    report_failure,
)
from fxmerge.outputs import terminate_raises


class _Main(click.Group):
    """The root group and the one error handler of every command (see the module docstring)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        argv = list(sys.argv[1:] if args is None else args)
        try:
            with terminate_raises():
                result = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            status = result if isinstance(result, int) else 0
        except BaseException as exc:  # every failure is reported the same way
            if isinstance(exc, SystemExit) and exc.code != TERMINATED:
                raise  # an exit click or a command chose (a closed pipe): not a failure to report
            status = report_failure(classify(exc), "--json" in argv)
        if standalone_mode:
            sys.exit(status)
        return status


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--quiet/-q`` and ``--json`` to a command (they may also be given to ``fxmerge`` itself)."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(fn)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings or status lines.")(fn)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fxmerge")
@output_options
@click.pass_context
def main(ctx: click.Context, quiet: bool, as_json: bool) -> None:
    """fxmerge: training-free model merging on PyTorch FX graphs.

    ``package.module:callable`` references are imported with the current folder on the module path.
    """
    ctx.obj = Output(quiet, as_json)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def command_output(quiet: bool, as_json: bool) -> Output:
    """The output settings of the running command (its own flags or the root's)."""
    root = click.get_current_context().find_root().obj or Output()
    return Output(quiet or root.quiet, as_json or root.as_json)


# --------------------------------------------------------------------------------- strict value types


class Shape(click.ParamType):
    """A tensor shape: positive integers separated by commas (or ``x``), e.g. ``1,3,64,64``."""

    name = "SHAPE"
    _TEXT = re.compile(r"\s*\d+(\s*[,x]\s*\d+)*\s*")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        if not self._TEXT.fullmatch(str(value)):
            self.fail(f"{value!r} is not a shape: give positive integers separated by commas, e.g. 1,3,64,64",
                      param, ctx)  # fmt: skip
        dims = tuple(int(p) for p in re.split(r"[,x]", str(value).replace(" ", "")))
        if any(d < 1 for d in dims):
            self.fail(f"{value!r} is not a shape: every dimension must be >= 1", param, ctx)
        return dims


class Tolerance(click.ParamType):
    """A finite number >= 0."""

    name = "FLOAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} must be a finite number >= 0", param, ctx)
        return number


def _onnx_suffix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.endswith(".onnx"):
        raise click.BadParameter(f"{value!r} must end in .onnx")
    return value


SHAPE_HELP = "Example input shape, e.g. 1,3,64,64 (default: from the model source)."
FRONTENDS = click.Choice(["auto", "fx", "export"])
EXPORT_NAMES = {"path": "--out", "dynamic_batch=False": "--no-dynamic-batch", "exporter": "--exporter",
                "exporter='trace'": "--exporter trace", "check_data": "--check-data", "opset": "--opset",
                "atol": "--atol", "rtol": "--rtol", "input_shape": "--input-shape", "source": "SOURCE",
                "checkpoint": "--checkpoint"}  # fmt: skip
MERGE_NAMES = {"out_dir": "--out", "overwrite=True": "--overwrite", "check_data": "data:",
               "exporter='trace'": "outputs.onnx_exporter: trace", "dynamic_batch=False": "outputs.onnx_dynamic_batch: false"}  # fmt: skip


# ------------------------------------------------------------------------------------------- commands


@main.command()
@click.argument("model")
@click.option("--input-shape", type=Shape(), default=None, help=SHAPE_HELP)
@click.option("--frontend", type=FRONTENDS, default="auto", show_default=True)
@click.option("--strict/--no-strict", default=True, show_default=True, help="Fail on ops without a rule.")
@click.option("--verify", is_flag=True, help="Also run the random-permutation invariance check.")
@output_options
def inspect(model: str, input_shape: tuple[int, ...] | None, frontend: str, strict: bool, verify: bool, quiet: bool,
            as_json: bool) -> None:  # fmt: skip
    """Print the permutation groups and coverage report of MODEL.

    MODEL is ``torchvision:NAME``, ``timm:NAME``, ``hf:CONFIG_DIR_OR_JSON`` or ``package.module:callable``.
    With --json the spec is printed as JSON (plus ``invariance`` with --verify).
    """
    from fxmerge.config.refs import build_model_and_inputs
    from fxmerge.infer.api import infer_groups
    from fxmerge.verify import verify_invariance

    out = command_output(quiet, as_json)
    with out.working({"input_shape": "--input-shape"}):
        m, inputs = build_model_and_inputs(model, input_shape, "MODEL")
        spec = infer_groups(m, inputs, frontend=frontend, strict=strict)
        report = verify_invariance(m, spec, inputs) if verify else None
    obj = json.loads(spec.to_json())
    text = str(spec)
    if report is not None:
        obj["invariance"] = {"per_group": report.per_group, "joint": report.joint}
        worst = max(report.per_group.values(), default=0.0)
        text += f"\ninvariance: {len(report.per_group)} groups verified, max |diff| {worst:.3g}, joint {report.joint:.3g}"
    out.result(text, obj)


@main.command()
@click.argument("model")
@click.option("--input-shape", type=Shape(), default=None, help=SHAPE_HELP)
@click.option("--frontend", type=FRONTENDS, default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@output_options
def verify(model: str, input_shape: tuple[int, ...] | None, frontend: str, seed: int, quiet: bool,
           as_json: bool) -> None:  # fmt: skip
    """Infer the groups of MODEL and check each one by random-permutation invariance (float64)."""
    from fxmerge.config.refs import build_model_and_inputs
    from fxmerge.infer.api import infer_groups
    from fxmerge.verify import verify_invariance

    out = command_output(quiet, as_json)
    with out.working({"input_shape": "--input-shape"}):
        m, inputs = build_model_and_inputs(model, input_shape, "MODEL")
        spec = infer_groups(m, inputs, frontend=frontend)
        report = verify_invariance(m, spec, inputs, seed=seed)
    worst = max(report.per_group.values(), default=0.0)
    out.result(
        f"ok: {len(spec)} groups invariant (max |diff| {worst:.3g}, all at once {report.joint:.3g})",
        {"ok": True, "groups": len(spec), "max_diff": worst, "joint": report.joint},
    )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; created only when every output is complete.")  # fmt: skip
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it holds an earlier fxmerge output (never other files).")  # fmt: skip
@output_options
def merge(config: str, out_dir: str, overwrite: bool, quiet: bool, as_json: bool) -> None:
    """Merge the models described by the YAML file CONFIG into --out.

    The config names the models (and checkpoints), the method and its options, the data, an optional
    evaluation function and the outputs (checkpoint, ONNX, report.json, plots); see docs/getting_started.md.
    It is validated completely before any work: an invalid config exits with status 2, naming the field,
    and creates nothing. --out must not be, contain or lie inside an input (config, checkpoints, data).
    """
    from fxmerge.config import run_merge_config

    out = command_output(quiet, as_json)
    with out.working(MERGE_NAMES):
        report = run_merge_config(config, out_dir, progress=out.progress, overwrite=overwrite, log=out.status)
    if not out.quiet or out.as_json:
        out.result(_merge_summary(report, out_dir), {"ok": True, "out": os.path.abspath(out_dir), "report": report})


def _merge_summary(report: dict, out_dir: str) -> str:
    sims = [s for s in report.get("similarity", {}).values() if s.get("before") is not None]
    lines = [f"merged {report['n_models']} models with {report['method']} in {report['seconds']:.1f}s -> {out_dir}"]
    if sims:
        before = sum(s["before"] for s in sims) / len(sims)
        after = sum(s["after"] for s in sims if s.get("after") is not None) / len(sims)
        lines.append(f"  similarity of merged pairs over {len(sims)} spaces: before {before:.3f} -> after {after:.3f}")
    for name, values in report.get("metrics", {}).items():
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None))
    onnx = report.get("files", {}).get("onnx")
    if onnx:
        lines.append(f"  onnx: max |ort - torch| {onnx['max_abs_diff']:.3g} ({onnx['exporter']} exporter, "
                     f"opset {onnx['opset']})")  # fmt: skip
    return "\n".join(lines)


@main.command()
@click.argument("source")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), callback=_onnx_suffix,
              help="The .onnx file to write (replaces only an earlier fxmerge export).")  # fmt: skip
@click.option("--input-shape", type=Shape(), default=None, help=SHAPE_HELP)
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Weights to load into a model reference (.pt/.pth/.bin state dict or .safetensors).")  # fmt: skip
@click.option("--exporter", type=click.Choice(["dynamo", "trace"]), default="dynamo", show_default=True,
              help="dynamo: torch.export, refuses value-dependent control flow; trace: the TorchScript tracer, "
                   "checked on --check-data and on inputs that take other branches.")  # fmt: skip
@click.option("--check-data", default=None, metavar="MODULE:FN",
              help="package.module:fn returning batches of your inputs; the file is checked on them too.")
@click.option("--dynamic-batch/--no-dynamic-batch", default=True, show_default=True,
              help="Keep the batch dimension of inputs and outputs dynamic.")  # fmt: skip
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default: torch's).")
@click.option("--atol", type=Tolerance(), default=1e-4, show_default=True, help="Absolute tolerance of the check.")
@click.option("--rtol", type=Tolerance(), default=1e-3, show_default=True, help="Relative tolerance of the check.")
@output_options
def export(source: str, out_file: str, input_shape: tuple[int, ...] | None, checkpoint: str | None, exporter: str,
           check_data: str | None, dynamic_batch: bool, opset: int | None, atol: float, rtol: float, quiet: bool,
           as_json: bool) -> None:  # fmt: skip
    """Export SOURCE to ONNX and check it in onnxruntime against PyTorch.

    SOURCE is a model reference (as for inspect), an ``fxmerge merge`` output folder, or a ``.safetensors``
    file written by ``fxmerge.save_state`` (``.pt2`` programs too). The file is written only when the
    check passes; the differences are printed. A failed export names the op and module that block it, or
    the source line of a branch on tensor values. --out must not be, or lie inside, an input.
    """
    from fxmerge.config.data import callable_batches
    from fxmerge.config.refs import load_source, source_inputs
    from fxmerge.errors import ExportPathError
    from fxmerge.export import export_onnx
    from fxmerge.outputs import check_disjoint

    out = command_output(quiet, as_json)
    with out.working(EXPORT_NAMES):
        check_disjoint(out_file, source_inputs(source, checkpoint, check_data), ExportPathError, "path")
        model, inputs = load_source(source, input_shape, checkpoint)
        data = callable_batches(check_data, "--check-data") if check_data else None
        out.status(f"exporting {source} to {out_file} ({exporter} exporter)")
        rep = export_onnx(model, inputs, out_file, exporter=exporter, check_data=data, dynamic_batch=dynamic_batch,
                          opset=opset, atol=atol, rtol=rtol)  # fmt: skip
    if not out.quiet or out.as_json:
        text = (f"wrote {rep.path} ({rep.exporter} exporter, opset {rep.opset}); onnxruntime vs torch on "
                f"{len(rep.checks)} input sets, batch sizes {list(rep.checked_batch_sizes)}: max |diff| "
                f"{rep.max_abs_diff:.3g}, max rel {rep.max_rel_diff:.3g}")  # fmt: skip
        out.result(text, {"ok": True, "source": source, **_jsonable(rep.to_dict())})


def _jsonable(obj: Any) -> Any:
    from fxmerge.config.run import jsonable

    return jsonable(obj)


def _register_optional() -> None:
    """Commands that live with their subsystem."""
    try:
        from fxmerge.taskvector.cli import merge_tv
    except ImportError:  # pragma: no cover - subsystem missing from a partial install
        return
    main.add_command(merge_tv, name="merge-tv")


_register_optional()


def run(args: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point (``fxmerge``): run :func:`main`, then exit without interpreter teardown.

    Deallocating the modules and objects of an interpreter that imported torch costs about 0.5 s, a large
    share of a short command (``merge-tv`` of a small model, ``inspect``). Once the command has finished,
    the atexit handlers run and the standard streams are flushed as on a normal exit; only the teardown
    is skipped. In-process callers (tests, ``CliRunner``) use :func:`main`, which exits normally.
    """
    try:
        main.main(args, prog_name="fxmerge", standalone_mode=True)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover - python -m fxmerge.cli
    run()
