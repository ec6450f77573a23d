"""export_onnx failure paths: wrong numbers, unexportable ops, exporter fallback, bad arguments.

Every failure must raise ExportError with a message naming the problem and leave no file behind (and leave
an existing file at the target untouched).
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from export_test_models import MLP, KthModel, SignBranch, reinit_

from fxmerge.errors import ExportError
from fxmerge.export import export_onnx

SHIFT = 0.01


class _ShiftedSession(onnxruntime.InferenceSession):
    """An onnxruntime session whose outputs are all off by SHIFT: a deliberately wrong runtime."""

    def run(self, output_names, input_feed, run_options=None):
        return [out + np.float32(SHIFT) for out in super().run(output_names, input_feed, run_options)]


def _example() -> tuple[torch.nn.Module, torch.Tensor]:
    model = reinit_(MLP(), seed=21).eval()
    return model, torch.randn(3, 6, generator=torch.Generator().manual_seed(22))


def test_wrong_runtime_output_raises_with_the_difference_and_keeps_the_old_file(tmp_path, monkeypatch):
    model, x = _example()
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    monkeypatch.setattr(onnxruntime, "InferenceSession", _ShiftedSession)

    with pytest.raises(ExportError) as info:
        export_onnx(model, x, target)

    err = info.value
    # every element is off by SHIFT (plus float32 rounding of the shifted value, well below 1e-5)
    assert err.max_abs_diff == pytest.approx(SHIFT, abs=1e-5)
    assert err.max_rel_diff is not None and err.max_rel_diff > 0
    message = str(err)
    assert "max abs diff 0.01" in message and "'output'" in message and "example inputs (batch 3)" in message
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_tolerance_smaller_than_the_shift_fails_and_a_larger_one_passes(tmp_path, monkeypatch):
    model, x = _example()
    monkeypatch.setattr(onnxruntime, "InferenceSession", _ShiftedSession)
    with pytest.raises(ExportError):
        export_onnx(model, x, tmp_path / "tight.onnx", atol=SHIFT / 2, rtol=0.0)
    assert list(tmp_path.iterdir()) == []

    report = export_onnx(model, x, tmp_path / "loose.onnx", atol=2 * SHIFT, rtol=0.0)
    assert report.max_abs_diff == pytest.approx(SHIFT, abs=1e-5)


def test_unexportable_op_names_op_module_and_model(tmp_path):
    model = reinit_(KthModel(), seed=23).eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(24))
    with pytest.raises(ExportError) as info:
        export_onnx(model, x, tmp_path / "kth.onnx")

    message = str(info.value)
    assert "could not export KthModel" in message
    assert "op aten.kthvalue has no ONNX translation" in message
    assert "module 'blk' (KthBlock)" in message
    assert "Hint:" in message and "save_program" in message
    assert info.value.max_abs_diff is None
    assert list(tmp_path.iterdir()) == []


def test_data_dependent_branch_falls_back_to_torchscript_and_the_random_check_catches_it(tmp_path):
    model = reinit_(SignBranch(), seed=25).eval()
    x = torch.linspace(-1.0, 1.0, 12).reshape(3, 4) + 0.05  # sum 0.6 > 0: the traced branch is ``y * 2``
    with pytest.raises(ExportError) as info:
        export_onnx(model, x, tmp_path / "branch.onnx", n_random_checks=8, seed=0)

    message = str(info.value)
    assert "torchscript exporter" in message
    assert "The dynamo exporter failed" in message and "data-dependent" in message
    assert "Tracer warnings" in message
    # the two branches differ by |y + 1|, far beyond tolerance wherever the random batch flips the sign
    assert info.value.max_abs_diff > 0.1
    assert list(tmp_path.iterdir()) == []


def test_dynamo_failure_falls_back_to_torchscript_and_is_recorded(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("synthetic dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    model, x = _example()
    report = export_onnx(model, x, tmp_path / "ts.onnx")

    assert report.exporter == "torchscript"
    assert "synthetic dynamo failure" in report.fallback_reason
    assert report.checked_batch_sizes == (3, 4) and report.max_abs_diff <= 1e-4
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, {"x": x6.numpy()})[0], model(x6).numpy(), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize(
    ("inputs", "kwargs", "fragment"),
    [
        ([[torch.zeros(2, 6)]], {}, "positional input 0 is a list"),
        ((torch.zeros(2, 6),), {"atol": -1.0}, "atol and rtol must be >= 0"),
        ((torch.zeros(2, 6),), {"n_random_checks": 1.5}, "n_random_checks must be an integer"),
        ("not a tensor", {}, "example_inputs must be a tensor"),
        ((torch.zeros(2, 5),), {}, "failed on the given inputs"),
        ((torch.zeros(()),), {}, "pass dynamic_batch=False"),
    ],
)
def test_bad_arguments_are_reported_before_anything_is_written(tmp_path, inputs, kwargs, fragment):
    with pytest.raises(ExportError, match=fragment):
        export_onnx(MLP(), inputs, tmp_path / "bad.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_wrong_suffix_and_directory_targets_are_rejected(tmp_path):
    with pytest.raises(ExportError, match=r"should end in \.onnx"):
        export_onnx(MLP(), torch.zeros(2, 6), tmp_path / "model.bin")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(MLP(), torch.zeros(2, 6), tmp_path / "dir.onnx")
