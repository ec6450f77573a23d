"""BatchNorm statistics reset and REPAIR rescaling against manual statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxmerge.errors import MergeError
from fxmerge.passes.bn import repair, reset_bn_stats


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.bn1 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv(x * scale)))
        return self.bn1(self.fc(h.flatten(1)))


class MLP(nn.Module):
    def __init__(self, seed: int, bias: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 16, bias=bias), nn.Linear(16, 12), nn.Linear(12, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, *shape, generator=g) * 2 + 1 for _ in range(n)]


def manual_bn_stats(model: BNNet, data: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Average over batches of the batch mean and unbiased batch variance of each BN input."""
    seen: dict[str, list[torch.Tensor]] = {"bn1": [], "bn2": []}
    hooks = [
        getattr(model, k).register_forward_pre_hook(lambda _m, a, k=k: seen[k].append(a[0])) for k in seen
    ]
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for k, xs in seen.items():
        dims = [0, 2, 3] if xs[0].dim() == 4 else [0]
        means = torch.stack([x.mean(dim=dims) for x in xs])
        vars_ = torch.stack([x.var(dim=dims, unbiased=True) for x in xs])
        out[k] = means.mean(0), vars_.mean(0)
    return out


def test_reset_bn_stats_equals_manual_statistics() -> None:
    torch.manual_seed(0)
    model = BNNet().eval()
    data = batches(5, (3, 5, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = reset_bn_stats(model, data, progress=False)
    # in train mode BN normalises with batch statistics, so every BN input is independent of running
    # stats: a copy run in train mode on the same batches sees exactly the inputs the reset pass saw
    ref = manual_bn_stats(copy.deepcopy(model), data)
    for k in ("bn1", "bn2"):
        bn = getattr(new, k)
        torch.testing.assert_close(bn.running_mean, ref[k][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref[k][1], rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == 5
    assert new.bn2.momentum == 0.3 and new.bn1.momentum == 0.1  # restored
    assert not new.training and not new.bn1.training  # flags restored (model was in eval mode)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert not torch.equal(new.bn2.running_mean, model.bn2.running_mean)


def test_reset_bn_num_batches_kwargs_and_input_fn() -> None:
    torch.manual_seed(1)
    model = BNNet().train()
    data = batches(6, (3, 5, 5), seed=3)
    ref = manual_bn_stats(copy.deepcopy(model), data[:2])
    new = reset_bn_stats(model, [{"x": x, "scale": 1.0} for x in data], num_batches=2, progress=False)
    torch.testing.assert_close(new.bn2.running_mean, ref["bn2"][0], rtol=1e-5, atol=1e-6)
    assert new.training  # was in train mode
    halved = reset_bn_stats(model, data[:2], progress=False, input_fn=lambda x: ((x * 2,), {"scale": 0.5}))
    torch.testing.assert_close(halved.bn1.running_var, ref["bn1"][1], rtol=1e-5, atol=1e-6)
    tuples = reset_bn_stats(model, [(x, torch.zeros(8)) for x in data[:2]], progress=False)
    torch.testing.assert_close(tuples.bn1.running_mean, ref["bn1"][0], rtol=1e-5, atol=1e-6)


def test_reset_bn_without_bn_does_not_read_data() -> None:
    class Exploding:
        def __iter__(self):
            raise AssertionError("data must not be read")

    model = MLP(0)
    new = reset_bn_stats(model, Exploding(), progress=False)
    assert new is not model
    assert all(torch.equal(a, b) for a, b in zip(new.parameters(), model.parameters(), strict=True))


def test_reset_bn_errors() -> None:
    with pytest.raises(MergeError, match="no batches"):
        reset_bn_stats(BNNet(), [], progress=False)
    with pytest.raises(MergeError, match="batch of type"):
        reset_bn_stats(BNNet(), [3], progress=False)
    with pytest.raises(MergeError, match="num_batches"):
        reset_bn_stats(BNNet(), batches(1, (3, 5, 5)), num_batches=0, progress=False)


def unit_stats(model: nn.Module, name: str, data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    outs = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    y = torch.cat(outs).double()
    y = y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() > 2 else y
    return y.mean(0), y.std(0, unbiased=False)


def averaged(a: nn.Module, b: nn.Module, seed: int = 9) -> nn.Module:
    merged = MLP(seed, bias=a.fc1.bias is not None)
    with torch.no_grad():
        for pm, pa, pb in zip(merged.parameters(), a.parameters(), b.parameters(), strict=True):
            pm.copy_((pa + pb) / 2)
    return merged


@pytest.mark.parametrize("bias", [True, False])
def test_repair_sequential_matches_targets(bias: bool) -> None:
    a, b = MLP(1, bias), MLP(2, bias)
    merged = averaged(a, b)
    data = batches(4, (5,), seed=4)
    probes = ["fc1", "fc2", "fc3"]
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    fixed = repair(merged, [a, b], data, probes, progress=False)
    for name in probes:
        ma, sa = unit_stats(a, name, data)
        mb, sb = unit_stats(b, name, data)
        m, s = unit_stats(fixed, name, data)
        torch.testing.assert_close(m, (ma + mb) / 2, rtol=0, atol=1e-5)
        torch.testing.assert_close(s, (sa + sb) / 2, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in before.items())
    assert fixed.fc1.bias is not None


def test_repair_weights_and_parallel_mode() -> None:
    a, b = MLP(3), MLP(4)
    merged = averaged(a, b)
    data = batches(3, (5,), seed=5)
    fixed = repair(merged, [a, b], data, ["fc1"], weights=[0.25, 0.75], sequential=False, progress=False)
    ma, sa = unit_stats(a, "fc1", data)
    mb, sb = unit_stats(b, "fc1", data)
    m, s = unit_stats(fixed, "fc1", data)
    torch.testing.assert_close(m, 0.25 * ma + 0.75 * mb, rtol=0, atol=1e-5)
    torch.testing.assert_close(s, 0.25 * sa + 0.75 * sb, rtol=1e-5, atol=1e-6)
    # a chain fixed all at once is exact for the first probe only: downstream stats moved afterwards
    both = repair(merged, [a, b], data, ["fc1", "fc2"], sequential=False, progress=False)
    m2, _ = unit_stats(both, "fc2", data)
    assert (m2 - (unit_stats(a, "fc2", data)[0] + unit_stats(b, "fc2", data)[0]) / 2).abs().max() > 1e-3


def test_repair_conv_probe() -> None:
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 1))

    a, b, merged = net(), net(), net()
    data = batches(3, (2, 6, 6), seed=6)
    fixed = repair(merged, [a, b], data, ["0", "2"], progress=False)
    for name in ("0", "2"):
        m, s = unit_stats(fixed, name, data)
        ma, sa = unit_stats(a, name, data)
        mb, sb = unit_stats(b, name, data)
        torch.testing.assert_close(m, (ma + mb) / 2, rtol=0, atol=1e-5)
        torch.testing.assert_close(s, (sa + sb) / 2, rtol=1e-5, atol=1e-6)


def test_repair_errors() -> None:
    a, b = MLP(1), MLP(2)
    data = batches(1, (5,))
    with pytest.raises(MergeError, match="no submodule"):
        repair(a, [a, b], data, ["nope"], progress=False)
    with pytest.raises(MergeError, match="Linear or Conv"):
        repair(nn.Sequential(nn.ReLU()), [nn.Sequential(nn.ReLU())], data, ["0"], progress=False)
    with pytest.raises(MergeError, match="weights"):
        repair(a, [a, b], data, ["fc1"], weights=[1.0], progress=False)
    with pytest.raises(MergeError, match="list of models"):
        repair(a, a, data, ["fc1"], progress=False)
