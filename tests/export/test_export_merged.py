"""Models produced by ``fxmerge.merge`` (not hand-averaged) export to ONNX and match PyTorch within 1e-4 in
onnxruntime: an MLP, a residual BN CNN, a ViT (MultiheadAttention) and a tiny BERT (torch.export frontend,
keyword inputs), plus a partial zip (multi-head GraphModule)."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

import fxmerge
from fxmerge.testing import zoo

TOL = 1e-4


def _data(inputs: tuple, n: int = 3, size: int = 16) -> list:
    g = torch.Generator().manual_seed(7)
    x = inputs[0]
    return [torch.randn((size, *x.shape[1:]), generator=g) for _ in range(n)]


def _ort(path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


@pytest.mark.parametrize(("name", "method"), [("mlp", "mudsc"), ("resnet20a", "zipit"), ("vit_small", "act_align")])
def test_merged_zoo_model_exports(tmp_path, name, method):
    a, inputs = zoo.build(name, 0)
    b, _ = zoo.build(name, 1)
    merged = fxmerge.merge([a, b], method=method, data=_data(inputs), example_inputs=inputs, progress=False).model
    report = fxmerge.export_onnx(merged.eval(), inputs, tmp_path / f"{name}.onnx")
    assert report.max_abs_diff <= TOL
    x = _data(inputs, n=1, size=5)[0]
    with torch.no_grad():
        want = merged(x)
    got = _ort(report.path, {report.input_names[0]: x})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=TOL, rtol=0)


def test_merged_tiny_bert_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50)  # fmt: skip
    a, b = (transformers.BertModel(config).eval() for _ in range(2))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 6), generator=g)
    data = [torch.randint(0, 50, (8, 6), generator=g) for _ in range(3)]
    merged = fxmerge.merge([a, b], method="act_align", data=data, example_inputs=(ids,), progress=False).model
    report = fxmerge.export_onnx(merged.eval(), (ids,), tmp_path / "bert.onnx")
    assert report.max_abs_diff <= TOL
    ids5 = torch.randint(0, 50, (5, 6), generator=g)
    with torch.no_grad():
        want = merged(ids5).last_hidden_state
    np.testing.assert_allclose(_ort(report.path, {report.input_names[0]: ids5})[0], want.numpy(), atol=TOL, rtol=0)


def test_partial_zip_multihead_exports(tmp_path):
    a, inputs = zoo.build("mlp", 0)
    b, _ = zoo.build("mlp", 1)
    res = fxmerge.merge([a, b], method="zipit", data=_data(inputs), example_inputs=inputs, progress=False,
                        stop_at="fc3")  # fmt: skip
    report = fxmerge.export_onnx(res.model, inputs, tmp_path / "heads.onnx")
    assert len(report.output_names) == 2 and report.max_abs_diff <= TOL
