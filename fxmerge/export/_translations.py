"""ONNX translations fxmerge supplies for ops that torch.onnx's dynamo exporter has none for.

* grouped matmul with offsets, ``out[s] = input[s] @ weight[g(s)]`` where group ``g`` owns the sorted rows
  ``[offs[g - 1], offs[g])`` and rows past ``offs[-1]`` are zero: Hugging Face's
  ``transformers::grouped_mm_fallback``, which mixture-of-experts layers (Mixtral, Qwen-MoE, ...) call under
  ``torch.export`` for weights that are not bfloat16. ONNX has no ragged matmul, so each row gathers its
  group's matrix (``Gather(weight, g) -> [S, in, out]``) for one batched ``MatMul``: exact, at the cost of
  ``S`` matrix copies (fine for export and checking, not for speed). (``torch._grouped_mm`` itself does not
  reach the exporter in float32: ``torch.export`` refuses it for dtypes other than bfloat16/float16.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_INT64 = 7  # onnx.TensorProto.INT64


def grouped_mm_offsets(input: Any, weight: Any, offs: Any) -> Any:
    """ONNX for ``grouped_mm(input [S, in], weight [G, in, out], offs [G]) -> [S, out]`` (onnxscript, traced)."""
    from onnxscript import opset18 as op

    ranks = [len(v.shape) if getattr(v, "shape", None) is not None else None for v in (input, weight)]
    if ranks[0] not in (2, None) or ranks[1] not in (3, None):
        raise NotImplementedError(
            f"grouped_mm of ranks {ranks} has no ONNX translation (2-D input, 3-D weight only)"
        )
    rows = op.Range(
        op.Constant(value_int=0), op.Squeeze(op.Shape(input, start=0, end=1)), op.Constant(value_int=1)
    )
    ends = op.Cast(offs, to=_INT64)
    # group of each row: how many group ends lie at or before it
    before = op.Cast(op.LessOrEqual(op.Unsqueeze(ends, [0]), op.Unsqueeze(rows, [1])), to=_INT64)
    group = op.ReduceSum(before, [1], keepdims=0)
    inside = op.Less(group, op.Squeeze(op.Shape(weight, start=0, end=1)))
    picked = op.Gather(weight, op.Where(inside, group, op.Constant(value_int=0)), axis=0)
    out = op.Squeeze(op.MatMul(op.Unsqueeze(input, [1]), picked), [1])
    return op.Where(op.Unsqueeze(inside, [1]), out, op.CastLike(op.Constant(value_float=0.0), out))


def _op(namespace: str, name: str, overload: str = "default") -> Any:
    try:
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):  # not registered in this process (library not imported)
        return None


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the ops above that exist here."""
    grouped = _op("transformers", "grouped_mm_fallback")
    return {} if grouped is None else {grouped: grouped_mm_offsets}
