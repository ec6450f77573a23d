"""Group matchers: brute force two-level assignment, group integrity, fast == reference, shared blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from match_oracles import brute_perm, columns_from_matching, random_sym, stacked_corr

from fxmerge.errors import MergeError
from fxmerge.match import align_groups, assign_blocks, block_scores, zip_groups, zip_groups_reference


def group_of(sizes: list[int], n_groups: int) -> list[tuple[int, int]]:
    """(model, group) of every stacked unit."""
    return [(m, u // (c // n_groups)) for m, c in enumerate(sizes) for u in range(c)]


def assert_groups_intact(matching, sizes: list[int], n_groups: int) -> None:
    """Each merged group (contiguous block of K/G columns) holds exactly one original group per model,
    and each original group lands in exactly one merged group."""
    cols = columns_from_matching(matching)
    k = matching.width // n_groups
    owners = group_of(sizes, n_groups)
    merged_of: dict[tuple[int, int], set[int]] = {}
    for (m, g), col in zip(owners, cols, strict=True):
        if col >= 0:
            merged_of.setdefault((m, g), set()).add(int(col) // k)
    assert all(len(v) == 1 for v in merged_of.values())
    for target in range(n_groups):
        models = [m for (m, _), v in merged_of.items() if target in v]
        assert sorted(models) == sorted(set(models)) == list(range(len(sizes)))


@pytest.mark.parametrize("seed", range(4))
def test_block_scores_and_align_groups_equal_brute_force(seed: int) -> None:
    n_groups, c = 3, 3
    sim = random_sym(2 * n_groups * c, seed)
    cross = sim[: n_groups * c, n_groups * c :].numpy()
    scores = np.zeros((n_groups, n_groups))
    inner = {}
    for g in range(n_groups):
        for h in range(n_groups):
            inner[g, h], scores[g, h] = brute_perm(cross[g * c : (g + 1) * c, h * c : (h + 1) * c])
    torch.testing.assert_close(
        block_scores(sim, [9, 9], n_groups)[0], torch.as_tensor(scores), rtol=0, atol=1e-12
    )
    outer, value = brute_perm(scores)
    assert assign_blocks(block_scores(sim, [9, 9], n_groups))[0].tolist() == list(outer)
    m = align_groups(sim, [9, 9], n_groups)
    expected = [-1] * 9
    for g, h in enumerate(outer):
        for i, j in enumerate(inner[g, h]):
            expected[h * c + j] = g * c + i
    assert m.assignment(1).tolist() == expected
    assert m.value == pytest.approx(value, abs=1e-12)


def test_align_groups_recovers_group_respecting_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    n_groups, c = 4, 8
    width = n_groups * c
    a = torch.randn(600, width, generator=g, dtype=torch.float64)
    head_perm = torch.randperm(n_groups, generator=g)
    perm = torch.cat([h * c + torch.randperm(c, generator=g) for h in head_perm.tolist()])
    x = torch.cat([a, a[:, perm]], dim=1)
    sim = torch.corrcoef(x.T)
    sim = (sim + sim.T) / 2
    m = align_groups(sim, [width, width], n_groups)
    assert torch.equal(m.assignment(1), perm)  # B unit j is A unit perm[j]
    blocks = assign_blocks(block_scores(sim, [width, width], n_groups))
    assert torch.equal(blocks[0][head_perm], torch.arange(n_groups))
    assert m.value == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("sizes", "n_groups", "kw"),
    [
        ([24, 24], 4, {}),
        ([24, 24], 3, {"alpha": 0.3, "beta": 0.25, "beta_group": 0.5}),
        ([12, 12, 12], 3, {}),
        ([16, 16], 2, {"beta_group": 0.0}),
        ([16, 16], 4, {"r": 0.75, "alpha": 1.0}),
    ],
)
def test_zip_groups_fast_equals_reference(sizes, n_groups, kw) -> None:
    for seed in range(4):
        for sim in (stacked_corr(150, sizes, seed), random_sym(sum(sizes), seed, levels=2)):
            try:
                fast = zip_groups(sim, sizes, n_groups, **kw)
            except MergeError:
                with pytest.raises(MergeError, match="forbidden"):
                    zip_groups_reference(sim, sizes, n_groups, **kw)
                continue
            ref = zip_groups_reference(sim, sizes, n_groups, **kw)
            for x, y in zip(fast.merge + fast.unmerge, ref.merge + ref.unmerge, strict=True):
                assert torch.equal(x, y)
            assert fast.value == pytest.approx(ref.value, rel=1e-12)
            assert_groups_intact(fast, sizes, n_groups)


@pytest.mark.parametrize("seed", range(5))
def test_group_matchers_never_split_a_group(seed: int) -> None:
    for sizes, n_groups in (([32, 32], 4), ([18, 18, 18], 3), ([12, 20], 4)):
        sim = stacked_corr(200, sizes, seed)
        a = align_groups(sim, sizes, n_groups)
        assert a.width == sizes[0]
        assert_groups_intact(a, sizes, n_groups)
        z = zip_groups(sim, sizes, n_groups)
        assert z.width == n_groups * (sum(sizes) // n_groups // 2)
        assert_groups_intact(z, sizes, n_groups)


def test_zip_groups_two_models_keep_group_size() -> None:
    sizes, n_groups = [32, 32], 4
    z = zip_groups(stacked_corr(200, sizes, 1), sizes, n_groups)
    assert z.width == 32
    merge = torch.cat(z.merge, dim=1)
    torch.testing.assert_close(merge.sum(dim=1), torch.ones(32, dtype=merge.dtype), rtol=0, atol=1e-14)


def test_shared_block_assignment() -> None:
    sizes, n_groups = [24, 24], 4
    sim_qk, sim_v = stacked_corr(150, sizes, 2), stacked_corr(150, sizes, 3)
    shared = assign_blocks(block_scores(sim_qk, sizes, n_groups) + block_scores(sim_v, sizes, n_groups))
    for sim in (sim_qk, sim_v):
        own = assign_blocks(block_scores(sim, sizes, n_groups))
        assert torch.equal(
            align_groups(sim, sizes, n_groups, block_assignment=own).unmerge[1],
            align_groups(sim, sizes, n_groups).unmerge[1],
        )
        for matcher in (align_groups, zip_groups):
            m = matcher(sim, sizes, n_groups, block_assignment=shared)
            cols = columns_from_matching(m)
            k = m.width // n_groups
            for g, h in enumerate(shared[0].tolist()):  # B group h lands in merged group g
                assert set((cols[24 + h * 6 : 24 + (h + 1) * 6] // k).tolist()) == {g}
    one_d = zip_groups(sim_v, sizes, n_groups, block_assignment=shared[0])
    assert torch.equal(
        one_d.unmerge[1], zip_groups(sim_v, sizes, n_groups, block_assignment=shared).unmerge[1]
    )


def test_three_models_star_assignment() -> None:
    sizes, n_groups = [12, 12, 12], 3
    sim = stacked_corr(200, sizes, 5)
    blocks = assign_blocks(block_scores(sim, sizes, n_groups))
    assert blocks.shape == (2, 3)
    m = align_groups(sim, sizes, n_groups)
    for model in (1, 2):
        # merged group of every unit, one row per original group
        groups = (m.assignment(model) // 4).view(n_groups, 4)
        assert torch.equal(groups[:, 0], torch.argsort(blocks[model - 1]))
        assert all(len(set(row.tolist())) == 1 for row in groups)


def test_group_errors() -> None:
    sim = random_sym(16, 0)
    with pytest.raises(MergeError, match="divisible"):
        align_groups(sim, [8, 8], 3)
    with pytest.raises(MergeError, match="permutation"):
        align_groups(sim, [8, 8], 2, block_assignment=torch.tensor([[0, 0]]))
    with pytest.raises(MergeError, match="shape"):
        zip_groups(sim, [8, 8], 2, block_assignment=torch.tensor([[0, 1, 2]]))
    with pytest.raises(MergeError, match="n_groups"):
        block_scores(sim, [8, 8], 0)
    with pytest.raises(MergeError, match="scores"):
        assign_blocks(torch.zeros(2, 2))
