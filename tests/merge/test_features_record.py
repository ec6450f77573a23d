"""Recording probe values: copied only where an in-place op follows them, found from version counters."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from fxmerge.capture.trace import capture

features = importlib.import_module("fxmerge.merge.features")


def _record(model: nn.Module, x: torch.Tensor, copies: dict) -> tuple[dict, list[str]]:
    cg = capture(model, (x,), "fx")
    names = [n.name for n in cg.gm.graph.nodes if n.op not in ("placeholder", "output")]
    with torch.no_grad():
        (values,) = features._record([cg], set(names), (x,), {}, copies)
    return values, names


def test_a_value_modified_in_place_later_is_recorded_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 4)
    copies: dict = {}
    values, names = _record(model, x, copies)
    (learnt,) = copies.values()
    assert learnt == {names[0]}  # the linear output, overwritten by the in-place ReLU
    with torch.no_grad():
        torch.testing.assert_close(values[names[0]], model[0](x), rtol=0, atol=0)
        assert bool((values[names[0]] < 0).any())  # really the pre-activation
        torch.testing.assert_close(values[names[2]], model(x), rtol=0, atol=0)


def test_values_without_a_later_in_place_op_are_not_copied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 4)
    copies: dict = {}
    values, names = _record(model, x, copies)
    assert list(copies.values()) == [set()]
    with torch.no_grad():
        torch.testing.assert_close(values[names[1]], torch.relu(model[0](x)), rtol=0, atol=0)
