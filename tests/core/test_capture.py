"""The capture tracer: its indexed parameter/buffer lookup names get_attr nodes exactly as fx's own scan does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxmerge.capture.frontends import _LeafTracer
from fxmerge.infer.registry import RULES


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w) * self.scale


class _Tied(nn.Module):
    """Direct parameter and buffer accesses, a parameter registered under two names, a shared submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _Inner()
        self.b = _Inner()
        self.b.w = self.a.w  # tied: "a.w" is the first name
        self.shared = self.a
        self.head = nn.Parameter(torch.randn(3, 4))
        self.plain = torch.ones(4)  # an unregistered tensor attribute: stays a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x) + self.shared(x) + self.plain
        return F.linear(y, self.head)


class _FxLookup(_LeafTracer):
    """The same tracer with fx's original (scanning) attribute lookup."""

    def getattr(self, attr: str, attr_val: object, parameter_proxy_cache: dict) -> object:
        return fx.Tracer.getattr(self, attr, attr_val, parameter_proxy_cache)


def _get_attrs(graph: fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "get_attr"]


def test_indexed_lookup_names_attributes_like_fx() -> None:
    model = _Tied()
    ours = _LeafTracer(RULES, stack_traces=False).trace(model)
    reference = _FxLookup(RULES, stack_traces=False).trace(model)
    assert _get_attrs(ours) == _get_attrs(reference)
    assert "a.w" in _get_attrs(ours) and "b.w" not in _get_attrs(ours) and "a.scale" in _get_attrs(ours)
    x = torch.randn(2, 4)
    gm = fx.GraphModule(model, ours)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_index_is_rebuilt_for_each_traced_root() -> None:
    tracer = _LeafTracer(RULES, stack_traces=False)
    first, second = _Tied(), _Tied()
    tracer.trace(first)
    graph = tracer.trace(second)
    gm = fx.GraphModule(second, graph)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), second(x), rtol=0, atol=0)
