"""Rules for library ops that fx tracing keeps opaque (registered only when the library is installed)."""

from __future__ import annotations

import importlib

from fxmerge.infer.context import Call, RuleContext
from fxmerge.infer.registry import aten_packets, rule


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


@rule("transformers::grouped_mm_fallback", _optional("torch.nn.functional.grouped_mm"), *aten_packets("_grouped_mm"),
      key="grouped_mm")  # fmt: skip
def grouped_mm(ctx: RuleContext, call: Call):
    """Mixture-of-experts grouped matmul: ``input [tokens, K]`` (sorted by expert) times ``weight [experts, K, N]``
    with cumulative token offsets. K links the input to every expert's rows, N every expert's columns to the
    result; the expert axis and the offsets are frozen (which token meets which expert is data-dependent)."""
    x, w = call.arg(0, "input"), call.arg(1, "weight")
    if x.ndim != 2 or w.ndim != 3:
        for tv in call.tensors():
            ctx.freeze(tv, "grouped matmul outside the (tokens x K) @ (experts x K x N) form")
        return ctx.fixed(call.out.shape)
    for tv in call.tensors()[2:]:
        ctx.freeze(tv, "grouped matmul offsets")
    ctx.freeze_axis(w, 0, "experts are selected by data-dependent routing")
    ctx.freeze_axis(x, 0, "tokens are grouped by expert")
    return ctx.link([(x, "mk"), (w, "gkn")], "mn", call.out.shape)
