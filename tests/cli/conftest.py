"""Shared helpers of the CLI tests: configs written to tmp_path and the tiny models' weights."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # config references name tests.cli.tiny_models:...
    sys.path.insert(0, str(ROOT))

import fxmerge  # noqa: E402
from fxmerge.cli import main  # noqa: E402
from tests.cli.tiny_models import IN_DIM, make_mlp  # noqa: E402

MLP = "tests.cli.tiny_models:make_mlp"


def parents(seed: int = 0):
    """An MLP and a copy of it with every hidden group randomly permuted (the same function)."""
    torch.manual_seed(seed)
    a = make_mlp()
    x = (torch.randn(2, IN_DIM),)
    spec = fxmerge.infer_groups(a, x)
    b = spec.apply(a, spec.random_perms(torch.Generator().manual_seed(seed + 1)))
    return a, b


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """``a.pt`` (torch.save state dict) and ``b.safetensors`` (save_state) in tmp_path."""
    a, b = parents()
    torch.save(a.state_dict(), tmp_path / "a.pt")
    fxmerge.save_state(b, tmp_path / "b.safetensors")
    return tmp_path / "a.pt", tmp_path / "b.safetensors"


def base_config(**changes) -> dict:
    cfg = {
        "models": [{"model": MLP, "checkpoint": "a.pt"}, {"model": MLP, "checkpoint": "b.safetensors"}],
        "input_shape": [2, IN_DIM],
        "method": "act_align",
        "options": {"max_batches": 2},
        "data": {"callable": "tests.cli.tiny_models:batches"},
        "outputs": {"plots": False},
    }
    cfg.update(changes)
    return cfg


def write_yaml(tmp_path: Path, cfg: dict | str, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``fxmerge ARGS`` in a fresh interpreter, with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("fxmerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fxmerge.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def merge_cli(tmp_path: Path, cfg: dict | str, *extra: str) -> tuple[int, str, Path]:
    out = tmp_path / "sub" / "out"
    result = CliRunner().invoke(main, ["merge", str(write_yaml(tmp_path, cfg)), "--out", str(out), *extra])
    return result.exit_code, result.output, out


def assert_rejected(tmp_path: Path, cfg: dict | str, *fragments: str) -> str:
    """Run ``fxmerge merge`` on ``cfg``: exit 2, every fragment in the message, nothing created."""
    code, output, out = merge_cli(tmp_path, cfg)
    assert code == 2, output
    for fragment in fragments:
        assert fragment in output, output
    assert not out.exists() and not out.parent.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging folder was left behind"
    return output


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made unwritable for the duration: chmod for a normal user, ``chattr +i`` for root (whom
    permissions do not stop); skips the test where neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def json_failure(proc: subprocess.CompletedProcess, status: int, error_type: str, *fragments: str) -> str:
    """Check a ``--json`` run failed per docs/cli.md: exit ``status``, one ``error:`` line (the last on stderr,
    no traceback) holding every fragment, and one JSON document on stdout repeating it; returns the message."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = errors[0].removeprefix("error: ")
    for fragment in fragments:
        assert fragment in message, message
    assert json.loads(proc.stdout) == {"ok": False, "error": message, "error_type": error_type}
    return message
