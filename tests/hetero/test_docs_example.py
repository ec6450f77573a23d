"""docs/hetero.md's snippet and examples/digits_hetero.py run as a user would (slow)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_docs_snippet_runs(tmp_path: Path) -> None:
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "hetero.md").read_text(), re.S)[0]
    code = code.replace('"cka.png"', repr(str(tmp_path / "cka.png")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert ast.literal_eval(lines[0]) == [[5, 5], [3, 3]]
    slots = ast.literal_eval(lines[1])
    assert len(slots) == 6 and slots[0] == 0 and slots[3] == 5  # stage anchors pinned
    assert ast.literal_eval(lines[2]) == {"sizes": [32, 16], "target": 32}
    assert lines[3] == "64"
    assert (tmp_path / "cka.png").stat().st_size > 0


@pytest.mark.slow
def test_example_quick_width_family(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "digits_hetero.py"), "--quick", "--families", "width",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "results" / "digits_hetero.md").read_text()
    assert "wide x narrow: elastic ZipIt, width max (both directions)" in text
    assert "narrow x narrow: ZipIt (homogeneous)" in text and "wide x wide: ZipIt" in text
    assert text.count("| residual MLP") == 0 and "| resmlp |" in text and "| resnet_bn |" in text  # summary rows
