"""The ``fxmerge`` command line. Every command maps onto one public Python function.

Output conventions shared by every command: ``--quiet`` (no progress bars, warnings or status lines; a command
whose output is its result, such as ``inspect``, still prints it) and ``--json`` (exactly one JSON document on
stdout, also on failure: ``{"ok": false, "error": ...}``). Both are accepted before the command
(``fxmerge --json inspect ...``) or after it. Exit status: 0 success, 2 invalid input (config, arguments,
model reference), 1 the work itself failed (merge, export, invariance check).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from fxmerge.errors import ConfigError, FxmergeError
from fxmerge.models import load_model_spec, parse_shape


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

    def fail(self, exc: Exception) -> NoReturn:
        click.echo(f"error: {exc}", err=True)
        if self.as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__}))
        sys.exit(2 if isinstance(exc, ConfigError) else 1)

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Around the work: --quiet drops warnings; --json keeps stray prints off stdout."""
        with contextlib.ExitStack() as stack:
            if self.quiet:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            if self.as_json:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            yield


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--quiet/-q`` and ``--json`` to a command (they may also be given to ``fxmerge`` itself)."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(fn)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings or status lines.")(fn)


def _output(quiet: bool, as_json: bool) -> Output:
    root = click.get_current_context().find_root().obj or Output()
    return Output(quiet or root.quiet, as_json or root.as_json)


class _Main(click.Group):
    """The root group: with --json anywhere on the command line, usage errors are a JSON document too."""

    json_requested = False

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        self.json_requested = "--json" in argv
        return super().main(argv, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if not self.json_requested:
                raise
            exc.show()
            click.echo(json.dumps({"ok": False, "error": exc.format_message(), "error_type": "UsageError"}))
            sys.exit(exc.exit_code)


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


SHAPE_HELP = "Example input shape, e.g. 1,3,64,64 (default: from the model source)."
FRONTENDS = click.Choice(["auto", "fx", "export"])


@main.command()
@click.argument("model")
@click.option("--input-shape", default=None, help=SHAPE_HELP)
@click.option("--frontend", type=FRONTENDS, default="auto", show_default=True)
@click.option("--strict/--no-strict", default=True, show_default=True, help="Fail on ops without a rule.")
@click.option("--verify", is_flag=True, help="Also run the random-permutation invariance check.")
@output_options
def inspect(model: str, input_shape: str | None, frontend: str, strict: bool, verify: bool, quiet: bool,
            as_json: bool) -> None:  # fmt: skip
    """Print the permutation groups and coverage report of MODEL.

    MODEL is ``torchvision:NAME``, ``timm:NAME``, ``hf:CONFIG_DIR_OR_JSON`` or ``package.module:callable``.
    With --json the spec is printed as JSON (plus ``invariance`` with --verify).
    """
    from fxmerge.infer.api import infer_groups
    from fxmerge.verify import verify_invariance

    out = _output(quiet, as_json)
    try:
        with out.working():
            m, inputs = load_model_spec(model, input_shape)
            spec = infer_groups(m, inputs, frontend=frontend, strict=strict)
            report = verify_invariance(m, spec, inputs) if verify else None
    except FxmergeError as e:
        out.fail(e)
    obj = json.loads(spec.to_json())
    text = str(spec)
    if report is not None:
        obj["invariance"] = {"per_group": report.per_group, "joint": report.joint}
        worst = max(report.per_group.values(), default=0.0)
        text += f"\ninvariance: {len(report.per_group)} groups verified, max |diff| {worst:.3g}, joint {report.joint:.3g}"
    out.result(text, obj)


@main.command()
@click.argument("model")
@click.option("--input-shape", default=None, help=SHAPE_HELP)
@click.option("--frontend", type=FRONTENDS, default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@output_options
def verify(model: str, input_shape: str | None, frontend: str, seed: int, quiet: bool, as_json: bool) -> None:
    """Infer the groups of MODEL and check each one by random-permutation invariance (float64)."""
    from fxmerge.infer.api import infer_groups
    from fxmerge.verify import verify_invariance

    out = _output(quiet, as_json)
    try:
        with out.working():
            m, inputs = load_model_spec(model, input_shape)
            spec = infer_groups(m, inputs, frontend=frontend)
            report = verify_invariance(m, spec, inputs, seed=seed)
    except FxmergeError as e:
        out.fail(e)
    worst = max(report.per_group.values(), default=0.0)
    out.result(
        f"ok: {len(spec)} groups invariant (max |diff| {worst:.3g}, all at once {report.joint:.3g})",
        {"ok": True, "groups": len(spec), "max_diff": worst, "joint": report.joint},
    )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; created only when every output is complete.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not empty.")
@output_options
def merge(config: str, out_dir: str, overwrite: bool, quiet: bool, as_json: bool) -> None:
    """Merge the models described by the YAML file CONFIG into --out.

    The config names the models (and checkpoints), the method and its options, the data, an optional
    evaluation function and the outputs (checkpoint, ONNX, report.json, plots); see docs/getting_started.md.
    It is validated completely before any work: an invalid config exits with status 2, naming the field,
    and creates nothing.
    """
    from fxmerge.config import run_merge_config

    out = _output(quiet, as_json)
    try:
        with out.working():
            report = run_merge_config(config, out_dir, progress=out.progress, overwrite=overwrite, log=out.status)
    except FxmergeError as e:
        out.fail(e)
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
        lines.append(f"  onnx: max |ort - torch| {onnx['max_abs_diff']:.3g} ({onnx['exporter']}, opset {onnx['opset']})")
    return "\n".join(lines)


@main.command()
@click.argument("source")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--input-shape", default=None, help=SHAPE_HELP)
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Weights to load into a model reference (.pt/.pth/.bin state dict or .safetensors).")  # fmt: skip
@click.option("--dynamic-batch/--no-dynamic-batch", default=True, show_default=True,
              help="Keep the batch dimension of inputs and outputs dynamic.")  # fmt: skip
@click.option("--opset", type=int, default=None, help="ONNX opset (default: torch's).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance of the check.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance of the check.")
@output_options
def export(source: str, out_file: str, input_shape: str | None, checkpoint: str | None, dynamic_batch: bool,
           opset: int | None, atol: float, rtol: float, quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Export SOURCE to ONNX and check it in onnxruntime against PyTorch.

    SOURCE is a model reference (as for inspect), an ``fxmerge merge`` output folder, or a ``.safetensors``
    file written by ``fxmerge.save_state`` (``.pt2`` programs too). The file is written only when the
    check passes; the differences are printed. A failed export names the op and module that block it.
    """
    from fxmerge.config.refs import load_source
    from fxmerge.export import export_onnx

    out = _output(quiet, as_json)
    try:
        with out.working():
            model, inputs = load_source(source, parse_shape(input_shape), checkpoint)
            out.status(f"exporting {source} to {out_file}")
            rep = export_onnx(model, inputs, out_file, dynamic_batch=dynamic_batch, opset=opset, atol=atol, rtol=rtol)
    except FxmergeError as e:
        out.fail(e)
    if not out.quiet or out.as_json:
        text = (f"wrote {rep.path} ({rep.exporter}, opset {rep.opset}); onnxruntime vs torch on batch sizes "
                f"{list(rep.checked_batch_sizes)}: max |diff| {rep.max_abs_diff:.3g}, max rel {rep.max_rel_diff:.3g}")
        if rep.fallback_reason:
            text += f"\n  note: {rep.fallback_reason}"
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

def _exit_status(code: object) -> int:
    """The process exit status ``sys.exit(code)`` would give (a message is printed to stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


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
        status = _exit_status(exc.code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover - python -m fxmerge.cli
    run()
