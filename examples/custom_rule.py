"""Teach fxmerge a new op: a custom ``torch.library`` op fails in strict mode until it gets a rule.

The model scales its hidden channels with a custom op ``fxmerge_example::channel_gain(x, gain)``
(``x * gain`` on the last axis, as a fused kernel would be). fxmerge never guesses what an unknown op
does, so:

1. strict inference raises :class:`fxmerge.UnsupportedOpsError`, naming the op and the parameters it
   touches;
2. ``strict=False`` turns the op into a barrier: its input axes freeze (fewer groups) and the coverage
   report says why;
3. after ``@fxmerge.rule`` registers the op as element-wise, the gain vector joins the group of the
   channels it scales, and ``fxmerge.verify_invariance`` confirms every group is a symmetry.

Run: ``python examples/custom_rule.py`` (CPU, a second). The printed numbers are checked by
``tests/docs/test_examples_run.py``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

import fxmerge


@torch.library.custom_op("fxmerge_example::channel_gain", mutates_args=())
def channel_gain(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``x * gain`` along the last axis (an op fxmerge has no rule for)."""
    return x * gain


@channel_gain.register_fake
def _(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class GainMLP(nn.Module):
    """``fc1 -> channel_gain -> relu -> fc2 -> relu -> fc3``: hidden widths 8 and 8."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(8, generator=generator) + 0.5)
        # skip_init: no draw from the global RNG; every weight comes from ``generator``
        self.fc1, self.fc2, self.fc3 = (skip_init(nn.Linear, i, o) for i, o in ((6, 8), (8, 8), (8, 3)))
        with torch.no_grad():
            for p in (*self.fc1.parameters(), *self.fc2.parameters(), *self.fc3.parameters()):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(torch.ops.fxmerge_example.channel_gain(self.fc1(x), self.gain))
        return self.fc3(F.relu(self.fc2(h)))


def register_rule() -> None:
    """Register the permutation rule of ``channel_gain`` (in fxmerge's global rule table)."""

    @fxmerge.rule(torch.ops.fxmerge_example.channel_gain, key="channel_gain")
    def channel_gain_rule(ctx, call):
        # element-wise with broadcasting: gain's axis shares the term of x's last axis
        x, gain = call.arg(0, "x"), call.arg(1, "gain")
        return ctx.elementwise(call, [x, gain])


def main() -> None:
    """Fail, fall back, register the rule, verify; print the numbers the docs test checks."""
    gen = torch.Generator().manual_seed(0)
    model = GainMLP(gen)
    inputs = (torch.randn(4, 6, generator=gen),)

    try:
        fxmerge.infer_groups(model, inputs)
    except fxmerge.UnsupportedOpsError as err:
        print("strict: UnsupportedOpsError")
        print(str(err))
        print(f"records: {len(err.records)} target: {err.records[0].target}")

    barrier = fxmerge.infer_groups(model, inputs, strict=False)
    print(f"non-strict: groups {len(barrier)}, permutable axes "
          f"{barrier.coverage.n_permutable_axes}/{barrier.coverage.n_axes}")  # fmt: skip
    gain_reason = next(f.reason for f in barrier.coverage.frozen if f.param == "gain")
    print(f"non-strict: gain[0] frozen: {gain_reason.split(' at ')[0]}")

    register_rule()
    spec = fxmerge.infer_groups(model, inputs)
    print(f"with rule: groups {len(spec)}, permutable axes {spec.coverage.n_permutable_axes}/{spec.coverage.n_axes}")
    print(spec.summary())
    print(f"gain layout: {spec.layout_str('gain')}")
    print(f"export frontend with rule: groups {len(fxmerge.infer_groups(model, inputs, frontend='export'))}")

    report = fxmerge.verify_invariance(model, spec, inputs, seed=0)
    worst = max(report.per_group.values())
    print(f"verify_invariance: {len(report.per_group)} groups, max |diff| {worst:.1e}, joint {report.joint:.1e}")

    perms = spec.random_perms(torch.Generator().manual_seed(1))
    permuted = spec.apply(model, perms)
    alone = copy.deepcopy(model)  # the gain permuted without the channels it scales: not a symmetry
    with torch.no_grad():
        alone.gain.copy_(model.gain[perms[0]])
        x = inputs[0]
        same = (model(x) - permuted(x)).abs().max().item()
        moved = (model.gain - permuted.gain).abs().max().item()
        broken = (model(x) - alone(x)).abs().max().item()
    print(f"permuted model: output max |diff| {same:.1e}, gain max |change| {moved:.3f}")
    print(f"gain permuted alone: output max |diff| {broken:.3f}")


if __name__ == "__main__":
    main()
