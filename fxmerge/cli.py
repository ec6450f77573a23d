"""The ``fxmerge`` command line. Every command maps onto one public Python function."""

from __future__ import annotations

import json
import sys

import click

from fxmerge.errors import FxmergeError
from fxmerge.models import load_model_spec


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fxmerge")
def main() -> None:
    """fxmerge: training-free model merging on PyTorch FX graphs."""


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@main.command()
@click.argument("model")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,64,64 (default: from the model source).")
@click.option("--frontend", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True)
@click.option("--strict/--no-strict", default=True, show_default=True, help="Fail on ops without a rule.")
@click.option("--json", "as_json", is_flag=True, help="Print the spec and coverage as JSON.")
@click.option("--verify", is_flag=True, help="Also run the random-permutation invariance check.")
def inspect(model: str, input_shape: str | None, frontend: str, strict: bool, as_json: bool, verify: bool) -> None:
    """Print the permutation groups and coverage report of MODEL.

    MODEL is ``torchvision:NAME``, ``timm:NAME``, ``hf:CONFIG_DIR_OR_JSON`` or ``package.module:callable``.
    """
    from fxmerge.infer.api import infer_groups
    from fxmerge.verify import verify_invariance

    try:
        m, inputs = load_model_spec(model, input_shape)
        spec = infer_groups(m, inputs, frontend=frontend, strict=strict)
        report = verify_invariance(m, spec, inputs) if verify else None
    except FxmergeError as e:
        _fail(e)
        return
    if as_json:
        obj = json.loads(spec.to_json())
        if report is not None:
            obj["invariance"] = {"per_group": report.per_group, "joint": report.joint}
        click.echo(json.dumps(obj, indent=1))
        return
    click.echo(str(spec))
    if report is not None:
        worst = max(report.per_group.values(), default=0.0)
        click.echo(f"invariance: {len(report.per_group)} groups verified, max |diff| {worst:.3g}, joint {report.joint:.3g}")


@main.command()
@click.argument("model")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,64,64.")
@click.option("--frontend", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def verify(model: str, input_shape: str | None, frontend: str, seed: int, as_json: bool) -> None:
    """Infer the groups of MODEL and check each one by random-permutation invariance (float64)."""
    from fxmerge.infer.api import infer_groups
    from fxmerge.verify import verify_invariance

    try:
        m, inputs = load_model_spec(model, input_shape)
        spec = infer_groups(m, inputs, frontend=frontend)
        report = verify_invariance(m, spec, inputs, seed=seed)
    except FxmergeError as e:
        _fail(e)
        return
    worst = max(report.per_group.values(), default=0.0)
    if as_json:
        click.echo(json.dumps({"groups": len(spec), "max_diff": worst, "joint": report.joint, "ok": True}))
    else:
        click.echo(f"ok: {len(spec)} groups invariant (max |diff| {worst:.3g}, all at once {report.joint:.3g})")


def _register_optional() -> None:
    """Commands that live with their subsystem."""
    try:
        from fxmerge.taskvector.cli import merge_tv
    except ImportError:  # pragma: no cover - subsystem missing from a partial install
        return
    main.add_command(merge_tv, name="merge-tv")


_register_optional()
