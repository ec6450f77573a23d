"""Elastic width across different NUMBERS of blocks: attention heads and GroupNorm groups.

Exactness: a model merged with its function-preserving copy that has every head (GroupNorm group) duplicated is
reproduced at either block count (fp64); hand-computed block zips; and the errors for counts no model has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.errors import MergeError
from fxmerge.hetero import merge_hetero
from fxmerge.hetero.structured import zip_blocks, zip_structured

from .models import Transformer, seeded

GEN = torch.Generator().manual_seed(0)
TOKENS = [torch.randn(12, 4, 5, dtype=torch.float64, generator=GEN) for _ in range(3)]
IMAGES = [torch.randn(6, 1, 5, 5, dtype=torch.float64, generator=GEN) for _ in range(3)]
ZIP = {"method": "zipit", "alpha": 1.0, "progress": False}  # α=1: a merged pair keeps its similarity to a 3rd copy


class HeadsNet(nn.Module):
    """Embedding, one residual attention layer of ``heads`` heads of ``head_dim`` (``self.heads`` read in forward),
    mean over tokens, linear head. The attention width ``heads * head_dim`` is independent of ``dim``."""

    def __init__(self, heads: int = 2, head_dim: int = 3, dim: int = 6, in_dim: int = 5, out: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(in_dim, dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.embed(x)
        z = self.qkv(h)
        q, k, v = z.split(z.shape[-1] // 3, dim=2)
        q, k, v = (u.view(b, t, self.heads, u.shape[-1] // self.heads).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.head((h + self.proj(y)).mean(1))


def _block_index(order: Sequence[int], size: int) -> torch.Tensor:
    """Rows of the blocks ``order`` (blocks of ``size`` units)."""
    return torch.cat([torch.arange(g * size, (g + 1) * size) for g in order])


def duplicated_heads(model: HeadsNet, order: Sequence[int] = (0, 1, 0, 1)) -> HeadsNet:
    """``model`` with head ``order[j]`` copied into head j (q/k/v rows duplicated, the proj input columns of a head
    divided by its number of copies): the same function, exactly."""
    d = model.qkv.out_features // 3 // model.heads
    copy = seeded(HeadsNet, 9, len(order), d, model.embed.out_features)
    idx = _block_index(order, d)
    rows = torch.cat([idx + s * model.heads * d for s in range(3)])
    copies = torch.tensor([list(order).count(g) for g in order], dtype=torch.float64).repeat_interleave(d)
    with torch.no_grad():
        copy.embed.load_state_dict(model.embed.state_dict())
        copy.head.load_state_dict(model.head.state_dict())
        copy.qkv.weight.copy_(model.qkv.weight[rows])
        copy.qkv.bias.copy_(model.qkv.bias[rows])
        copy.proj.weight.copy_(model.proj.weight[:, idx] / copies)
        copy.proj.bias.copy_(model.proj.bias)
    return copy


class GroupsNet(nn.Module):
    """conv-GN-ReLU twice (``groups[i]`` groups of ``per`` channels), mean pool, linear head."""

    def __init__(self, groups: Sequence[int] = (2, 2), per: int = 2) -> None:
        super().__init__()
        c1, c2 = groups[0] * per, groups[1] * per
        self.conv1, self.gn1 = nn.Conv2d(1, c1, 3, padding=1), nn.GroupNorm(groups[0], c1)
        self.conv2, self.gn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(groups[1], c2)
        self.head = nn.Linear(c2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn1(self.conv1(x)))
        h = torch.relu(self.gn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def duplicated_groups(model: GroupsNet, order: Sequence[int] = (0, 1, 0, 1), per: int = 2) -> GroupsNet:
    """``model`` with GroupNorm group ``order[j]`` copied into group j in both layers: a copied group has the same
    channels, hence the same statistics, and the readers' weights are divided by the number of copies."""
    copy = seeded(GroupsNet, 9, (len(order), len(order)), per)
    idx = _block_index(order, per)
    copies = torch.tensor([list(order).count(g) for g in order], dtype=torch.float64).repeat_interleave(per)
    with torch.no_grad():
        copy.conv1.weight.copy_(model.conv1.weight[idx])
        copy.conv2.weight.copy_(model.conv2.weight[idx][:, idx] / copies[None, :, None, None])
        for a, b in ((model.conv1, copy.conv1), (model.conv2, copy.conv2), (model.gn1, copy.gn1),
                     (model.gn2, copy.gn2)):  # fmt: skip
            b.bias.copy_(a.bias[idx])
            if isinstance(a, nn.GroupNorm):
                b.weight.copy_(a.weight[idx])
        copy.head.weight.copy_(model.head.weight[:, idx] / copies)
        copy.head.bias.copy_(model.head.bias)
    return copy


def _close(merged: nn.Module, parents: Sequence[nn.Module], data: Sequence[torch.Tensor]) -> None:
    for x in data:
        mean = sum(p(x) for p in parents) / len(parents)
        torch.testing.assert_close(merged(x), mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", [(0, 1, 0, 1), (1, 0, 0, 1)])
def test_duplicated_heads_copy_is_reproduced_at_both_head_counts(order) -> None:
    """2 heads vs the same function with 4 heads (each head twice): width 'min' gives the 2-head model, 'max' a
    4-head model; both compute the parents' (identical) function."""
    small = seeded(HeadsNet, 0)
    big = duplicated_heads(small, order)
    torch.testing.assert_close(big(TOKENS[0]), small(TOKENS[0]), rtol=0, atol=1e-12)
    for models in ([small, big], [big, small]):
        for width, heads in (("min", 2), ("max", 4)):
            result = merge_hetero(models, data=TOKENS, example_inputs=TOKENS[0], width=width, **ZIP)
            merged = result.model
            assert merged.heads == heads and merged.qkv.weight.shape == (9 * heads, 6)
            assert result.report["skeleton_model"] == models.index(small if heads == 2 else big)
            _close(merged, models, TOKENS)
            counts = next(iter(result.report["block_counts"].values()))
            assert counts == {"counts": [m.heads for m in models], "target": heads}
            blocks = next(iter(result.report["engine"]["blocks"].values()))
            i = models.index(big)
            # every copy of a head lands in the merged block of that head of the 2-head model (width 'min')
            if width == "min":
                assert [blocks[1 - i][g] for g in order] == blocks[i]


def test_three_models_with_two_and_four_heads() -> None:
    """2 heads and two 4-head copies (heads 0 1 0 1 and 1 0 0 1): 'max' is rebuilt on the first 4-head model, 'min'
    on the 2-head one; every merged head holds copies of one head only, so the function is kept."""
    small = seeded(HeadsNet, 0)
    models = [small, duplicated_heads(small, (0, 1, 0, 1)), duplicated_heads(small, (1, 0, 0, 1))]
    for width, heads, skeleton in (("max", 4, 1), ("min", 2, 0)):
        result = merge_hetero(models, data=TOKENS, example_inputs=TOKENS[0], width=width, **ZIP)
        assert result.model.heads == heads and result.report["skeleton_model"] == skeleton
        _close(result.model, models, TOKENS)
        blocks = next(iter(result.report["engine"]["blocks"].values()))
        source = [[0, 1], [0, 1, 0, 1], [1, 0, 0, 1]]  # the 2-head model's head behind every block
        merged = {}
        for bl, src in zip(blocks, source, strict=True):
            for b, h in zip(bl, src, strict=True):
                assert merged.setdefault(b, h) == h


def test_duplicated_groupnorm_groups_copy_is_reproduced_at_both_group_counts() -> None:
    """GroupNorm(2) in two layers vs the same function with GroupNorm(4) (each group twice)."""
    small = seeded(GroupsNet, 0)
    big = duplicated_groups(small)
    torch.testing.assert_close(big(IMAGES[0]), small(IMAGES[0]), rtol=0, atol=1e-12)
    for width, groups in (("min", 2), ("max", 4)):
        result = merge_hetero([small, big], data=IMAGES, example_inputs=IMAGES[0], width=width, **ZIP)
        merged = result.model
        assert (merged.gn1.num_groups, merged.gn2.num_groups, merged.gn1.num_channels) == (groups, groups, 2 * groups)
        _close(merged, [small, big], IMAGES)
        assert len(result.report["block_counts"]) == 2


def _perturbed(model: nn.Module, eps: float, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(eps * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    return model


@torch.no_grad()
def _relative_error(model: nn.Module, target: Callable[[torch.Tensor], torch.Tensor]) -> float:
    return max(float((model(x) - target(x)).norm() / target(x).norm()) for x in TOKENS)


def test_block_zip_finds_the_copies_of_each_head_in_a_perturbed_copy() -> None:
    """2 heads vs a perturbed copy with 4 heads (heads 1, 0, 0, 1), default ZipIt settings, width 'min': the block
    zip puts each head's copies with it (measured: 1.6% from the parents' mean output, each parent 12.5% from it);
    blocks assigned by position instead (0, 1, 0, 1: the copies of head 0 and 1 swapped) land 14.9% away."""
    small = seeded(HeadsNet, 0)
    big = _perturbed(duplicated_heads(small, (1, 0, 0, 1)), 0.05, 1)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (small(x) + big(x)) / 2

    kw = {"method": "zipit", "data": TOKENS, "example_inputs": TOKENS[0], "width": "min", "progress": False}
    result = merge_hetero([small, big], **kw)
    assert next(iter(result.report["engine"]["blocks"].values())) == [[0, 1], [1, 0, 0, 1]]
    by_position = lambda scores, counts, target, **_: [np.arange(c) % target for c in counts]  # noqa: E731
    with mock.patch("fxmerge.hetero.structured.zip_blocks", by_position):
        naive = merge_hetero([small, big], **kw)
    zipped, parent, positional = (_relative_error(m, mean) for m in (result.model, small, naive.model))
    assert zipped < 0.02 and 0.12 < parent < 0.13 and positional > 0.14


def test_zip_blocks_by_hand() -> None:
    """Blocks [a0 a1 | b0 b1 b2] zipped to 2 (α = 0.5): a0-b1 (1.8) then a1-b2 (1.6); the cluster {a0, b1} scores
    0.5·min(0.9, 1.0) = 0.45 against b0 and {a1, b2} 0.5·min(0.1, 0.1) = 0.05, so b0 joins {a0, b1}."""
    s = np.full((5, 5), 0.1)
    for (i, j), v in {(0, 3): 1.8, (1, 4): 1.6, (2, 3): 1.0, (0, 2): 0.9}.items():
        s[i, j] = s[j, i] = v
    np.fill_diagonal(s, 2.0)
    block_of = zip_blocks(s, [2, 3], 2, alpha=0.5, beta=1.0)
    assert [b.tolist() for b in block_of] == [[0, 1], [0, 0, 1]]


def test_zip_structured_with_different_block_counts_by_hand() -> None:
    """Model 0: one block (u0 u1); model 1: two blocks (v0 v1 | v2 v3). Block scores (mean of the unit Hungarian):
    (u, v01) = 0.5, (u, v23) = 0.9 (u0~v3 0.95, u1~v2 0.85), (v01, v23) = 0.3. Target 2 blocks of 2: the one block
    merge joins u with v23 (merged block 0, u0 with v3 and u1 with v2); v0, v1 stay alone in merged block 1."""
    sim = torch.zeros(6, 6, dtype=torch.float64)
    for (i, j), v in {(0, 2): 0.5, (1, 3): 0.5, (0, 5): 0.95, (1, 4): 0.85, (2, 4): 0.3, (3, 5): 0.3}.items():
        sim[i, j] = sim[j, i] = v
    sim.fill_diagonal_(1.0)
    block_of, cols, _ = zip_structured([sim], [[2, 4]], [1, 2], [4], alpha=0.5, beta=1.0, target_blocks=2)
    assert [b.tolist() for b in block_of] == [[0], [1, 0]]
    c = cols[0].tolist()
    assert c[0] == c[5] and c[1] == c[4] and {c[0], c[1]} == {0, 1}
    assert sorted([c[2], c[3]]) == [2, 3]
    # one merged block from three: every unit lands in [0, 2)
    block_of, cols, _ = zip_structured([sim], [[2, 4]], [1, 2], [2], alpha=0.5, beta=1.0, target_blocks=1)
    assert [b.tolist() for b in block_of] == [[0], [0, 0]] and set(cols[0].tolist()) == {0, 1}


def test_a_merged_block_with_fewer_units_than_the_block_size_keeps_them_and_stays_partly_empty() -> None:
    """Model 0: one block of 4 units (u0-u3); model 1: two blocks of 1 (v0 | v1). Target 2 blocks of 4: u joins v0
    (u0~v0 0.9 against 0.2 for v1), u0 and v0 zip into one unit; v1 alone fills unit 4 of merged block 1, units
    5-7 get nothing."""
    sim = torch.zeros(6, 6, dtype=torch.float64)
    for (i, j), v in {(0, 4): 0.9, (1, 5): 0.2, (4, 5): 0.1}.items():
        sim[i, j] = sim[j, i] = v
    sim.fill_diagonal_(1.0)
    block_of, cols, _ = zip_structured([sim], [[4, 2]], [1, 2], [8], alpha=0.5, beta=1.0, target_blocks=2)
    assert [b.tolist() for b in block_of] == [[0], [0, 1]]
    c = cols[0].tolist()
    assert c[0] == c[4] and sorted(c[:4]) == [0, 1, 2, 3] and c[5] == 4


def test_block_count_errors() -> None:
    small = seeded(HeadsNet, 0)
    big = duplicated_heads(small)
    kw = {"data": TOKENS, "example_inputs": TOKENS[0], "method": "zipit", "progress": False}
    with pytest.raises(MergeError, match=r"target block count 3 of group g\d+ \(qkv.weight\[0\].*\[2, 4\] blocks.*"
                                         r"width='max' or 'min', or a dict"):  # fmt: skip
        merge_hetero([small, big], width=3, **kw)
    with pytest.raises(MergeError, match=r"differ in width.*width='max'"):
        merge_hetero([small, big], **kw)
    assert merge_hetero([small, big], width=4, **kw).model.heads == 4  # an int that is one model's count
    assert merge_hetero([small, big], width={3: 2}, **kw).model.heads == 2  # g3: the heads (model 0's ids)
    # counts no single model has: 2 then 4 GroupNorm groups vs 4 then 2
    a, b = seeded(GroupsNet, 0, (2, 4)), seeded(GroupsNet, 1, (4, 2))
    kw = {"data": IMAGES, "example_inputs": IMAGES[0], "method": "zipit", "progress": False}
    for width in ("max", "min"):
        with pytest.raises(MergeError, match=r"no model has all the target block counts.*Pass width as a dict"):
            merge_hetero([a, b], width=width, **kw)
    result = merge_hetero([a, b], width={2: 2, 7: 4}, **kw)  # model 0's counts, by its group ids
    assert (result.model.gn1.num_groups, result.model.gn2.num_groups) == (2, 4)
    assert result.report["skeleton_model"] == 0


def test_head_dimension_tied_to_the_width_needs_a_dict() -> None:
    """Transformers whose head dimension is width // heads (models.py), width 16 with 2 heads vs width 8 with 4: at
    'max' (width 16, model 1's 4 heads of 2) the rebuilt model does not run and the error lists the widths; the dict
    {width: 16, heads: 4, one head-dim group: 4} sets all head dimensions and gives a 4-head model of width 16."""
    a, b = seeded(Transformer, 0, 1, 16, 2), seeded(Transformer, 1, 1, 8, 4)
    kw = {"method": "zipit", "data": TOKENS, "example_inputs": TOKENS[0], "progress": False}
    with pytest.raises(MergeError, match=r"rebuilt from model 1 .*'g3': \{'sizes': \[2, 4\], 'target': 4\}.*as a dict"):
        merge_hetero([a, b], width="max", **kw)
    result = merge_hetero([a, b], width={0: 16, 3: 4, 1: 4}, **kw)
    attn = result.model.blocks[0].attn
    assert attn.heads == 4 and attn.qkv.weight.shape == (48, 16) and result.report["skeleton_model"] == 1
    assert {result.report["widths"][f"g{g}"]["target"] for g in (1, 2, 4, 5)} == {4}
    assert torch.isfinite(result.model(TOKENS[0])).all()


def test_depth_merge_with_different_head_counts_is_refused() -> None:
    deep, shallow = seeded(Transformer, 0, 2, 8, 2), seeded(Transformer, 1, 1, 8, 4)
    with pytest.raises(MergeError, match=r"differ in depth and in their numbers of attention heads"):
        merge_hetero([deep, shallow], method="zipit", data=TOKENS, example_inputs=TOKENS[0], depth="uniform",
                     progress=False)  # fmt: skip
