"""Capture a model as an fx graph: ``torch.fx`` symbolic tracing or ``torch.export`` (ATen level).

Both frontends (:mod:`fxmerge.capture.frontends`) produce a :class:`CapturedGraph`
(:mod:`fxmerge.capture.graph`): a ``GraphModule`` plus the mapping from graph values to the model's own
parameter and buffer tensors, so analyses see one IR whichever frontend ran. This module chooses the
frontend (``auto``: fx, falling back to export) and checks the captured graph runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from torch import nn

from fxmerge.capture.frontends import ModelRejectsInputs, capture_export, capture_fx, opaque_calls
from fxmerge.capture.graph import (
    CapturedGraph,
    eager_failure,
    eval_mode,
    first_line,
    model_state,
    split_inputs,
)
from fxmerge.errors import CaptureError, FxmergeError
from fxmerge.infer.registry import RULES, RuleTable

__all__ = [
    "CAPTURE_KWARGS",
    "CapturedGraph",
    "Frontend",
    "capture",
    "capture_and_run",
    "capture_kwargs",
    "eval_mode",
    "forward_signature",
    "model_state",
    "opaque_calls",
    "split_inputs",
]

Frontend = Literal["auto", "fx", "export"]
T = TypeVar("T")

# Keyword inputs that capture passes when the model's forward takes them and the caller did not set them:
# they switch off outputs that are state for a later call rather than part of the function (KV caches).
CAPTURE_KWARGS: dict[str, Any] = {"use_cache": False}


def capture(
    model: nn.Module,
    example_inputs: Any,
    frontend: Frontend = "auto",
    *,
    rules: RuleTable | None = None,
    stack_traces: bool = False,
) -> CapturedGraph:
    """Capture ``model`` as a graph; ``auto`` tries fx symbolic tracing, then ``torch.export``.

    ``auto`` uses ``torch.export`` when fx fails in any way, and when the fx graph calls Python functions or
    modules that have no rule (``torch.fx.wrap``-ed helpers: fx cannot see into them, export can); if export
    fails there too, the fx graph is kept. The result says which frontend ran and why
    (``frontend``, ``fallback_reason``, ``rejected``). When both fail, the error names both failures.
    :func:`capture_and_run` also falls back when the fx graph fails to run on the example inputs.

    ``stack_traces`` records the user source line of every fx node (a third of fx's tracing time; the
    diagnostics re-capture with it when they need to point at source lines).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", "fx", "export"):
        raise CaptureError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    args, kwargs = split_inputs(example_inputs)
    if rules is None:
        from fxmerge.infer import rules as _builtin_rules  # noqa: F401  (leaves and opaque calls need the rules)

        rules = RULES
    extra = capture_kwargs(model, args, kwargs)
    if frontend == "export":
        return capture_export(model, args, kwargs, extra)
    if frontend == "fx":
        return capture_fx(model, rules, stack_traces, extra)
    try:
        cg = capture_fx(model, rules, stack_traces, extra)
    except Exception as e:  # any fx failure is a reason to try export
        return _fall_back(model, args, kwargs, extra, _fx_failure(model, e), fx_error=e)
    opaque = opaque_calls(cg.gm, rules)
    if not opaque:
        return cg
    reason = (f"the fx graph calls {len(opaque)} function(s)/module(s) it cannot see into and that have no rule: "
              f"{', '.join(opaque[:4])}{' ...' if len(opaque) > 4 else ''}")  # fmt: skip
    try:
        return _fall_back(model, args, kwargs, extra, reason)
    except CaptureError as e:  # export cannot do better: keep the fx graph (its opaque calls become barriers)
        cg.rejected["export"] = first_line(e)
        return cg


def capture_and_run(
    model: nn.Module,
    example_inputs: Any,
    frontend: Frontend,
    run: Callable[[CapturedGraph], T],
    *,
    rules: RuleTable | None = None,
    stack_traces: bool = False,
) -> tuple[CapturedGraph, T]:
    """:func:`capture`, then ``run(cg)`` (a pass that executes the graph on the example inputs).

    Under ``auto`` an fx graph that fails to run falls back to ``torch.export``. Errors other than
    :class:`~fxmerge.FxmergeError` become a :class:`~fxmerge.CaptureError` that says whether the model itself
    runs on the inputs (then the captured graph is at fault, not ``example_inputs``).
    """
    cg = capture(model, example_inputs, frontend, rules=rules, stack_traces=stack_traces)
    try:
        return cg, _run_checked(model, example_inputs, cg, run)
    except CaptureError as e:
        if frontend != "auto" or cg.frontend != "fx":
            raise
        fx_error: Exception = e
    args, kwargs = split_inputs(example_inputs)
    ecg = _fall_back(model, args, kwargs, cg.call_kwargs, first_line(fx_error), fx_error=fx_error)
    return ecg, _run_checked(model, example_inputs, ecg, run)


def _run_checked(model: nn.Module, example_inputs: Any, cg: CapturedGraph, run: Callable[[CapturedGraph], T]) -> T:
    try:
        return run(cg)
    except FxmergeError:
        raise
    except Exception as e:
        what = f"running the {cg.frontend} graph of {cg.model_class} on example_inputs failed: {type(e).__name__}: "
        what += first_line(e)
        args, kwargs = split_inputs(example_inputs)
        if cg.frontend == "export" or eager_failure(model, args, kwargs) is None:
            fix = ("The model itself runs on these inputs, so the captured graph is at fault"
                   + (": use frontend='export'." if cg.frontend == "fx" else "."))  # fmt: skip
        else:
            fix = ("The model itself fails on them too: pass example_inputs that its forward accepts (a tensor, a "
                   "tuple of positional inputs optionally ending with a dict of keyword inputs, or a dict).")  # fmt: skip
        raise CaptureError(f"{what}. {fix}") from e


def _fall_back(
    model: nn.Module, args: tuple, kwargs: dict, extra: dict[str, Any], reason: str, *, fx_error: Exception | None = None
) -> CapturedGraph:  # fmt: skip
    """Capture with ``torch.export`` after fx was rejected for ``reason``."""
    try:
        cg = capture_export(model, args, kwargs, extra)
    except ModelRejectsInputs:
        raise  # the model's own error, not two capture errors that hide it
    except CaptureError as e:
        if fx_error is None:
            raise
        raise CaptureError(
            f"neither frontend could capture {type(model).__name__}\n  fx: {fx_error}\n  export: {e}"
        ) from e
    cg.fallback_reason = reason
    cg.rejected["fx"] = reason
    return cg


def _fx_failure(model: nn.Module, e: Exception) -> str:
    if isinstance(e, CaptureError):
        return first_line(e)
    return f"torch.fx capture of {type(model).__name__} failed: {type(e).__name__}: {first_line(e)}"


def capture_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The :data:`CAPTURE_KWARGS` that ``model.forward`` takes by name and the call does not set."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {}
    for name, value in CAPTURE_KWARGS.items():
        index = next((i for i, p in enumerate(params) if p.name == name and p.kind in named), None)
        if index is None or name in kwargs:
            continue
        if params[index].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and index < len(args):
            continue
        out[name] = value
    return out


def forward_signature(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)
