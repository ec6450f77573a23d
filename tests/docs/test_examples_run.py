"""Run ``examples/custom_rule.py`` as a user would and check the numbers it prints.

References: the axis counts are counted by hand from the model (``fc1 6->8``, ``gain[8]``, ``fc2 8->8``,
``fc3 8->3``: 10 parameter axes of size > 1); the permuted gain is recomputed directly from the same seeds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.snippets import check_doc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_rule.py"
N_AXES = 10  # fc1.weight 2 + fc1.bias 1 + gain 1 + fc2.weight 2 + fc2.bias 1 + fc3.weight 2 + fc3.bias 1


@pytest.fixture(scope="module")
def output() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def test_strict_mode_names_the_missing_rule(output: str):
    assert "strict: UnsupportedOpsError" in output
    assert number(output, r"records: (\d+) target: \S*channel_gain\n") == 1
    assert "1 op(s) without a permutation rule (1 kind(s))" in output
    assert "affects 1 parameter(s): gain" in output  # the op's direct parameter input
    assert "@fxmerge.rule" in output and "strict=False" in output


def test_non_strict_freezes_the_op_inputs(output: str):
    # the barrier freezes fc1's rows, fc1.bias, gain and fc2's columns: only fc2's rows stay a group,
    # i.e. fc2.weight[0], fc2.bias[0], fc3.weight[1] -> 3 of 10 axes
    assert number(output, r"non-strict: groups (\d+)") == 1
    assert number(output, r"non-strict: groups \d+, permutable axes (\d+)/") == 3
    assert number(output, r"non-strict: groups \d+, permutable axes \d+/(\d+)") == N_AXES
    assert "gain[0] frozen: input of unsupported op" in output


def test_rule_links_gain_to_its_channels(output: str):
    # hidden 1: fc1.weight[0], fc1.bias[0], gain[0], fc2.weight[1]; hidden 2: fc2.weight[0], fc2.bias[0],
    # fc3.weight[1] -> 7 of 10 axes; inputs and outputs stay fixed
    assert number(output, r"with rule: groups (\d+)") == 2
    assert number(output, r"with rule: groups \d+, permutable axes (\d+)/") == 7
    assert number(output, r"with rule: groups \d+, permutable axes \d+/(\d+)") == N_AXES
    g0 = re.search(r"g0: size 8: (.*)", output).group(1)
    assert set(g0.split(", ")) == {"gain[0]", "fc1.weight[0]", "fc1.bias[0]", "fc2.weight[1]"}
    g1 = re.search(r"g1: size 8: (.*)", output).group(1)
    assert set(g1.split(", ")) == {"fc2.weight[0]", "fc2.bias[0]", "fc3.weight[1]"}
    assert "gain layout: (g0)" in output
    assert number(output, r"export frontend with rule: groups (\d+)") == 2


def test_invariance_holds_and_matters(output: str):
    assert number(output, r"verify_invariance: (\d+) groups") == 2
    assert number(output, r"max \|diff\| (\S+), joint") <= 1e-12  # float64 check
    assert number(output, r"joint (\S+)\n") <= 1e-12
    assert number(output, r"permuted model: output max \|diff\| (\S+),") <= 1e-5  # float32 model
    # the same permutation applied to the gain alone is not a symmetry
    assert number(output, r"gain permuted alone: output max \|diff\| (\S+)") > 1e-2


def test_permuted_gain_matches_direct_computation(output: str):
    gain = torch.rand(8, generator=torch.Generator().manual_seed(0)) + 0.5  # the model's first draw
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))  # random_perms draws g0 first
    expected = float((gain - gain[perm]).abs().max())
    assert number(output, r"gain max \|change\| (\S+)\n") == pytest.approx(expected, abs=5e-4)
    assert expected > 0.1


# ------------------------------------------------------------------------------------ doc snippets

DOCS = ("axis_algebra.md", "rules.md")


@pytest.mark.parametrize("doc", DOCS)
def test_doc_snippets_print_what_the_doc_shows(doc: str):
    check_doc(doc, ROOT)
