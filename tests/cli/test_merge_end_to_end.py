"""``fxmerge merge`` in a subprocess: a model and its permuted copy merged from YAML, and every output reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxmerge
from fxmerge.config import load_merged
from tests.cli.conftest import base_config, parents, run_cli, write_yaml
from tests.cli.tiny_models import IN_DIM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, dict, str]:
    tmp = tmp_path_factory.mktemp("e2e")
    a, b = parents()
    torch.save({"state_dict": a.state_dict()}, tmp / "a.pt")  # a wrapped state dict, as trainers save them
    fxmerge.save_state(b, tmp / "b.safetensors")
    cfg = base_config(evaluate="tests.cli.tiny_models:score", outputs={"onnx": True, "plots": True})
    proc = run_cli("--json", "merge", str(write_yaml(tmp, cfg)), "--out", "runs/merged", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "merged", json.loads(proc.stdout), proc.stderr


def test_output_folder_holds_every_requested_file(merged):
    out, doc, _ = merged
    assert doc["ok"] is True and Path(doc["out"]) == out
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model.safetensors", "model.safetensors.json", "model.onnx", "report.json", "plots/groups.png",
            "plots/similarity_summary.png", "plots/similarity_g0.png", "plots/similarity_g1.png",
            "plots/metrics.png"} <= names  # fmt: skip
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_report_has_similarity_metrics_and_timings(merged):
    out, doc, _ = merged
    report = json.loads((out / "report.json").read_text())
    assert report == {k: v for k, v in doc["report"].items() if k not in ("seconds", "timings")}
    report = doc["report"]  # report.json leaves out the wall-clock values: identical runs, identical files
    assert report["method"] == "act_align" and report["n_models"] == 2 and report["groups"] == 2
    for space in report["similarity"].values():
        # aligning a model with its permuted copy recovers the permutation: every pair is identical
        assert space["after"] >= space["before"]
        assert space["after"] == pytest.approx(1.0, abs=1e-6)
    assert set(report["metrics"]) == {"models[0]", "models[1]", "merged"}
    assert report["metrics"]["merged"]["mean"] == pytest.approx(report["metrics"]["models[0]"]["mean"], abs=1e-5)
    assert set(report["timings"]) >= {"infer", "statistics", "solve"}
    assert report["files"]["onnx"]["max_abs_diff"] < 1e-4
    assert report["config"]["options"]["max_batches"] == 2


def test_state_reloads_to_the_merged_function(merged):
    out, _, _ = merged
    a, b = parents()
    model = fxmerge.load_state(out / "model.safetensors")  # rebuilt by the recorded constructor
    x = torch.randn(5, IN_DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(x), a(x)
    # merging a model with its permuted copy (exact alignment) gives back the model's function
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the same as the Python API's merge of the same models and data
    from tests.cli.tiny_models import batches

    api = fxmerge.merge([a, b], method="act_align", data=batches(), example_inputs=(x,), max_batches=2,
                        progress=False)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(got, api.model(x), atol=1e-6, rtol=1e-6)
    reloaded, inputs = load_merged(out)  # the model and example inputs recorded for export
    assert inputs[0].shape == (2, IN_DIM)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), got)


def test_onnx_runs_in_onnxruntime_with_another_batch_size(merged):
    out, _, _ = merged
    model = fxmerge.load_state(out / "model.safetensors")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((7, IN_DIM)).astype(np.float32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_plots_are_valid_pngs(merged):
    import matplotlib.image

    out, _, _ = merged
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_status_lines_go_to_stderr_and_stdout_is_pure_json(merged):
    _, _, stderr = merged
    assert "merging 2 models with act_align" not in stderr  # --json silences status lines
