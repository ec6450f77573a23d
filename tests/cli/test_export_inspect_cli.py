"""``fxmerge export``, ``inspect`` and ``verify``: results, --json / --quiet, and clear failures."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import fxmerge
from fxmerge.cli import main
from fxmerge.config import run_merge_config
from tests.cli.conftest import MLP, base_config, parents
from tests.cli.tiny_models import IN_DIM


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _ort_matches(path, model, batch: int = 4) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((batch, IN_DIM)).astype(np.float32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=1e-4)


def test_export_a_merge_output_folder(tmp_path, checkpoints):
    cfg = base_config(outputs={"plots": False, "report": False})
    run_merge_config(cfg | {"models": [{"model": MLP, "checkpoint": str(p)} for p in checkpoints]}, tmp_path / "m",
                     progress=False)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        ".fxmerge-manifest.json", "model.safetensors", "model.safetensors.json"]
    result = _invoke("export", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 0, result.output
    assert "(dynamo exporter, opset" in result.stdout and "batch sizes [2, 3]: max |diff|" in result.stdout
    _ort_matches(tmp_path / "m.onnx", fxmerge.load_state(tmp_path / "m" / "model.safetensors"))


def test_export_a_reference_with_a_checkpoint_as_json(tmp_path, checkpoints):
    a, _ = parents()
    result = _invoke("--json", "export", MLP, "--input-shape", "3,6", "--checkpoint", str(checkpoints[0]),
                     "--no-dynamic-batch", "--out", str(tmp_path / "a.onnx"))  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["dynamic_batch"] is False and set(doc["checked_batch_sizes"]) == {3}
    assert doc["max_abs_diff"] < 1e-4
    _ort_matches(tmp_path / "a.onnx", a, batch=3)


def test_export_a_saved_state_file_needs_a_constructor_and_inputs(tmp_path, checkpoints):
    result = _invoke("export", str(checkpoints[1]), "--out", str(tmp_path / "b.onnx"))
    assert result.exit_code == 2 and "records no constructor" in result.output and "--checkpoint" in result.output
    a, _ = parents()
    fxmerge.save_state(a, tmp_path / "c.safetensors", constructor=MLP)
    result = _invoke("export", str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "c.onnx"))
    assert result.exit_code == 2 and "pass --input-shape" in result.output
    result = _invoke("export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "c.onnx"))
    assert result.exit_code == 2 and "file not found" in result.output
    assert not list(tmp_path.glob("*.onnx"))
    result = _invoke("export", str(tmp_path / "c.safetensors"), "--input-shape", "2,6", "--out", str(tmp_path / "c.onnx"))
    assert result.exit_code == 0, result.output
    _ort_matches(tmp_path / "c.onnx", a)


def test_export_failure_names_the_blocking_op_and_writes_nothing(tmp_path):
    result = _invoke("--json", "export", "tests.cli.tiny_models:make_kth", "--input-shape", "2,6", "--out",
                     str(tmp_path / "k.onnx"))  # fmt: skip
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error_type"] == "ExportError"
    assert "aten.kthvalue" in doc["error"] and "module 'lin'" not in doc["error"]
    assert "error: " in result.stderr and "aten.kthvalue" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["export", "torchvision:resnet19", "--out", "x.onnx"],
    ["export", "tests.cli.tiny_models:make_mlp", "--out", "x.onnx"],  # module only: needs --input-shape
    ["export", "tests.cli.tiny_models:make_mlp", "--input-shape", "2,six", "--out", "x.onnx"],
    ["inspect", "nope"],
    ["verify", "tests.cli.tiny_models:not_a_model", "--input-shape", "2,6"],
])  # fmt: skip
def test_invalid_input_exits_2_with_a_message(tmp_path, args):
    args = [str(tmp_path / a) if a.endswith(".onnx") else a for a in args]
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert not list(tmp_path.iterdir())


def test_inspect_and_verify_json_before_or_after_the_command():
    before = _invoke("--json", "inspect", MLP, "--input-shape", "2,6", "--verify")
    after = _invoke("inspect", MLP, "--input-shape", "2,6", "--verify", "--json")
    assert before.exit_code == after.exit_code == 0
    doc, other = json.loads(before.stdout), json.loads(after.stdout)
    assert doc["groups"] == other["groups"] and doc["coverage"] == other["coverage"]
    assert len(doc["groups"]) == 2 and doc["invariance"]["joint"] < 1e-9
    verify = json.loads(_invoke("verify", MLP, "--input-shape", "2,6", "--json").stdout)
    assert verify["ok"] is True and verify["groups"] == 2 and verify["max_diff"] < 1e-9


def test_usage_errors_are_json_with_json():
    result = _invoke("export", "x", "--json")  # --out is missing
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"ok": False, "error": "Missing option '--out'.", "error_type": "UsageError"}
    plain = _invoke("export", "x")
    assert plain.exit_code == 2 and plain.stdout == "" and "Missing option '--out'" in plain.stderr


def test_inspect_text_and_quiet():
    text = _invoke("-q", "inspect", MLP, "--input-shape", "2,6")
    assert text.exit_code == 0 and "Coverage" in text.stdout  # the result is still printed
    verify = _invoke("verify", MLP, "--input-shape", "2,6", "--quiet")
    assert verify.stdout.startswith("ok: 2 groups invariant")


def test_quiet_merge_prints_nothing(tmp_path, checkpoints):
    from tests.cli.conftest import write_yaml

    cfg = write_yaml(tmp_path, base_config(outputs={"report": True, "plots": False, "checkpoint": False}))
    result = _invoke("merge", str(cfg), "--out", str(tmp_path / "o"), "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".fxmerge-manifest.json", "report.json"]
    loud = _invoke("merge", str(cfg), "--out", str(tmp_path / "o"), "--overwrite")
    assert loud.exit_code == 0 and "similarity of merged pairs over 2 spaces" in loud.stdout
    assert "merging 2 models with act_align" in loud.stderr


def test_partial_zip_output_is_saved_as_a_program(tmp_path):
    from fxmerge.config import load_merged

    cfg = base_config(method="zipit", models=[{"model": MLP}, {"model": MLP}], options={"stop_at": "2"},
                      outputs={"plots": False})  # fmt: skip
    report = run_merge_config(cfg, tmp_path / "p", progress=False)
    assert report["files"]["checkpoint"] == {"state": "model.safetensors", "constructor": None, "program": "model.pt2"}
    assert report["partial"]["stop_at"] == "2"
    model, inputs = load_merged(tmp_path / "p")
    outputs = model(*inputs)
    assert isinstance(outputs, tuple) and len(outputs) == 2 and outputs[0].shape == (2, 3)
