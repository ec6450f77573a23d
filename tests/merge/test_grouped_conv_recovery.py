"""A grouped convolution whose per-group input channels form one group shared by every conv group (ResNeXt,
timm ``dla46x_c``, ``dpn48b``, ``cpubone_nano``): merging the model with a permuted copy of itself computes the
model, in float64, for every data-driven method.

The block is conv1 -> BatchNorm -> ReLU -> grouped conv2 -> BatchNorm -> ReLU -> conv3 (+ residual). The first
conv group's inputs are dead after the ReLU on all data (as in the timm models with random weights), so that
group's conv2 outputs are constant: 0 at the conv, each unit's own constant after its BatchNorm. Their
activations differ only in those constants; compared by a Pearson correlation over the stacked probe points
(conv, norm, ReLU as extra samples) they correlated +-1 with each other, the true partner tied with its dead
neighbours, and the merge averaged the BatchNorm parameters of different units (relative error ~1e-2).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxmerge
from fxmerge.ir.layout import G, Prod
from fxmerge.stats import CorrelationAccumulator
from fxmerge.stats.probes import _Points

GROUPS, PER_GROUP = 4, 4
RTOL = 1e-6


class _Block(nn.Module):
    def __init__(self, c: int, mid: int, groups: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Block(8, GROUPS * PER_GROUP, GROUPS)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(F.relu(self.stem(x))).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Net().double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                bn.bias.copy_(torch.rand(c, generator=g, dtype=torch.float64) - 0.5)
                bn.running_mean.copy_(0.2 * torch.rand(c, generator=g, dtype=torch.float64) - 0.1)
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
        # conv group 0's inputs: dead after the ReLU on any data
        model.block.bn1.bias[:PER_GROUP] = -1e3
        # its outputs: distinct positive constants after bn2 (0 -> bias - mean * weight / std), kept by the ReLU
        model.block.bn2.bias[:PER_GROUP] = 1.0 + torch.arange(PER_GROUP, dtype=torch.float64) / PER_GROUP
    return model


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]


def _error(model: nn.Module, reference: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return max(float((model(x) - reference(x)).abs().max() / reference(x).abs().max()) for x in data)


@pytest.fixture(scope="module")
def case():
    model, data = _model(), _data()
    spec = fxmerge.infer_groups(model, (data[0],))
    perms = spec.random_perms(torch.Generator().manual_seed(2))
    return model, spec.apply(model, perms), spec, data


def test_the_spec_has_a_shared_per_group_input_group(case) -> None:
    model, permuted, spec, data = case
    weight = spec.axes["block.conv2.weight"]
    assert isinstance(weight[0], Prod) and weight[0].outer.size == GROUPS
    assert isinstance(weight[1], G) and weight[1].size == PER_GROUP  # in-channels per group: one shared group
    inputs = spec.axes["block.conv1.weight"][0]
    assert isinstance(inputs, Prod) and set(inputs.inners) == {weight[1]}
    assert _error(permuted, model, data) <= 1e-12, "the permuted copy computes the model"
    with torch.no_grad():
        assert float(model.block.bn1(model.block.conv1(F.relu(model.stem(data[0]))))[:, :PER_GROUP].max()) < 0


@pytest.mark.parametrize("method", ["act_align", "mudsc", "zipit"])
def test_merge_with_permuted_copy_computes_the_model(case, method: str) -> None:
    model, permuted, spec, data = case
    result = fxmerge.merge([model, permuted], method=method, data=data, example_inputs=(data[0],), spec=spec,
                           progress=False, reset_bn=False)  # fmt: skip
    assert result.report["identity_groups"] == []
    err = _error(result.model, model, data)
    assert err <= RTOL, f"{method}: merged outputs differ from the model's by {err:.3g} (relative)"


def test_probe_points_are_centred_each_on_its_own_mean() -> None:
    """Stacked probe points with per-point offsets: the correlation is that of the features centred per point
    (the offsets say only where a sample was taken), and units constant at every point are compared by value."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g, dtype=torch.float64)
    points = [base * 0.01 + torch.tensor([5.0, -3.0, 1.0], dtype=torch.float64), base * 0.02]
    const = [torch.full((200, 2), v, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
             for v in (0.0, 1.5)]  # fmt: skip
    acc, stacked, stats = CorrelationAccumulator([5]), CorrelationAccumulator([5]), _Points(2)
    for j, (p, c) in enumerate(zip(points, const, strict=True)):
        f = [torch.cat([p, c], dim=1)]
        stacked.update(f)
        x = stats.centre(j, f[0].clone())
        acc.add_rows(x, *stats.last_range)
    stats.reduce(5, None)
    corr = stats.correlation(acc)
    expected = torch.corrcoef(base.T)
    assert torch.allclose(corr[:3, :3], expected, atol=1e-10)
    assert abs(float(stacked.correlation()[0, 1])) > 0.99 > abs(float(expected[0, 1]))  # stacked: the offsets
    assert torch.equal(corr[3:, :3], torch.zeros(2, 3, dtype=torch.float64))
    assert float(corr[3, 4]) == pytest.approx(1 - 1.5 / 4.5)  # constants (0, 1.5) vs (0, 3)
