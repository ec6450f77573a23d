"""export_onnx failure paths: wrong numbers, unexportable ops, value-dependent branches, bad arguments and paths.

Every failure must raise ExportError with a message naming the problem and leave no file behind (and leave
an existing file at the target untouched).
"""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from export_test_models import MLP, KthModel, LargeValueBranch, SignBranch, TwoHeads, reinit_

from fxmerge.errors import ExportError, ExportInputError, ExportPathError
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
    export_onnx(model, x, target)  # an earlier fxmerge export: the only kind of file an export may replace
    previous = target.read_bytes()
    monkeypatch.setattr(onnxruntime, "InferenceSession", _ShiftedSession)

    with pytest.raises(ExportError) as info:
        export_onnx(reinit_(MLP(), seed=99).eval(), x, target)

    err = info.value
    # every element is off by SHIFT (plus float32 rounding of the shifted value, well below 1e-5)
    assert err.max_abs_diff == pytest.approx(SHIFT, abs=1e-5)
    assert err.max_rel_diff is not None and err.max_rel_diff > 0
    message = str(err)
    assert "max abs diff 0.01" in message and "'output'" in message and "example inputs (batch 3)" in message
    assert target.read_bytes() == previous
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


def _line_of(cls: type, code: str) -> int:
    lines, first = inspect.getsourcelines(cls.forward)
    return first + next(i for i, line in enumerate(lines) if code in line)


def test_data_dependent_branch_is_refused_with_its_source_line(tmp_path):
    """The issue's case: torch.export cannot capture the branch, and nothing silently replaces it."""
    model = reinit_(TwoHeads(), seed=25).eval()
    x = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))  # positive sum: the ``self.b`` branch
    with pytest.raises(ExportError) as info:
        export_onnx(model, x, tmp_path / "branch.onnx")

    message = str(info.value)
    line = _line_of(TwoHeads, "if x.sum() > 0")
    assert "control flow depends on input values" in message and "data-dependent branch" in message
    assert f"export_test_models.py:{line} in forward: return self.b(h) if x.sum() > 0" in message
    assert "exporter='trace'" in message and "torch.where" in message
    assert not isinstance(info.value, ExportInputError)  # the export failed; the arguments were fine
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model_class", [TwoHeads, SignBranch])
def test_traced_branch_is_caught_by_the_branch_checks_and_not_written(tmp_path, model_class):
    model = reinit_(model_class(), seed=25).eval()
    width = 8 if model_class is TwoHeads else 4
    x = torch.rand(3, width, generator=torch.Generator().manual_seed(1)) + 0.05  # positive: one branch only
    with pytest.raises(ExportError) as info:
        export_onnx(model, x, tmp_path / "branch.onnx", exporter="trace")

    message = str(info.value)
    assert "(trace exporter)" in message and "sign-flipped example inputs (batch 3)" in message
    assert "Tracer warnings" in message and "the model's control flow depends on input values" in message
    # the examples and the random batch (drawn in the examples' positive range) agree; the flips do not
    assert info.value.max_abs_diff > 0.5
    assert list(tmp_path.iterdir()) == []


def test_traced_branch_outside_every_rescaling_is_caught_by_the_users_data(tmp_path):
    model = reinit_(LargeValueBranch(), seed=27).eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    report = export_onnx(model, x, tmp_path / "ok.onnx", exporter="trace")  # nothing the checks can flip
    assert report.exporter == "trace" and report.max_abs_diff <= 1e-4
    assert [c.label for c in report.checks][2:] == [
        "sign-flipped example inputs", "scaled x10 example inputs", "scaled x0.1 example inputs",
        "all-zero example inputs", "sign-flipped example inputs",
    ]

    data = [(torch.full((5, 4), 200.0), torch.zeros(5))]  # (inputs, labels): the branch the user feeds
    with pytest.raises(ExportError) as info:
        export_onnx(model, x, tmp_path / "data.onnx", exporter="trace", check_data=data)
    assert "check_data batch #1 (batch 5)" in str(info.value)
    assert info.value.max_abs_diff == pytest.approx(7.0, abs=1e-4)
    assert not (tmp_path / "data.onnx").exists()


def test_dynamo_failure_does_not_fall_back_and_the_tracer_is_an_explicit_choice(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("synthetic dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    model, x = _example()
    with pytest.raises(ExportError, match="synthetic dynamo failure"):
        export_onnx(model, x, tmp_path / "ts.onnx")
    assert list(tmp_path.iterdir()) == []

    report = export_onnx(model, x, tmp_path / "ts.onnx", exporter="trace")
    assert report.exporter == "trace"
    assert report.checked_batch_sizes == (3, 4) and report.max_abs_diff <= 1e-4
    assert len(report.checks) == 7 and all(c.passed for c in report.checks)
    proto = onnx.load(str(report.path))
    assert {p.key: p.value for p in proto.metadata_props}["fxmerge"] == "trace"
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, {"x": x6.numpy()})[0], model(x6).numpy(), atol=1e-4, rtol=0
        )


def test_check_data_must_look_like_the_example_inputs(tmp_path):
    model, x = _example()
    with pytest.raises(ExportInputError, match=r"check_data batch #1: input 'x' is torch.float32 \(2, 5\)"):
        export_onnx(model, x, tmp_path / "m.onnx", check_data=[torch.zeros(2, 5)])
    with pytest.raises(ExportInputError, match="does not have the structure of the example inputs"):
        export_onnx(model, x, tmp_path / "m.onnx", check_data=[{"y": torch.zeros(2, 6)}])
    with pytest.raises(ExportInputError, match="check_data holds no batch"):
        export_onnx(model, x, tmp_path / "m.onnx", check_data=[])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("inputs", "kwargs", "fragment"),
    [
        ([[torch.zeros(2, 6)]], {}, "positional input 0 is a list"),
        ((torch.zeros(2, 6),), {"atol": -1.0}, "atol must be a number >= 0"),
        ((torch.zeros(2, 6),), {"rtol": float("nan")}, "rtol must be a number >= 0"),
        ((torch.zeros(2, 6),), {"exporter": "torchscript"}, "exporter must be one of 'dynamo', 'trace'"),
        ((torch.zeros(2, 6),), {"n_random_checks": 1.5}, "n_random_checks must be an integer"),
        ("not a tensor", {}, "example_inputs must be a tensor"),
        ((torch.zeros(2, 5),), {}, "failed on the given inputs"),
        ((torch.zeros(()),), {}, "pass dynamic_batch=False"),
    ],
)
def test_bad_arguments_are_reported_before_anything_is_written(tmp_path, inputs, kwargs, fragment):
    with pytest.raises(ExportInputError, match=fragment):
        export_onnx(MLP(), inputs, tmp_path / "bad.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_wrong_suffix_and_directory_targets_are_rejected(tmp_path):
    with pytest.raises(ExportPathError, match=r"path .*model.bin should end in \.onnx"):
        export_onnx(MLP(), torch.zeros(2, 6), tmp_path / "model.bin")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ExportPathError, match="is a directory"):
        export_onnx(MLP(), torch.zeros(2, 6), tmp_path / "dir.onnx")


def test_only_files_fxmerge_wrote_are_replaced_and_the_bytes_are_reproducible(tmp_path):
    model, x = _example()
    foreign = tmp_path / "theirs.onnx"
    foreign.write_bytes(b"someone else's model")
    with pytest.raises(ExportPathError, match="was not written by fxmerge"):
        export_onnx(model, x, foreign)
    assert foreign.read_bytes() == b"someone else's model"

    ours = export_onnx(model, x, tmp_path / "ours.onnx").path
    first = ours.read_bytes()
    export_onnx(model, x, ours)  # an earlier fxmerge export is replaced: same model, same bytes
    assert ours.read_bytes() == first
    export_onnx(reinit_(MLP(), seed=5).eval(), x, ours)
    assert ours.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.onnx", "theirs.onnx"]
