"""Rules for library ops that fx tracing keeps opaque (registered only when the library is installed)."""

from __future__ import annotations

import importlib

from fxmerge.infer.context import Call, RuleContext
from fxmerge.infer.registry import rule


def _optional(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@rule(_optional("torchvision.ops.stochastic_depth"), _optional("torchvision.ops.stochastic_depth.stochastic_depth"),
      key="stochastic_depth")  # fmt: skip
def stochastic_depth(ctx: RuleContext, call: Call):
    """Identity in eval; in training a per-sample mask (batch axis only): element-wise in every axis."""
    return ctx.elementwise(call, [call.arg(0, "input")])
