"""ONNX translation of the grouped matmul with offsets of mixture-of-experts layers (Hugging Face's
``transformers::grouped_mm_fallback``, what their experts call under ``torch.export``): the model exports,
and onnxruntime computes exactly what the loop over groups computes, including an empty group and rows past
the last offset (zero)."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from fxmerge.export import export_onnx

GROUPS, IN, OUT, ROWS = 3, 4, 5, 7
ENDS = [2, 2, 5]  # group 0 owns rows 0-1, group 1 none, group 2 rows 2-4; rows 5-6 belong to no group


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(GROUPS, IN, OUT, generator=g))
        self.register_buffer("offs", torch.tensor(ENDS, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.transformers.grouped_mm_fallback(x, self.weight, self.offs)
        return torch.tanh(y) + 1.0  # an op after it, so the graph is not the translation alone


def _loop(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out, start = torch.zeros(x.shape[0], weight.shape[2]), 0
    for g, end in enumerate(ENDS):
        out[start:end] = x[start:end] @ weight[g]
        start = end
    return torch.tanh(out) + 1.0


def test_grouped_mm_exports_and_matches_the_loop(tmp_path) -> None:
    pytest.importorskip("transformers.integrations.moe")  # registers the op
    model = Experts().eval()
    x = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(1))
    want = _loop(x, model.weight.detach())
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), want.numpy(), atol=1e-6)
    report = export_onnx(model, x, tmp_path / "experts.onnx", dynamic_batch=False)
    assert report.exporter == "dynamo"
    session = onnxruntime.InferenceSession(str(tmp_path / "experts.onnx"), providers=["CPUExecutionProvider"])
    fresh = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    np.testing.assert_allclose(got, _loop(fresh, model.weight.detach()).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[5:], np.ones((ROWS - 5, OUT), dtype=np.float32))  # tanh(0) + 1
