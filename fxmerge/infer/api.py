"""``infer_groups``: capture, interpret with rules, solve, and report."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from fxmerge.capture.trace import CapturedGraph, Frontend, capture_and_run, split_inputs
from fxmerge.errors import InvarianceError, UnsupportedOpsError
from fxmerge.gate import UnsoundGroupWarning, find_unsound_groups
from fxmerge.infer import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from fxmerge.infer.build import build_spec
from fxmerge.infer.interpret import GraphInterpreter, UnsupportedOp
from fxmerge.infer.registry import RuleTable
from fxmerge.ir.spec import PermutationSpec
from fxmerge.verify import describe_group


def infer_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    frontend: Frontend = "auto",
    strict: bool = True,
    free_outputs: bool = False,
    rules: RuleTable | None = None,
    verify: bool = True,
    seed: int = 0,
) -> PermutationSpec:
    """Infer which weight axes must share one permutation.

    Args:
        model: any ``nn.Module``; it is not modified (its train/eval flags are restored).
        example_inputs: a tensor, a tuple of positional inputs (optionally ending with a dict of keyword
            inputs), or a dict of keyword inputs. Small inputs are enough: only shapes matter.
        frontend: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, ATen level) or ``"auto"``
            (fx, falling back to export when fx fails to trace, when its graph fails on the example inputs, or
            when it calls functions fx cannot see into; ``spec.graph.frontend`` / ``.fallback_reason`` say which
            ran and why).
        strict: raise :class:`~fxmerge.UnsupportedOpsError` listing every op without a rule; with
            ``strict=False`` such ops become barriers (their axes frozen) and are listed in the coverage
            report.
        free_outputs: leave the model outputs' feature axes free (for feature-level zipping).
        verify: the soundness gate (default on). Before returning, every group is permuted at random
            (all at once, a few forward passes on a float64 copy, float32 when the model cannot run in
            float64); groups whose permutation changes the outputs are found by bisection, frozen with the
            reason "failed verification" in the coverage report, a warning names them, and the spec is
            re-verified. ``spec.verification`` records the check. ``verify=False`` skips it (the spec is then
            verified when a merge uses it).
        seed: seed of the gate's random permutations.

    Returns:
        A :class:`~fxmerge.PermutationSpec` whose ``coverage`` explains every frozen axis.

    Example::

        spec = fxmerge.infer_groups(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        print(spec)
    """
    cg, interp = _interpret(model, example_inputs, frontend, rules, free_outputs, stack_traces=False)
    if interp.unsupported and cg.frontend == "fx":  # re-trace with source lines for the diagnostics
        rejected = cg.rejected
        cg, interp = _interpret(model, example_inputs, "fx", rules, free_outputs, stack_traces=True)
        cg.rejected = rejected  # the frontend choice (spec.graph.frontend, .rejected) stays auto's
    if strict and interp.unsupported:
        raise UnsupportedOpsError(format_unsupported(type(model).__name__, interp.unsupported), interp.unsupported)
    spec = build_spec(interp)
    spec.graph = cg
    if verify:
        spec = _gate(model, example_inputs, interp, spec, seed)
    return spec


_MAX_GATE_ROUNDS = 4


def _gate(model: nn.Module, example_inputs: Any, interp: GraphInterpreter, spec: PermutationSpec, seed: int):
    """Verify ``spec``; freeze the groups that fail (with the reason) and re-verify until it passes."""
    frozen: list[str] = []
    for round_ in range(_MAX_GATE_ROUNDS):
        bad, record = find_unsound_groups(model, spec, example_inputs, seed=seed + round_)
        if not bad:
            record.frozen = frozen
            spec.verification = record
            return spec
        notes = [f"g{gid} ({describe_group(spec, gid)}): outputs moved by {diff:.3g}" for gid, diff in bad.items()]
        frozen.extend(notes)
        warnings.warn(
            f"{type(model).__name__}: {len(bad)} inferred group(s) failed the soundness check and were frozen "
            f"(a rule is missing a constraint; please report the model): {'; '.join(notes[:5])}"
            f"{' ...' if len(notes) > 5 else ''}",
            UnsoundGroupWarning,
            stacklevel=3,
        )
        for gid, diff in bad.items():
            reason = f"failed verification: permuting it moved the outputs by {diff:.3g} (frozen by the soundness gate)"
            interp.solver.freeze(interp.solver.atoms_by_id(interp.group_atoms[gid]), reason)
        graph = spec.graph
        spec = build_spec(interp)
        spec.graph = graph
    raise InvarianceError(
        f"{type(model).__name__}: the spec still fails verification after freezing {len(frozen)} group(s) in "
        f"{_MAX_GATE_ROUNDS} rounds; pass strict=False with the offending op's rule removed, or report the model."
    )


def _interpret(
    model: nn.Module, example_inputs: Any, frontend: Frontend, rules: RuleTable | None, free_outputs: bool,
    *, stack_traces: bool,
) -> tuple[CapturedGraph, GraphInterpreter]:  # fmt: skip
    args, kwargs = split_inputs(example_inputs)

    def run(cg: CapturedGraph) -> GraphInterpreter:
        interp = GraphInterpreter(cg, rules, free_outputs=free_outputs)
        interp.run(cg.flat_inputs(args, kwargs))
        return interp

    # under "auto", an fx graph that fails on the example inputs falls back to torch.export
    cg, interp = capture_and_run(model, example_inputs, frontend, run, rules=rules, stack_traces=stack_traces)
    return cg, interp


def format_unsupported(model_name: str, records: list[UnsupportedOp]) -> str:
    """One readable message listing every op without a rule, grouped by target."""
    by_target: dict[str, list[UnsupportedOp]] = {}
    for r in records:
        by_target.setdefault(r.target, []).append(r)
    lines = [
        f"{model_name}: {len(records)} op(s) without a permutation rule ({len(by_target)} kind(s)). "
        "fxmerge never assumes an unknown op is element-wise."
    ]
    for target, recs in by_target.items():
        params = sorted({p for r in recs for p in r.params})
        first = recs[0]
        where = f" at {first.module_path}" if first.module_path else ""
        lines.append(f"  - {target} x{len(recs)}{where} (node {first.node})")
        if first.source:
            lines.append(f"      {first.source}")
        if params:
            lines.append(f"      affects {len(params)} parameter(s): {', '.join(params[:6])}{' ...' if len(params) > 6 else ''}")
    lines.append(
        "Fix: register a rule with @fxmerge.rule(<target>) (see docs/rules.md), "
        "or pass strict=False to freeze these ops' axes, or try frontend='export' (ATen-level ops)."
    )
    return "\n".join(lines)
