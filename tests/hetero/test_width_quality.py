"""Elastic width quality: the head balance of models of different widths, against hand computation."""

from __future__ import annotations

import torch
from torch import nn

from fxmerge.hetero import merge_hetero
from fxmerge.hetero.width import balance_heads, zip_structured

from .models import MLP, Transformer, seeded
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


class GNNet(nn.Module):
    """conv-GN-ReLU twice, mean pool, linear head: GroupNorm groups of ``width // groups`` channels."""

    def __init__(self, width: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(groups, width)
        self.conv2, self.gn2 = nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn1(self.conv1(x)))
        h = torch.relu(self.gn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def widened_gn(model: GNNet, groups: int = 2) -> GNNet:
    """``model`` with every channel duplicated inside its group (twice the channels per group): same function."""
    c = model.conv1.out_channels // groups
    idx = torch.cat([torch.arange(j * c, (j + 1) * c).repeat(2) for j in range(groups)])
    wide = seeded(GNNet, 9, 2 * model.conv1.out_channels, groups)
    with torch.no_grad():
        wide.conv1.weight.copy_(model.conv1.weight[idx])
        wide.conv2.weight.copy_(model.conv2.weight[idx][:, idx] / 2)
        for a, b in ((model.conv1.bias, wide.conv1.bias), (model.conv2.bias, wide.conv2.bias)):
            b.copy_(a[idx])
        for a, b in ((model.gn1, wide.gn1), (model.gn2, wide.gn2)):
            b.weight.copy_(a.weight[idx])
            b.bias.copy_(a.bias[idx])
        wide.head.weight.copy_(model.head.weight[:, idx] / 2)
        wide.head.bias.copy_(model.head.bias)
    return wide


IMAGES = [torch.randn(6, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(3)]


def test_groupnorm_channels_per_group_widened_copy_is_reproduced() -> None:
    """GroupNorm(2, 4) merged with its exact GroupNorm(2, 8) widening: output = the model, groups kept."""
    narrow = seeded(GNNet, 0)
    wide = widened_gn(narrow)
    torch.testing.assert_close(wide(IMAGES[0]), narrow(IMAGES[0]), rtol=0, atol=1e-12)
    for models in ([wide, narrow], [narrow, wide]):
        result = merge_hetero(models, method="zipit", data=IMAGES, example_inputs=IMAGES[0], width="max",
                              progress=False)  # fmt: skip
        merged = result.model
        assert (merged.gn1.num_groups, merged.gn1.num_channels, merged.conv2.weight.shape) == (2, 8, (8, 8, 3, 3))
        for x in IMAGES:
            torch.testing.assert_close(merged(x), narrow(x), rtol=0, atol=1e-10)


def test_groupnorm_groups_of_different_size_merge_to_the_target_shape() -> None:
    """Independent GN models of 2 vs 4 channels per group: merged shapes follow the target, groups kept whole."""
    a, b = seeded(GNNet, 1, 8), seeded(GNNet, 2, 4)
    for width, size in (("max", 8), ("min", 4), (3, 6)):  # an int sizes each group: 3 channels x 2 groups
        result = merge_hetero([a, b], method="zipit", data=IMAGES, example_inputs=IMAGES[0], width=width,
                              progress=False)  # fmt: skip
        m = result.model
        assert (m.gn1.num_groups, m.gn1.num_channels, m.gn2.weight.shape[0], m.head.in_features) == (2, size, size, size)
        assert m(IMAGES[0]).shape == (6, 3)


def test_zip_structured_pairs_blocks_and_zips_inside_them() -> None:
    """Hand-built similarity over 2 blocks of 2 (model 0) and 4 (model 1) units: block pairing and zips by hand."""
    # model 0: blocks [u0 u1 | u2 u3] = rows 0-3; model 1: blocks [v0 v1 v2 v3 | v4 v5 v6 v7] = rows 4-11.
    # u0, u1 ~ v2, v3 (1.0) and ~ v4, v5 (0.9); u2, u3 ~ v0, v1 and v2, v3 (0.8). Block scores (mean of the
    # unit Hungarian): (0,0) 1.0, (0,1) 0.9, (1,0) 0.8, (1,1) 0: identity pairing 1.0 < swapped 1.7.
    sim = torch.zeros(12, 12, dtype=torch.float64)
    pairs = [(0, 6), (1, 7), (0, 8), (1, 9), (2, 2 + 2), (3, 2 + 3), (2, 2 + 4), (3, 2 + 5)]
    values = [1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8]
    for (i, j), v in zip(pairs, values, strict=True):
        sim[i, j] = sim[j, i] = v
    sim.fill_diagonal_(1.0)
    block_of, cols, _ = zip_structured([sim], [[4, 8]], 2, [8], alpha=0.5, beta=0.0)
    assert [b.tolist() for b in block_of] == [[0, 1], [1, 0]]  # model 1's block 0 joins merged block 1
    merged_block = cols[0] // 4  # 4 merged units per block
    assert merged_block[:2].tolist() == [0, 0] and merged_block[2:4].tolist() == [1, 1]
    assert merged_block[4:8].tolist() == [1] * 4 and merged_block[8:].tolist() == [0] * 4
    # beta=0 (no within-model merges), 6 units -> 4 per merged block: u0 joins v4, u1 joins v5, v6, v7 stay alone
    assert cols[0][0] == cols[0][8] and cols[0][1] == cols[0][9]
    assert len({int(c) for c in cols[0][[0, 1, 10, 11]]}) == 4


def test_attention_head_dim_elastic_merge() -> None:
    """Transformers with 2 heads of 8 vs 2 heads of 4: merged at the target head dimension, same head count;
    a model merged with itself through the elastic path (MLP zipped to twice its width) is reproduced."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, dtype=torch.float64, generator=gen)
    data = [torch.randn(16, 4, 5, dtype=torch.float64, generator=gen) for _ in range(3)]
    wide, narrow = seeded(Transformer, 0, 1, 16, 2), seeded(Transformer, 1, 1, 8, 2)
    for width, dim in (("max", 16), ("min", 8)):
        result = merge_hetero([narrow, wide], method="zipit", data=data, example_inputs=x, width=width, progress=False)
        m = result.model
        assert m.blocks[0].attn.qkv.weight.shape == (3 * dim, dim) and m.blocks[0].attn.heads == 2
        assert m.head.weight.shape == (3, dim) and m(x).shape == (6, 3)
    result = merge_hetero([narrow, narrow], method="zipit", data=data, example_inputs=x, width={6: 32}, progress=False)
    assert result.report["engine"]["elastic"] and result.model.blocks[0].fc1.out_features == 32
    torch.testing.assert_close(result.model(x), narrow(x), rtol=0, atol=1e-10)
    # different head counts (4 heads of 4 vs 2 heads of 4) are merged by zipping the heads (test_block_counts.py)
    result = merge_hetero([seeded(Transformer, 0, 1, 16, 4), narrow], method="zipit", data=data, example_inputs=x,
                          width="max", progress=False)  # fmt: skip
    assert result.model.blocks[0].attn.heads == 4 and result.report["skeleton_model"] == 0
    assert result.model.blocks[0].attn.qkv.weight.shape == (48, 16) and torch.isfinite(result.model(x)).all()
