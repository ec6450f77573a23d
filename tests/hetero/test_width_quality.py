"""Elastic width quality: the head balance of models of different widths, against hand computation."""

from __future__ import annotations

import torch
from torch import nn

from fxmerge.hetero import merge_hetero
from fxmerge.hetero.width import balance_heads

from .models import MLP, seeded
from .test_width import DATA, X, widened


class Probe(nn.Module):
    """A body and a linear head, so the head's input and output can be computed by hand."""

    def __init__(self, d_in: int = 5, width: int = 6, out: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(d_in, width)
        self.out = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.body(x)))


def _features(model: Probe, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(model.body(x))


def test_balance_heads_matches_the_hand_formula() -> None:
    """Shares s_m·W_m read the same features: strengths g_m = s_m·rms(W_m z), factors mean(g)/g_m."""
    a, b = seeded(Probe, 0), seeded(Probe, 1)
    with torch.no_grad():
        b.body.load_state_dict(a.body.state_dict())  # same features z, different heads
        b.out.weight.mul_(3.0)
    merged = seeded(Probe, 2)
    with torch.no_grad():
        merged.body.load_state_dict(a.body.state_dict())
    shares = [0.5 * a.out.weight.detach().clone(), 0.25 * b.out.weight.detach().clone()]
    factors = balance_heads(merged, [a, b], {"out.weight": shares}, DATA)["out.weight"]

    z = torch.cat([_features(a, x) for x in DATA]).detach()
    rms = [float((z @ m.out.weight.detach().T).pow(2).sum(1).mean().sqrt()) for m in (a, b)]
    g = [0.5 * rms[0], 0.25 * rms[1]]
    expected = [(g[0] + g[1]) / 2 / g[0], (g[0] + g[1]) / 2 / g[1]]
    assert abs(factors[0] - expected[0]) < 1e-9 and abs(factors[1] - expected[1]) < 1e-9
    weight = expected[0] * shares[0] + expected[1] * shares[1]
    torch.testing.assert_close(merged.out.weight.detach(), weight, rtol=0, atol=1e-12)
    # every model now contributes mean(g) · f_m / rms(f_m): equal strength
    parts = [z @ (f * s).T for f, s in zip(expected, shares, strict=True)]
    strengths = [float(p.pow(2).sum(1).mean().sqrt()) for p in parts]
    assert abs(strengths[0] - strengths[1]) < 1e-9 * strengths[0]


def test_balance_heads_leaves_equal_strengths_unchanged_and_skips_dead_models() -> None:
    a = seeded(Probe, 0)
    merged = seeded(Probe, 2)
    with torch.no_grad():
        merged.body.load_state_dict(a.body.state_dict())
    w = a.out.weight.detach().clone()
    assert balance_heads(merged, [a, a], {"out.weight": [0.5 * w, 0.5 * w]}, DATA) == {"out.weight": [1.0, 1.0]}
    torch.testing.assert_close(merged.out.weight.detach(), w, rtol=0, atol=1e-15)
    before = merged.out.weight.detach().clone()
    assert balance_heads(merged, [a, a], {"out.weight": [0.5 * w, 0.0 * w]}, DATA) == {}  # model 1 lost: skipped
    torch.testing.assert_close(merged.out.weight.detach(), before, rtol=0, atol=0)


def test_widened_copy_merge_is_exact_and_balanced() -> None:
    """A model merged with its function-preserving widened copy is reproduced, with head factors 1."""
    narrow = seeded(MLP, 3, 3, 4)
    wide = widened(narrow)
    result = merge_hetero([wide, narrow], method="zipit", data=DATA, example_inputs=X, width="max", progress=False)
    torch.testing.assert_close(result.model(X), narrow(X), rtol=0, atol=1e-10)
    factors = result.report["engine"]["head_balance"]["out.weight"]
    assert max(abs(f - 1.0) for f in factors) < 1e-9
    assert [layer.out_features for layer in result.model.layers] == [8, 8, 8]
