"""A killed ``merge-tv`` leaves nothing that a later run trusts or keeps: SIGKILL mid-run, rerun, compare bytes.

The inputs are a base and two fine-tunes of 256 MB each (768 MB read per merge, 256 MB written in four
shards: 1 GB of I/O per run), large enough that the merge is still streaming when the signal arrives.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
N_TENSORS, NUMEL = 8, 8 << 20  # 8 float32 tensors of 32 MiB per model
STAGE_SUFFIX = ".fxmerge-stage"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """``base/``, ``ft0/``, ``ft1/`` as HF folders and ``merge.yaml`` (task arithmetic, 64 MB shards)."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(NUMEL, generator=g)  # one draw, rolled per tensor: distinct values, cheap to make
    base = {f"layers.{i}.weight": noise.roll(7919 * i).view(-1, 1024) for i in range(N_TENSORS)}
    for name, scale in (("base", 0.0), ("ft0", 0.01), ("ft1", -0.02)):
        folder = root / name
        folder.mkdir()
        state = {k: v + scale * noise.roll(104729 * (i + 1) + int(1e3 * scale)).view(-1, 1024)
                 for i, (k, v) in enumerate(base.items())}  # fmt: skip
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    (root / "merge.yaml").write_text("merge_method: task_arithmetic\nbase_model: base\n"
                                     "models: [{model: ft0}, {model: ft1}]\nparameters: {lambda: 0.7}\n"
                                     "shard_size: 64MB\n")  # fmt: skip
    return root


def _start(root: Path, out: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("fxmerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fxmerge.cli"]
    # a shell that starts the test run in the background (``make test &``, some CI runners) hands its children an
    # *ignored* SIGINT, and Python then installs no Ctrl-C handler; a user's terminal does not: restore the default
    return subprocess.Popen([*command, "merge-tv", "merge.yaml", out, "-q"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _stages(root: Path, out: str) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(f".{out}.") and p.name.endswith(STAGE_SUFFIX))


def _wait_for_a_shard(proc: subprocess.Popen, root: Path, out: str, timeout: float = 120.0) -> Path:
    """The staging folder of ``proc`` once it holds a shard (the merge is streaming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stage in _stages(root, out):
            if any(stage.glob("*.safetensors")):
                return stage
        if proc.poll() is not None:
            pytest.fail(f"merge-tv ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no shard appeared in a staging folder")


def _readable(shard: Path) -> bool:
    try:
        with safe_open(str(shard), framework="pt") as f:
            f.keys()
    except Exception:
        return False
    return True


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_midway_then_rerun_is_byte_identical_and_leaves_nothing_stale(big: Path) -> None:
    proc = _start(big, "out")
    stage = _wait_for_a_shard(proc, big, "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (big / "out").exists()
    assert _stages(big, "out") == [stage]  # what a SIGKILL leaves: the next run must clean it
    left = {p.name: (_readable(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in stage.glob("*.safetensors")}
    assert left

    rerun = _start(big, "out")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert _stages(big, "out") == [] and not stage.exists()
    reference = _start(big, "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    got, want = _files(big / "out"), _files(big / "ref")
    assert sorted(got) == sorted(want) == [
        ".fxmerge-manifest.json", "config.json", "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors", "model.safetensors.index.json"]  # fmt: skip
    assert all(got[name] == want[name] for name in got)
    # a shard the kill cut short does not parse (its header is written last); one that parses is complete
    for name, (readable, digest) in left.items():
        assert not readable or digest == hashlib.sha256(want[name]).hexdigest(), name
    with safe_open(str(big / "out" / "model-00001-of-00004.safetensors"), framework="pt") as f:
        first = f.get_tensor("layers.0.weight")
    with safe_open(str(big / "base" / "model.safetensors"), framework="pt") as f:
        assert float((first - f.get_tensor("layers.0.weight")).abs().max()) > 0.01  # a real merge, not zeros


@pytest.mark.parametrize(("sig", "status", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                     (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_sigterm_and_ctrl_c_remove_the_staging_folder(big: Path, sig: int, status: int, word: str) -> None:
    for attempt in range(3):  # a merge can finish between its first shard and the signal (a race, not a bug):
        out = f"out_{word}_{attempt}"  # then it must be complete and clean, and the next attempt signals again
        proc = _start(big, out)
        _wait_for_a_shard(proc, big, out)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        if code == 0:
            assert _stages(big, out) == [] and (big / out).is_dir()  # finished first: a complete output
            continue
        assert code == status
        assert proc.stderr.read().strip().splitlines()[-1] == f"error: {word}"
        assert _stages(big, out) == [] and not (big / out).exists()
        return
    pytest.fail(f"merge-tv finished 3 times before {word} reached it: the signal was never observed")
