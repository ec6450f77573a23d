"""export_onnx on an MLP, a BN/residual CNN, a small ViT and a tiny BERT: onnxruntime equals PyTorch.

Each test also re-runs the written file in onnxruntime itself on a batch of a third size and compares it
with the original model in eager PyTorch, so the check does not rely on the report alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from export_test_models import MLP, SmallResCNN, reinit_

from fxmerge.export import export_onnx

TOL = 1e-4


def _ort_run(path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in feed.items()})


def _assert_close(got: list[np.ndarray], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.detach().numpy(), atol=TOL, rtol=0)


def _state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _merged_mlp() -> MLP:
    """A weight average of two differently seeded MLPs: what a merge hands to the exporter."""
    a, b = reinit_(MLP(), seed=1).state_dict(), reinit_(MLP(), seed=101).state_dict()
    merged = MLP().eval()
    merged.load_state_dict({k: 0.5 * (a[k] + b[k]) for k in a})
    return merged


def test_merged_mlp_matches_pytorch_on_examples_and_other_batch(tmp_path):
    model = _merged_mlp()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    report = export_onnx(model, x, tmp_path / "mlp.onnx")

    assert report.path == tmp_path / "mlp.onnx" and report.path.is_file()
    assert report.exporter == "dynamo"
    assert report.input_names == ("x",) and report.output_names == ("output",)
    assert report.checked_batch_sizes == (4, 5)
    assert [c.label for c in report.checks] == ["example inputs", "random inputs #1"]
    assert all(c.passed for c in report.checks)
    assert 0.0 <= report.max_abs_diff <= TOL
    assert report.opset == onnx.load(str(report.path)).opset_import[0].version
    x7 = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_close(_ort_run(report.path, {"x": x7}), [model(x7)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_cnn_with_batchnorm_and_residual_is_exported_in_eval_mode_without_touching_the_model(tmp_path):
    model = reinit_(SmallResCNN(), seed=3).train()
    before = _state_snapshot(model)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    report = export_onnx(model, x, tmp_path / "cnn.onnx", n_random_checks=2, seed=5)

    assert model.training, "export must not switch the caller's model to eval mode"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN statistics or weights changed"
    assert report.checked_batch_sizes == (2, 3) and len(report.checks) == 3
    assert report.max_abs_diff <= TOL
    x5 = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    reference = reinit_(SmallResCNN(), seed=3).eval()  # same weights, eval mode: running statistics used
    with torch.no_grad():
        _assert_close(_ort_run(report.path, {"x": x5}), [reference(x5)])
        train_out = model(x5)  # batch statistics differ from running ones: the export must not match this
    assert np.abs(_ort_run(report.path, {"x": x5})[0] - train_out.numpy()).max() > 1e-2


def test_small_vit_matches_pytorch(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    vit = reinit_(vit, seed=7).eval()  # torchvision initialises the head to zero: randomise it
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    report = export_onnx(vit, x, tmp_path / "vit.onnx")

    assert report.max_abs_diff <= TOL and report.checked_batch_sizes == (2, 3)
    x4 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = vit(x4)
    assert want.abs().max() > 0.1, "reference output is trivial; the comparison would be vacuous"
    _assert_close(_ort_run(report.path, {"x": x4}), [want])


def test_tiny_bert_with_keyword_inputs_and_model_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100
    )
    bert = reinit_(transformers.BertModel(config), seed=10, std=0.05).eval()
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 90, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    report = export_onnx(bert, (ids, {"attention_mask": mask}), tmp_path / "bert.onnx")

    assert report.input_names == ("input_ids", "attention_mask")
    assert report.output_names == ("last_hidden_state", "pooler_output")
    assert report.max_abs_diff <= TOL and report.checked_batch_sizes == (2, 3)
    ids5 = torch.randint(0, 100, (5, 9), generator=gen)
    mask5 = torch.ones(5, 9, dtype=torch.long)
    with torch.no_grad():
        out = bert(ids5, attention_mask=mask5)
    got = _ort_run(report.path, {"input_ids": ids5, "attention_mask": mask5})
    _assert_close(got, [out.last_hidden_state, out.pooler_output])


def test_static_batch_export_fixes_dim0_and_checks_only_that_batch(tmp_path):
    model = reinit_(MLP(), seed=12).eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(13))
    report = export_onnx(model, x, tmp_path / "static.onnx", dynamic_batch=False, n_random_checks=2)

    assert report.checked_batch_sizes == (4,) and len(report.checks) == 3
    dims = onnx.load(str(report.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 6]
    assert report.to_dict()["path"] == str(tmp_path / "static.onnx")


def test_dict_and_tuple_outputs_are_flattened_with_names(tmp_path):
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 2)
            self.b = torch.nn.Linear(3, 4)

        def forward(self, x, scale: float = 1.0):
            return {"logits": self.a(x) * scale, "extra": (self.b(x), None, 7)}

    model = reinit_(TwoHeads(), seed=14).eval()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(15))
    report = export_onnx(model, (x, {"scale": 2.5}), tmp_path / "heads.onnx")

    assert report.input_names == ("x",)
    assert report.output_names == ("logits", "extra.0")
    with torch.no_grad():
        want = model(x, scale=2.5)
    _assert_close(_ort_run(report.path, {"x": x}), [want["logits"], want["extra"][0]])
