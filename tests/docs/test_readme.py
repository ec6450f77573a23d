"""The README's Python quickstart runs verbatim (in a scratch directory) and does what it says."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _first_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python block"
    return blocks[0]


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("make ")]
    assert lines[0].startswith("make demo") and lines[1].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path: Path):
    code = _first_python_block()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the last print is the similarity row of the first group: before < after for an alignment
    row = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert row["after"] > row["before"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "merged.onnx")))
