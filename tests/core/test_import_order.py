"""What a capture sees never depends on which fxmerge modules were imported first."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys, torch
from torch import nn
{first}
from fxmerge.capture.trace import capture
from fxmerge.infer.registry import RULES
model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2))
cg = capture(model, torch.randn(2, 4), "fx")
print(cg.gm.code)
print(len(RULES.copy()._rules))
"""


def _run(first: str) -> str:
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(first=first)], capture_output=True, text=True, check=True)
    return out.stdout


def test_capture_is_independent_of_import_order():
    bare = _run("")
    after_everything = _run("import fxmerge.merge, fxmerge.hetero, fxmerge.export, fxmerge.infer.api")
    assert bare == after_everything
    assert bare.count('getattr(self, "') == 4  # every layer has a rule, so every layer is a leaf
