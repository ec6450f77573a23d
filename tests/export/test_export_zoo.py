"""Every model of fxmerge.testing.zoo exports to ONNX and matches PyTorch in onnxruntime (slow: ~8 min)."""

from __future__ import annotations

import pytest

zoo = pytest.importorskip("fxmerge.testing.zoo")

from fxmerge.export import export_onnx  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_exports_and_matches_pytorch(tmp_path, name):
    if zoo.ZOO[name].source == "transformers":
        pytest.importorskip("transformers")
    model, inputs = zoo.build(name, seed=0)
    report = export_onnx(model, inputs, tmp_path / f"{name}.onnx")
    assert report.max_abs_diff <= 1e-4
    assert len(report.checked_batch_sizes) == 2 and report.path.is_file()
