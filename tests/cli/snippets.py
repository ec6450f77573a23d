"""Run the python blocks of a docs page in one fresh interpreter and pair each with the ``text`` block after it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


def snippets(doc: str) -> list[tuple[str, str | None]]:
    """``(code, documented output or None)`` for every python block of ``docs/<doc>``, in order."""
    blocks = BLOCK.findall((ROOT / "docs" / doc).read_text())
    pairs = []
    for i, (kind, body) in enumerate(blocks):
        if kind == "python":
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            pairs.append((body, nxt[1] if nxt and nxt[0] == "text" else None))
    return pairs


def run_snippets(codes: list[str], cwd: Path) -> list[str]:
    """What each snippet printed (they share one namespace-per-snippet interpreter, run in order)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(codes), capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_doc(doc: str, cwd: Path) -> None:
    """Every snippet of ``doc`` runs, and prints exactly the text block that follows it in the doc."""
    pairs = snippets(doc)
    assert len(pairs) >= 3, f"{doc}: expected runnable snippets"
    outputs = run_snippets([code for code, _ in pairs], cwd)
    for (code, documented), printed in zip(pairs, outputs, strict=True):
        if documented is not None:
            assert printed == documented, f"{doc}: snippet starting {code.splitlines()[0]!r} printed:\n{printed}"
