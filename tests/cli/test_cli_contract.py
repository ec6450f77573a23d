"""docs/cli.md's contract. The cases of the issue run the installed ``fxmerge`` console script in a subprocess;
further cases run the same command line in-process (``in_process``, the same error handler, much cheaper).

Every command is driven through success, bad input and failed work. A failure is one ``error:`` line on stderr
(no traceback) and, with ``--json``, one JSON document on stdout; the exit status is 2 for bad input (arguments,
config, paths, references and what their code raises, input files) and 1 when the work fails. Outputs never
touch inputs, and identical runs write identical bytes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import fxmerge
from fxmerge.cli import main
from tests.cli import contract_models
from tests.cli.conftest import MLP, base_config, json_failure, parents, read_only, run_cli, write_yaml

CM = "tests.cli.contract_models"
BROKEN = "import torch\ndef make(:\n    return None\n"  # a syntax error on line 2


def in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``fxmerge ARGS`` run in this process from ``cwd``, reported like a subprocess."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, list(args))
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with a digest of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip


def _line(cls: type, code: str) -> int:
    lines, first = inspect.getsourcelines(cls.forward)
    return first + next(i for i, line in enumerate(lines) if code in line)


# -------------------------------------------------------------------------------------- inspect, verify


def test_inspect_success_bad_input_and_failed_work(tmp_path):
    ok = run_cli("--json", "inspect", MLP, "--input-shape", "2,6", "--verify", cwd=tmp_path)
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["groups"]) == 2
    bad = run_cli("--json", "inspect", f"{CM}:factory_with_arguments", "--input-shape", "2,6", cwd=tmp_path)
    json_failure(bad, 2, "UserCodeError", f"MODEL: {CM}:factory_with_arguments cannot be called without arguments",
                 "'width'")  # fmt: skip
    failed = run_cli("--json", "inspect", f"{CM}:make_noisy", "--input-shape", "2,6", "--verify", cwd=tmp_path)
    json_failure(failed, 1, "InvarianceError", "forward is not deterministic in eval mode")


def test_verify_success_bad_input_and_failed_work(tmp_path):
    ok = run_cli("--json", "verify", MLP, "--input-shape", "2,6", cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    (tmp_path / "broken_module.py").write_text(BROKEN)
    bad = run_cli("--json", "verify", "broken_module:make", "--input-shape", "2,6", cwd=tmp_path)
    json_failure(bad, 2, "UserCodeError", "importing module 'broken_module' raised SyntaxError",
                 f"{tmp_path / 'broken_module.py'}, line 2")  # fmt: skip
    failed = run_cli("--json", "verify", f"{CM}:make_noisy", "--input-shape", "2,6", cwd=tmp_path)
    json_failure(failed, 1, "InvarianceError", "forward is not deterministic")


# ---------------------------------------------------------------------------------------------- export


def test_export_success_with_the_tracer_checked_on_the_users_data(tmp_path):
    proc = run_cli("--json", "export", MLP, "--input-shape", "2,6", "--exporter", "trace", "--check-data",
                   "tests.cli.tiny_models:batches", "--out", "m.onnx", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["exporter"] == "trace" and doc["max_abs_diff"] < 1e-4
    labels = [c["label"] for c in doc["checks"]]
    assert labels[2:6] == [f"--check-data batch #{k}" for k in range(1, 5)] and "sign-flipped example inputs" in labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_of_a_data_dependent_branch_fails_and_writes_nothing(tmp_path):
    """The issue's case 1: no exporter may write a file that computes one branch only."""
    line = _line(contract_models.TwoHeads, "x.sum() > 0")
    dynamo = run_cli("--json", "export", f"{CM}:make_two_heads", "--out", "m.onnx", cwd=tmp_path)
    json_failure(dynamo, 1, "ExportError", "control flow depends on input values",
                 f"contract_models.py:{line} in forward: return self.b(h) if x.sum() > 0 else -50 * self.c(h)",
                 "pass --exporter trace", "(--check-data)")  # fmt: skip
    trace = run_cli("--json", "export", f"{CM}:make_two_heads", "--exporter", "trace", "--out", "m.onnx",
                    cwd=tmp_path)  # fmt: skip
    message = json_failure(trace, 1, "ExportError", "(trace exporter)", "sign-flipped example inputs (batch 2)")
    assert "exporter='trace'" not in message and "dynamic_batch" not in message
    assert list(tmp_path.iterdir()) == []


SUB, IN = run_cli, in_process  # the cases run the console script; the others run in-process


@pytest.mark.parametrize(("run", "args", "error_type", "fragments"), [
    # the code of a model reference raises, needs arguments, or does not parse
    (SUB, ["export", f"{CM}:raising_factory", "--input-shape", "2,6"], "UserCodeError",
     [f"SOURCE: building {CM}:raising_factory raised RuntimeError: the weights server is down"]),
    (IN, ["export", f"{CM}:factory_with_arguments", "--input-shape", "2,6"], "UserCodeError",
     ["cannot be called without arguments"]),
    (IN, ["export", "broken_module:make", "--input-shape", "2,6"], "UserCodeError",
     ["importing module 'broken_module' raised SyntaxError: invalid syntax"]),
    # the code of a data reference raises, at once or midway
    (SUB, ["export", MLP, "--input-shape", "2,6", "--check-data", f"{CM}:raising_data"], "UserCodeError",
     [f"--check-data: {CM}:raising_data() raised ValueError: the dataset is offline"]),
    (IN, ["export", MLP, "--input-shape", "2,6", "--check-data", f"{CM}:data_failing_midway"], "UserCodeError",
     [f"--check-data: iterating {CM}:data_failing_midway() raised OSError: lost the data volume"]),
    # strict shapes, numbers and suffixes
    (SUB, ["export", MLP, "--input-shape=-1,8"], "UsageError",
     ["Invalid value for '--input-shape': '-1,8' is not a shape"]),
    (SUB, ["export", MLP, "--input-shape", "2,x"], "UsageError", ["'2,x' is not a shape"]),
    (SUB, ["export", MLP, "--input-shape", "2,6", "--atol", "-1"], "UsageError",
     ["'--atol': '-1' must be a finite number"]),
    (SUB, ["export", MLP, "--input-shape", "2,6", "--out", "m.bin"], "UsageError",
     ["'--out': 'm.bin' must end in .onnx"]),
    (IN, ["export", MLP, "--input-shape", "2,6", "--rtol", "nan"], "UsageError", ["'--rtol': 'nan' must be a finite"]),
    (IN, ["export", MLP, "--input-shape", "2,6", "--opset", "3"], "UsageError", ["'--opset'"]),
    (IN, ["export", "missing.safetensors"], "ConfigError", ["file not found"]),
])  # fmt: skip
def test_export_bad_input_exits_2_and_writes_nothing(tmp_path, run, args, error_type, fragments):
    (tmp_path / "broken_module.py").write_text(BROKEN)
    out = [] if "--out" in args else ["--out", "m.onnx"]
    json_failure(run("--json", *args, *out, cwd=tmp_path), 2, error_type, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["broken_module.py"]


def test_export_to_a_read_only_folder_exits_2(tmp_path):
    with read_only(tmp_path / "ro"):
        proc = run_cli("--json", "export", MLP, "--input-shape", "2,6", "--out", "ro/m.onnx", cwd=tmp_path)
        json_failure(proc, 2, "ExportPathError", f"cannot write in {tmp_path / 'ro'}")


def test_export_inside_its_source_or_over_a_foreign_file_exits_2(tmp_path):
    a, _ = parents()
    fxmerge.save_state(a, tmp_path / "src" / "model.safetensors", constructor=MLP,
                       meta={"model": MLP, "input_shape": [2, 6]})  # what an ``fxmerge merge`` folder holds
    inside = in_process("--json", "export", "src", "--out", "src/m.onnx", cwd=tmp_path)
    json_failure(inside, 2, "ExportPathError", "--out src/m.onnx lies inside the input SOURCE")
    (tmp_path / "theirs.onnx").write_bytes(b"not ours")
    foreign = in_process("--json", "export", "src", "--out", "theirs.onnx", cwd=tmp_path)
    json_failure(foreign, 2, "ExportPathError", "theirs.onnx exists and was not written by fxmerge",
                 "choose another --out")  # fmt: skip
    assert (tmp_path / "theirs.onnx").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "theirs.onnx"]
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["model.safetensors", "model.safetensors.json"]


# ----------------------------------------------------------------------------------------------- merge


def test_merge_success_is_byte_identical_across_runs(tmp_path, checkpoints):
    cfg = write_yaml(tmp_path, base_config(method="mudsc", evaluate="tests.cli.tiny_models:score",
                                           outputs={"onnx": True, "plots": True}))  # fmt: skip
    first = run_cli("--json", "merge", str(cfg), "--out", "runs/one", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["ok"] is True
    second = run_cli("-q", "merge", str(cfg), "--out", "runs/two", cwd=tmp_path)
    assert second.returncode == 0 and second.stdout == "", second.stderr[-2000:]
    one, two = _tree(tmp_path / "runs" / "one"), _tree(tmp_path / "runs" / "two")
    assert {"model.safetensors", "model.onnx", "report.json", ".fxmerge-manifest.json"} <= set(one)
    assert one == two  # every file, the checkpoint's header included
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"]  # no staging folder


def test_merge_onnx_with_the_tracer_is_checked_on_the_data(tmp_path, checkpoints):
    cfg = write_yaml(tmp_path, base_config(outputs={"onnx": True, "onnx_exporter": "trace", "plots": False}))
    proc = in_process("--json", "merge", str(cfg), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    onnx = json.loads(proc.stdout)["report"]["files"]["onnx"]
    assert onnx["exporter"] == "trace" and onnx["max_abs_diff"] < 1e-4
    assert onnx["checks"][2:6] == [f"data: batch #{k}" for k in range(1, 5)] and "all-zero example inputs" in onnx["checks"]


def test_merge_never_writes_over_its_inputs(tmp_path, checkpoints):
    """The issue's case 2: --out on the folder holding the checkpoints, with --overwrite, deletes nothing."""
    cfg = write_yaml(tmp_path, base_config())
    before = _tree(tmp_path)
    proc = run_cli("--json", "merge", str(cfg), "--out", ".", "--overwrite", cwd=tmp_path)
    json_failure(proc, 2, "OutputPathError", f"--out {tmp_path} contains the input config ({cfg})",
                 "choose another --out")  # fmt: skip
    inside = in_process("--json", "merge", str(cfg), "--out", "a.pt/out", "--overwrite", cwd=tmp_path)
    json_failure(inside, 2, "OutputPathError", "lies inside the input models[0].checkpoint")
    assert _tree(tmp_path) == before


def test_merge_read_only_out_and_foreign_files(tmp_path, checkpoints):
    cfg = write_yaml(tmp_path, base_config())
    with read_only(tmp_path / "ro"):
        proc = in_process("--json", "merge", str(cfg), "--out", "ro/out", cwd=tmp_path)
        json_failure(proc, 2, "OutputPathError", f"cannot write in {tmp_path / 'ro'}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    plain = in_process("merge", str(cfg), "--out", "mine", cwd=tmp_path)
    assert plain.returncode == 2 and plain.stdout == "" and "pass --overwrite" in plain.stderr
    forced = in_process("--json", "merge", str(cfg), "--out", "mine", "--overwrite", cwd=tmp_path)
    json_failure(forced, 2, "OutputPathError", "holds files fxmerge did not write (notes.txt)")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(("run", "changes", "error_type", "fragment"), [
    (IN, {"models": [{"model": f"{CM}:raising_factory"}, {"model": MLP}]}, "UserCodeError",
     f"models[0].model: building {CM}:raising_factory raised RuntimeError: the weights server is down"),
    (IN, {"models": [{"model": "broken_module:make"}, {"model": MLP}]}, "ConfigError",
     "models[0].model: importing module 'broken_module' raised SyntaxError"),
    (SUB, {"data": {"callable": f"{CM}:raising_data"}}, "UserCodeError",
     f"data.callable: {CM}:raising_data() raised ValueError: the dataset is offline"),
    (IN, {"data": {"callable": f"{CM}:data_failing_midway"}}, "UserCodeError",
     f"data.callable: iterating {CM}:data_failing_midway() raised OSError: lost the data volume"),
    (IN, {"evaluate": f"{CM}:raising_data"}, "UserCodeError",
     f"evaluate: {CM}:raising_data(models[0]) raised TypeError"),
])  # fmt: skip
def test_merge_user_code_failures_exit_2(tmp_path, checkpoints, run, changes, error_type, fragment):
    (tmp_path / "broken_module.py").write_text(BROKEN)
    cfg = write_yaml(tmp_path, base_config(**changes))
    json_failure(run("--json", "merge", str(cfg), "--out", "out", cwd=tmp_path), 2, error_type, fragment)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == [
        "a.pt", "b.safetensors", "b.safetensors.json", "broken_module.py", "merge.yaml"]


def test_merge_failed_work_exits_1_with_a_usable_hint(tmp_path, checkpoints):
    """NaN in the data: the hint no longer points at an option merge does not take."""
    cfg = write_yaml(tmp_path, base_config(data={"callable": f"{CM}:nan_data"}))
    message = json_failure(run_cli("--json", "merge", str(cfg), "--out", "out", cwd=tmp_path), 1, "MergeError",
                           "activation features contain NaN or inf", "check the data")  # fmt: skip
    assert "nonfinite" not in message
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- merge-tv


@pytest.fixture
def tv_inputs(tmp_path: Path) -> Path:
    """``models/base``, ``models/ft0``, ``models/ft1`` (HF folders) and ``models/merge.yaml``."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}
    folder = tmp_path / "models"
    for name, scale in (("base", 0.0), ("ft0", 0.1), ("ft1", -0.2)):
        (folder / name).mkdir(parents=True)
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(folder / name / "model.safetensors"))  # fmt: skip
        (folder / name / "config.json").write_text('{"model_type": "toy"}')
    (folder / "merge.yaml").write_text("merge_method: ties\nbase_model: base\nmodels: [{model: ft0}, {model: ft1}]\n"
                                       "parameters: {density: 0.5}\n")  # fmt: skip
    return folder


def test_merge_tv_success_and_inputs_are_never_output(tmp_path, tv_inputs):
    ok = run_cli("--json", "merge-tv", "models/merge.yaml", "merged", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    doc = json.loads(ok.stdout)
    assert doc["ok"] is True and doc["method"] == "ties" and doc["n_models"] == 2
    before = _tree(tv_inputs)
    proc = run_cli("--json", "merge-tv", "models/merge.yaml", "models", "--overwrite", cwd=tmp_path)
    json_failure(proc, 2, "TaskVectorPathError", f"OUT_DIR {tv_inputs} contains the input", "choose another OUT_DIR")
    for out, relation in (("models/base", "is the input base"), ("models/ft1/merged", "lies inside the input models[1]")):
        proc = in_process("--json", "merge-tv", "models/merge.yaml", out, "--overwrite", cwd=tmp_path)
        json_failure(proc, 2, "TaskVectorPathError", f"OUT_DIR {tmp_path / out} {relation}")
    assert _tree(tv_inputs) == before  # the case 2: the base and fine-tunes survive


def test_merge_tv_bad_inputs_and_out_folders_exit_2(tmp_path, tv_inputs):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    plain = run_cli("--json", "merge-tv", "models/merge.yaml", "taken", cwd=tmp_path)
    message = json_failure(plain, 2, "TaskVectorPathError", "exists and is not empty; pass --overwrite")
    assert "overwrite=True" not in message
    forced = in_process("--json", "merge-tv", "models/merge.yaml", "taken", "--overwrite", cwd=tmp_path)
    json_failure(forced, 2, "TaskVectorPathError", "holds files fxmerge did not write (notes.txt)")
    with read_only(tmp_path / "ro"):
        proc = run_cli("--json", "merge-tv", "models/merge.yaml", "ro/out", cwd=tmp_path)
        json_failure(proc, 2, "TaskVectorPathError", f"cannot write in {tmp_path / 'ro'}")
    (tv_inputs / "ft1" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!!!!")
    corrupt = run_cli("--json", "merge-tv", "models/merge.yaml", "out", cwd=tmp_path)
    json_failure(corrupt, 2, "TaskVectorError", "corrupt safetensors file")
    (tv_inputs / "ft1" / "model.safetensors").unlink()
    missing = in_process("--json", "merge-tv", "models/merge.yaml", "out", cwd=tmp_path)
    json_failure(missing, 2, "TaskVectorError", "no .safetensors files")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "ro", "taken"]


def test_merge_tv_failed_work_exits_1(tmp_path, tv_inputs, monkeypatch):
    """A failure of the work itself (here the disk filling up while shards are written) exits 1."""
    from fxmerge.taskvector import writer

    def disk_full(self, name, tensor, span=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.ShardedWriter, "write", disk_full)
    result = CliRunner().invoke(main, ["--json", "merge-tv", str(tv_inputs / "merge.yaml"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == "error: No space left on device"
    assert json.loads(result.stdout) == {"ok": False, "error": "No space left on device", "error_type": "OSError"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


# ------------------------------------------------------------------------------- the same from Python


def test_python_writers_name_a_read_only_folder_and_the_keyword(tmp_path):
    """save_state, export_onnx and merge_task_vectors into a read-only folder: an fxmerge error, no traceback
    from deep inside; Python messages name the keyword (``overwrite=True``), not the CLI flag."""
    from fxmerge.errors import ExportPathError, TaskVectorPathError

    a, _ = parents()
    with read_only(tmp_path / "ro"):
        with pytest.raises(ExportPathError, match=f"cannot write in {tmp_path / 'ro'}"):
            fxmerge.save_state(a, tmp_path / "ro" / "a.safetensors")
        with pytest.raises(ExportPathError, match=f"cannot write in {tmp_path / 'ro'}"):
            fxmerge.export_onnx(a, torch.randn(2, 6), tmp_path / "ro" / "a.onnx")
        with pytest.raises(TaskVectorPathError, match=f"cannot write in {tmp_path / 'ro'}"):
            fxmerge.merge_task_vectors(a, [a], method="task_arithmetic", out=tmp_path / "ro" / "out")
        assert list((tmp_path / "ro").iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(TaskVectorPathError, match="pass overwrite=True to replace an earlier fxmerge output"):
        fxmerge.merge_task_vectors(a, [a], method="task_arithmetic", out=tmp_path / "full")
