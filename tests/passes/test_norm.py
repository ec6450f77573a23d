"""Normalisation-aware post-passes (norm_repair, unit_repair) and their registry, against hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.config.schema import option_errors
from fxmerge.errors import MergeError, MergeInputError
from fxmerge.merge.options import MergeOptions
from fxmerge.passes import norm_repair, post_pass_names, register_post_pass
from fxmerge.passes.norm import module_moments
from fxmerge.passes.registry import _REGISTRY, PostContext, parse_post


class LinGN(nn.Module):
    """Linear(3 -> 4) -> GroupNorm(2 groups) on [B, C] inputs: small enough to compute by hand."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc, self.gn = nn.Linear(3, 4), nn.GroupNorm(2, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(self.fc(x))


class ConvGN2(nn.Module):
    """Two conv -> GroupNorm layers (the 2-layer GN model of the docs)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.gn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8)
        self.conv2, self.gn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8)
        with torch.no_grad():
            for norm in (self.gn1, self.gn2):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(x)))))


class LNMLP(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.ln, self.fc2 = nn.Linear(5, 16), nn.LayerNorm(16), nn.Linear(16, 3)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 2.0)
            self.ln.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def _hand_gn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
    """GroupNorm(2, 4) of x @ w.T + b, written out: per sample, each pair of channels is normalised."""
    h = x @ w.T + b
    out = torch.empty_like(h)
    for g in (slice(0, 2), slice(2, 4)):
        mu = h[:, g].mean(dim=1, keepdim=True)
        var = h[:, g].var(dim=1, unbiased=False, keepdim=True)
        out[:, g] = (h[:, g] - mu) / torch.sqrt(var + 1e-5)
    return gamma * out + beta


def _pstats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return y.mean(dim=0), y.var(dim=0, unbiased=False).sqrt()


def test_norm_repair_matches_hand_computation_after_averaging() -> None:
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = LinGN(1).double(), LinGN(2).double()
    data = [x[:20], x[20:]]
    result = fxmerge.merge([a, b], method="average", data=data, example_inputs=(x[:2],), progress=False,
                           post=["norm_repair"])  # fmt: skip
    # by hand: parents' per-channel GN output statistics, their average, and the averaged model's statistics
    targets = [_pstats(_hand_gn(x, m.fc.weight, m.fc.bias, m.gn.weight, m.gn.bias)) for m in (a, b)]
    mean_t = (targets[0][0] + targets[1][0]) / 2
    std_t = (targets[0][1] + targets[1][1]) / 2
    avg = {k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()}
    y = _hand_gn(x, avg["fc.weight"], avg["fc.bias"], avg["gn.weight"], avg["gn.bias"])
    mean, std = _pstats(y)
    scale = std_t / std
    expected_gamma = avg["gn.weight"] * scale
    expected_beta = scale * (avg["gn.bias"] - mean) + mean_t
    got = result.model
    torch.testing.assert_close(got.gn.weight.detach(), expected_gamma)
    torch.testing.assert_close(got.gn.bias.detach(), expected_beta)
    torch.testing.assert_close(got.fc.weight.detach(), avg["fc.weight"])  # the producer is left alone
    out_mean, out_std = _pstats(got(x).detach())
    torch.testing.assert_close(out_mean, mean_t)
    torch.testing.assert_close(out_std, std_t)
    assert result.report["post_passes"]["post"] == [
        {"name": "norm_repair", "settings": {}, "info": {"modules": ["gn"]}}
    ]


def test_norm_repair_two_gn_layers_sequential_is_exact() -> None:
    """Both GroupNorms reach their targets, though the first one's fix changes the second one's input."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 1, 6, 6, generator=g) for _ in range(3)]
    a, b = ConvGN2(1), ConvGN2(2)
    result = fxmerge.merge([a, b], method="average", data=data, example_inputs=(data[0][:2],), progress=False,
                           post=["norm_repair"])  # fmt: skip
    x = torch.cat(data)
    names = ["gn1", "gn2"]
    run = {"num_batches": None, "progress": False}
    parent = [module_moments(m, names, [x], run)[0] for m in (a, b)]
    merged, _ = module_moments(result.model, names, [x], run)
    for name in names:
        mean_t = (parent[0][name].mean() + parent[1][name].mean()) / 2
        std_t = (parent[0][name].std() + parent[1][name].std()) / 2
        torch.testing.assert_close(merged[name].mean(), mean_t, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(merged[name].std(), std_t, atol=2e-5, rtol=1e-4)
    # the first layer by hand: gamma' = gamma * s*/s, beta' = s*/s * (beta - m) + m* on the averaged model
    avg = copy.deepcopy(a)
    avg.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()})
    m0, _ = module_moments(avg, ["gn1"], [x], run)
    scale = ((parent[0]["gn1"].std() + parent[1]["gn1"].std()) / 2) / m0["gn1"].std()
    mean_t = (parent[0]["gn1"].mean() + parent[1]["gn1"].mean()) / 2
    torch.testing.assert_close(result.model.gn1.weight.detach().double(), avg.gn1.weight.double() * scale,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    expected_beta = scale * (avg.gn1.bias.double() - m0["gn1"].mean()) + mean_t
    torch.testing.assert_close(result.model.gn1.bias.detach().double(), expected_beta, rtol=1e-5, atol=1e-5)


def test_norm_repair_targets_follow_the_matching() -> None:
    """Parent B is parent A with its hidden units permuted: the alignment undoes it, the merge is A, and the
    targets (B's statistics mapped through the matching) are A's, so norm_repair changes nothing."""
    a = LNMLP(0)
    b = copy.deepcopy(a)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in (b.fc1.weight, b.fc1.bias, b.ln.weight, b.ln.bias):
            p.copy_(p[perm])
        b.fc2.weight.copy_(b.fc2.weight[:, perm])
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    data = [x[:32], x[32:]]
    result = fxmerge.merge([a, b], method="act_align", data=data, example_inputs=(x[:2],), progress=False,
                           post=["norm_repair", "unit_repair"])  # fmt: skip
    for name, p in a.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], p, atol=1e-4, rtol=1e-4)


def test_unit_repair_equals_repair_for_one_to_one_merges() -> None:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    data = [x[:32], x[32:]]
    models = [LNMLP(0), LNMLP(1)]
    kw = {"method": "act_align", "data": data, "example_inputs": (x[:2],), "progress": False}
    old = fxmerge.merge(models, repair=True, **kw)
    new = fxmerge.merge(models, post=["unit_repair"], **kw)
    assert new.report["post_passes"]["post"][0]["info"]["modules"] == old.report["post_passes"]["repair"]
    for name, p in old.model.state_dict().items():
        torch.testing.assert_close(new.model.state_dict()[name], p, atol=1e-5, rtol=1e-4)


def test_unit_repair_after_zipping_reaches_merged_targets() -> None:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    data = [x[:32], x[32:]]
    models = [LNMLP(0), LNMLP(1)]
    result = fxmerge.merge(models, method="zipit", data=data, example_inputs=(x[:2],), progress=False,
                           post=["unit_repair"])  # fmt: skip
    run = {"num_batches": None, "progress": False}
    merged, _ = module_moments(result.model, ["fc1"], [x], run)
    parents = [module_moments(m, ["fc1"], [x], run)[0]["fc1"] for m in models]
    # zipped units average their members' statistics; ZipIt's output has as many units as each parent
    mean_all = torch.cat([p.mean() for p in parents])
    assert merged["fc1"].mean().shape == (16,)
    assert mean_all.min() - 1e-6 <= merged["fc1"].mean().min()
    assert merged["fc1"].mean().max() <= mean_all.max() + 1e-6


def test_repair_and_reset_bn_unchanged_without_post() -> None:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    models = [LNMLP(0), LNMLP(1)]
    result = fxmerge.merge(models, method="act_align", data=[x], example_inputs=(x[:2],), progress=False)
    assert "post" not in result.report["post_passes"]
    assert result.report["options"]["post"] == []


def test_post_option_validation_and_errors() -> None:
    assert {"norm_repair", "unit_repair"} <= set(post_pass_names())
    assert parse_post(["norm_repair", {"unit_repair": {"sequential": False}}]) == [
        ("norm_repair", {}),
        ("unit_repair", {"sequential": False}),
    ]
    with pytest.raises(ValueError, match="did you mean 'norm_repair'"):
        MergeOptions(post=["norm_repai"])
    with pytest.raises(ValueError, match="no setting"):
        MergeOptions(post=[{"norm_repair": {"alpha": 1}}])
    assert option_errors("zipit", {"post": ["norm_repair"]}) == []
    assert option_errors("zipit", {"post": ["nope"]})
    x = torch.randn(8, 5)
    models = [LNMLP(0), LNMLP(1)]
    with pytest.raises(MergeInputError, match="post"):
        fxmerge.merge(models, method="average", example_inputs=(x,), post=["nope"])
    with pytest.raises(MergeError, match="need data"):
        fxmerge.merge(models, method="average", example_inputs=(x,), post=["norm_repair"])


def test_post_with_stop_at_corrects_the_trunk() -> None:
    """With partial zipping the passes fix the merged model before the tails are split off: the trunk's
    LayerNorm output (before the cut) gets the merged targets, the tails stay the parents' own layers."""
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    models = [LNMLP(0), LNMLP(1)]
    kw = {"method": "zipit", "data": [x], "example_inputs": (x[:2],), "progress": False}
    full = fxmerge.merge(models, post=["norm_repair"], **kw)
    part = fxmerge.merge(models, post=["norm_repair"], stop_at="fc2", **kw)
    assert part.report["post_passes"]["post"] == full.report["post_passes"]["post"]
    outs = part.model(x)
    assert len(outs) == 2
    plain = fxmerge.merge(models, stop_at="fc2", **kw).model(x)
    assert not torch.allclose(outs[0], plain[0])  # the trunk was corrected
    assert all(torch.isfinite(o).all() for o in outs)


def test_register_post_pass() -> None:
    @register_post_pass("test_scale_out")
    def scale_out(model: nn.Module, ctx: PostContext, *, factor: float = 2.0) -> tuple[nn.Module, dict]:
        new = copy.deepcopy(model)
        with torch.no_grad():
            new.fc2.weight.mul_(factor)
        return new, {"factor": factor, "parents": len(ctx.models)}

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_post_pass("test_scale_out")(norm_repair)
        with pytest.raises(TypeError, match="signature"):
            register_post_pass("test_bad")(lambda model: model)
        x = torch.randn(8, 5)
        models = [LNMLP(0), LNMLP(1)]
        kw = {"method": "average", "data": [x], "example_inputs": (x,), "progress": False}
        plain = fxmerge.merge(models, **kw).model
        result = fxmerge.merge(models, post=[{"test_scale_out": {"factor": 3.0}}], **kw)
        torch.testing.assert_close(result.model.fc2.weight, 3.0 * plain.fc2.weight)
        assert result.report["post_passes"]["post"][0]["info"] == {"factor": 3.0, "parents": 2}
    finally:
        _REGISTRY.pop("test_scale_out", None)
