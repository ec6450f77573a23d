"""MuDSC ``alpha="auto"``: the grid search picks the argmax of the score, the chosen merge is exactly the one-alpha
merge, the activation statistics are computed once, the label-free proxy behaves as specified, bad input is named."""

from __future__ import annotations

import importlib
import itertools
import json
import math

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.config.schema import option_errors
from fxmerge.errors import MergeInputError
from fxmerge.merge import MuDSC
from fxmerge.merge.select import DEFAULT_GRID, OutputAgreement

api = importlib.import_module("fxmerge.merge.api")  # fxmerge.merge is also the function
X = (torch.randn(4, 6, generator=torch.Generator().manual_seed(0)),)
DATA = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(1, 3)]


def _mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    ).eval()


MODELS = [_mlp(0), _mlp(1)]


def _merge(method, **kw):
    return fxmerge.merge(MODELS, method=method, data=DATA, example_inputs=X, progress=False, **kw)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _sequence_score(values):
    """A score that is a known function of alpha: the grid is merged in order, so call i is grid[i]."""
    calls = []

    def score(model: nn.Module) -> float:
        calls.append(model)
        return values[len(calls) - 1]

    return score, calls


@pytest.mark.parametrize("matcher", ["align", "zip"])
def test_the_chosen_alpha_is_the_argmax_and_its_merge_is_the_one_alpha_merge(matcher):
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    values = [-((a - 0.75) ** 2) for a in grid]  # argmax 0.75
    score, calls = _sequence_score(values)
    res = _merge(MuDSC(alpha="auto", matcher=matcher, score=score, alpha_grid=grid))
    sel = res.report["alpha_selection"]
    assert sel["grid"] == list(grid) and sel["scores"] == values and sel["chosen"] == 0.75
    assert sel["criterion"].startswith("score: ") and len(calls) == len(grid)
    assert _same(res.model, _merge(MuDSC(alpha=0.75, matcher=matcher)).model)
    # the score saw every grid merge (a copy of each): the one it rated best is the one returned
    refs = [_merge(MuDSC(alpha=a, matcher=matcher)).model for a in grid]
    assert all(_same(c, r) for c, r in zip(calls, refs, strict=True))
    assert res.report["settings"]["alpha"] == "auto" and res.report["settings"]["score"] == score.__qualname__
    json.dumps(res.report)  # still plain JSON with a callable among the settings


def test_a_different_argmax_returns_a_different_merge():
    """The grid endpoints merge differently on these models, so the selection is not vacuous."""
    ends = [_merge(MuDSC(alpha=a)).model for a in (0.0, 1.0)]
    assert not _same(*ends)
    for values, chosen in (([1.0, 0.0], 0.0), ([0.0, 1.0], 1.0)):
        score, _ = _sequence_score(values)
        res = _merge(MuDSC(alpha="auto", score=score, alpha_grid=(0.0, 1.0)))
        assert res.report["alpha_selection"]["chosen"] == chosen
        assert _same(res.model, ends[int(chosen)])


def test_ties_go_to_the_alpha_closest_to_one_half():
    score, _ = _sequence_score([1.0, 1.0, 1.0, 0.0, 1.0])
    assert _merge(MuDSC(alpha="auto", score=score)).report["alpha_selection"]["chosen"] == 0.5
    score, _ = _sequence_score([0.0, 1.0, 0.0, 1.0, 0.0])
    assert _merge(MuDSC(alpha="auto", score=score)).report["alpha_selection"]["chosen"] == 0.25


def test_statistics_are_computed_once_for_the_whole_grid(monkeypatch):
    calls = []
    real = api.activation_correlations

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "activation_correlations", counting)
    res = _merge("mudsc", alpha="auto", matcher="zip")
    assert len(calls) == 1 and len(res.report["alpha_selection"]["scores"]) == len(DEFAULT_GRID)


def test_the_proxy_choice_is_exactly_the_one_alpha_merge_and_its_scores_are_the_proxy():
    res = _merge("mudsc", alpha="auto", matcher="align")
    sel = res.report["alpha_selection"]
    assert sel["criterion"].startswith("proxy") and sel["grid"] == list(DEFAULT_GRID)
    proxy = OutputAgreement(MODELS, DATA)
    again = [proxy(_merge(MuDSC(alpha=a, matcher="align")).model) for a in DEFAULT_GRID]
    assert sel["scores"] == pytest.approx(again, abs=1e-12)
    assert sel["chosen"] == DEFAULT_GRID[max(range(len(again)), key=lambda i: (again[i], -abs(DEFAULT_GRID[i] - 0.5)))]
    assert _same(res.model, _merge(MuDSC(alpha=sel["chosen"], matcher="align")).model)
    assert res.alignment is not None  # align candidates are one-to-one: aligned models and interpolation work


def test_the_proxy_is_one_for_a_parent_of_itself_and_falls_as_the_model_drifts_away():
    a, b = MODELS
    assert OutputAgreement([a, a], DATA)(a) == pytest.approx(1.0, abs=1e-12)
    proxy = OutputAgreement([a, b], DATA)
    # the mean of the parents' normalised outputs: each parent alone agrees partly, the same for both here
    gen = torch.Generator().manual_seed(5)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in a.state_dict().items()}
    scores = []
    for level in (0.0, 0.3, 1.0, 3.0):
        m = _mlp(0)
        m.load_state_dict({k: v + level * noise[k] for k, v in a.state_dict().items()})
        scores.append(proxy(m))
    assert all(x > y for x, y in itertools.pairwise(scores))  # strictly decreasing with the drift
    assert -1.0 <= scores[-1] < scores[0] <= 1.0
    # a model exactly halfway in output space (the ensemble of normalised outputs) scores 1
    assert proxy(_Ensemble(a, b)) == pytest.approx(1.0, abs=1e-9)


class _Ensemble(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.nn.functional.normalize
        return norm(self.a(x), dim=1) + norm(self.b(x), dim=1)


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"alpha": 1.5}, r"alpha=1.5: Input should be less than or equal to 1 \(alpha is a number in \[0, 1\] or 'auto'\)"),
    ({"alpha": -0.1}, r"greater than or equal to 0"),
    ({"alpha": math.nan}, r"alpha=nan: Input should be a finite number"),
    ({"alpha": "best"}, r"alpha='best': Input should be a valid number in \[0, 1\] or 'auto'"),
    ({"alpha": "auto", "score": "accuracy"}, r"score must be a Python callable.*not from a YAML config"),
    ({"alpha": 0.5, "score": len}, r"score is used only to select alpha='auto'; alpha is 0.5"),
    ({"alpha": "auto", "alpha_grid": []}, r"alpha_grid must be a non-empty list of numbers in \[0, 1\]"),
    ({"alpha": "auto", "alpha_grid": [0.5, 2]}, r"alpha_grid must be a non-empty list"),
])  # fmt: skip
def test_bad_settings_are_named(settings, fragment):
    with pytest.raises(MergeInputError, match=fragment):
        _merge("mudsc", **settings)


@pytest.mark.parametrize(("value", "fragment"), [
    (math.nan, r"score\(model\) returned a non-finite value \(nan\) at alpha=0.0"),
    (math.inf, r"non-finite value \(inf\)"),
    ("good", r"score\(model\) must return a float .* it returned str 'good'"),
])  # fmt: skip
def test_a_bad_score_value_is_named(value, fragment):
    with pytest.raises(MergeInputError, match=fragment):
        _merge("mudsc", alpha="auto", score=lambda m: value)


def test_auto_is_refused_where_it_cannot_select():
    with pytest.raises(MergeInputError, match="alpha='auto' scores whole merged models; with stop_at"):
        _merge("mudsc", alpha="auto", stop_at="2")
    with pytest.raises(MergeInputError, match="alpha='auto' is not available with depth/width"):
        _merge("mudsc", alpha="auto", width="max")
    with pytest.raises(MergeInputError, match=r"resolved by fxmerge\.merge"):
        MuDSC(alpha="auto").solve(None)  # type: ignore[arg-type]


def test_yaml_options_accept_auto_and_name_a_score_as_python_only():
    assert option_errors("mudsc", {"alpha": "auto", "alpha_grid": [0, 0.5, 1]}) == []
    (err,) = option_errors("mudsc", {"alpha": "auto", "score": "accuracy"})
    assert err.startswith("options.score: score must be a Python callable") and "YAML" in err
    (err,) = option_errors("mudsc", {"alpha": 2})
    assert err.startswith("options.alpha: Input should be less than or equal to 1")
