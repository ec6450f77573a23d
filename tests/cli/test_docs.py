"""The user docs stay true: docs/cli.md is generated from the CLI, and every python snippet of
getting_started.md, methods.md and testing.md runs and prints the text block shown under it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
RUNNER = """
import contextlib, io, json, sys
out = []
for code in json.load(sys.stdin):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__main__"})
    out.append(buf.getvalue())
print(json.dumps(out))
"""


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    text = _gen_cli().render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python docs/gen_cli.py"
    for command in ("inspect", "verify", "merge", "export", "merge-tv"):
        assert f"## `fxmerge {command}`" in text
    assert "### `data.image_folder`" in text and "| `max_batches` |" in text


def snippets(doc: str) -> list[tuple[str, str | None]]:
    """``(code, documented output or None)`` for every python block, in order."""
    blocks = BLOCK.findall((ROOT / "docs" / doc).read_text())
    pairs = []
    for i, (kind, body) in enumerate(blocks):
        if kind == "python":
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            pairs.append((body, nxt[1] if nxt and nxt[0] == "text" else None))
    return pairs


def run_snippets(codes: list[str], cwd: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(codes), capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("doc", [pytest.param("getting_started.md", marks=pytest.mark.slow), "methods.md", "testing.md"])
def test_doc_snippets_print_what_the_doc_shows(doc: str, tmp_path: Path):
    # a scratch copy of the example configs: snippets write runs/... relative to the working folder
    shutil.copytree(ROOT / "examples" / "configs", tmp_path / "examples" / "configs")
    pairs = snippets(doc)
    assert len(pairs) >= 3, f"{doc}: expected runnable snippets"
    outputs = run_snippets([code for code, _ in pairs], tmp_path)
    for (code, documented), printed in zip(pairs, outputs, strict=True):
        if documented is not None:
            assert printed == documented, f"{doc}: snippet starting {code.splitlines()[0]!r} printed:\n{printed}"


def test_getting_started_shows_the_example_config_verbatim():
    text = (ROOT / "docs" / "getting_started.md").read_text()
    config = (ROOT / "examples" / "configs" / "digits_mlp.yaml").read_text()
    assert any(kind == "yaml" and body == config for kind, body in BLOCK.findall(text))
