"""Greedy zip: fast kernel == naive reference == definitional brute force; hand examples; budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from match_oracles import columns_from_matching, columns_of, random_sym, stacked_corr, zip_definitional

from fxmerge.errors import MergeError
from fxmerge.match import zip_match, zip_match_reference
from fxmerge.match.greedy import owner_budgets
from fxmerge.match.zip import plan_zip
from fxmerge.match.zip_reference import reference_merges


def assert_same_outcome(fast, reference) -> None:
    """Both calls raise MergeError (target unreachable under the budgets), or both give the same Matching."""
    try:
        a = fast()
    except MergeError:
        with pytest.raises(MergeError, match="forbidden"):
            reference()
        return
    assert_same(a, reference())


def assert_same(a, b) -> None:
    for x, y in zip(a.merge + a.unmerge, b.merge + b.unmerge, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert a.value == pytest.approx(b.value, rel=1e-12, abs=1e-12)


def test_hand_example_cross_pairs() -> None:
    # units a0 a1 | b0 b1
    s = torch.tensor(
        [[0.0, 0.1, 0.3, 0.9], [0.1, 0.0, 0.8, 0.4], [0.3, 0.8, 0.0, 0.2], [0.9, 0.4, 0.2, 0.0]],
        dtype=torch.float64,
    )
    m = zip_match(s, [2, 2])
    # (a0, b1) = 0.9 first; then cluster {a0,b1} has 0.5*min(0.1, 0.4) = 0.05 to a1 and 0.5*min(0.3, 0.2) = 0.1
    # to b0, so (a1, b0) = 0.8 is next.
    assert m.value == pytest.approx(0.85, abs=1e-15)
    assert torch.equal(m.unmerge[0], torch.eye(2, dtype=torch.float64))
    assert torch.equal(m.unmerge[1], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(m.merge[1], torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64))


def test_hand_example_intra_merges_and_budget() -> None:
    # a0-a1 0.95 and b0-b1 0.9 beat every cross pair (0.1): both models spend their budget of 1.
    s = torch.full((4, 4), 0.1, dtype=torch.float64)
    s[0, 1] = s[1, 0] = 0.95
    s[2, 3] = s[3, 2] = 0.9
    m = zip_match(s, [2, 2])
    assert m.value == pytest.approx((0.95 + 0.9) / 2, abs=1e-15)
    assert torch.equal(m.merge[0], torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(m.merge[1], torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    # with beta=0 no intra-model merge is allowed: the best cross pairing is taken instead
    m0 = zip_match(s, [2, 2], beta=0.0)
    assert sorted(m0.assignment(1).tolist()) == [0, 1] and m0.value == pytest.approx(0.1, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("sizes", "kw"),
    [
        ([40, 40], {}),
        ([40, 40], {"alpha": 0.3, "beta": 0.125}),
        ([30, 30, 30], {}),
        ([30, 30, 30], {"r": 0.5, "alpha": 1.0, "beta": 0.5}),
        ([25, 41], {"target": 41}),
        ([12, 30, 21], {"target": 20, "alpha": 0.7}),
        ([50], {"r": 0.5}),
    ],
)
def test_fast_equals_reference_on_correlations(dtype, sizes, kw) -> None:
    for seed in range(3):
        sim = stacked_corr(200, sizes, seed=seed, dtype=dtype)
        assert_same_outcome(
            lambda sim=sim: zip_match(sim, sizes, **kw), lambda sim=sim: zip_match_reference(sim, sizes, **kw)
        )


@pytest.mark.parametrize("levels", [2, 4, None])
@pytest.mark.parametrize("sizes", [[16, 16], [10, 10, 10], [7, 13]])
def test_fast_equals_reference_with_ties_and_negatives(levels, sizes) -> None:
    for seed in range(6):
        sim = random_sym(sum(sizes), seed, levels=levels)
        for kw in ({}, {"alpha": 0.25, "beta": 0.3}, {"r": 0.8, "alpha": 1.0}):
            assert_same_outcome(
                lambda sim=sim, kw=kw: zip_match(sim, sizes, **kw),
                lambda sim=sim, kw=kw: zip_match_reference(sim, sizes, **kw),
            )


@pytest.mark.parametrize("sizes", [[8, 8], [6, 6, 6], [5, 9]])
def test_fast_equals_reference_all_negative_with_ties(sizes) -> None:
    """With only negative similarities the alpha decay raises merged clusters toward 0, so a row's
    new entry can tie its maximum; the tie must go to the earlier column, as in the reference."""
    for seed in range(12):
        sim = (random_sym(sum(sizes), seed, levels=2) - 1) / 2  # entries in [-1, 0], many ties
        for kw in ({}, {"alpha": 0.5, "beta": 0.3}):
            assert_same_outcome(
                lambda sim=sim, kw=kw: zip_match(sim, sizes, **kw),
                lambda sim=sim, kw=kw: zip_match_reference(sim, sizes, **kw),
            )


@pytest.mark.parametrize("sizes", [[2, 2], [3, 3], [4, 4], [5, 5], [3, 3, 3], [2, 5]])
@pytest.mark.parametrize(("levels", "negative"), [(None, False), (2, False), (2, True)])
def test_fast_equals_definitional_brute_force(sizes, levels, negative) -> None:
    owner = [m for m, c in enumerate(sizes) for _ in range(c)]
    for seed in range(5):
        sim = random_sym(sum(sizes), seed, levels=levels)
        if negative:
            sim = (sim - 1) / 2
        for alpha, beta, target in (
            (0.5, 1.0, None),
            (0.3, 0.125, None),
            (1.0, 1.0, max(sizes)),
            (0.5, 0.5, 2),
        ):
            plan = plan_zip(sim, sizes, 0.5, alpha, beta, target)
            try:
                pairs, picks = zip_definitional(plan.sim, owner, plan.n_merges, alpha, list(plan.budgets))
            except ValueError:  # the target cannot be reached under the budgets
                with pytest.raises(MergeError, match="forbidden"):
                    zip_match(sim, sizes, alpha=alpha, beta=beta, target=target)
                continue
            m = zip_match(sim, sizes, alpha=alpha, beta=beta, target=target)
            assert columns_from_matching(m).tolist() == columns_of(sum(sizes), pairs).tolist()
            assert m.value == pytest.approx(float(np.mean(picks)), abs=1e-12)


def test_reference_merge_sequence_matches_definitional() -> None:
    sizes = [4, 4]
    sim = random_sym(8, seed=5, levels=3)
    plan = plan_zip(sim, sizes, 0.5, 0.5, 1.0, None)
    pairs, picks = reference_merges(plan)
    want_pairs, want_picks = zip_definitional(
        plan.sim, [0] * 4 + [1] * 4, plan.n_merges, 0.5, list(plan.budgets)
    )
    assert pairs == want_pairs and picks == pytest.approx(want_picks, abs=0)


def test_r_zero_returns_models_unchanged() -> None:
    sim = stacked_corr(100, [5, 7], seed=0)
    m = zip_match(sim, [5, 7], r=0.0)
    assert m.width == 12 and m.value == 0.0
    assert torch.equal(torch.cat(m.unmerge, dim=0), torch.eye(12, dtype=sim.dtype))
    assert torch.equal(torch.cat(m.merge, dim=1), torch.eye(12, dtype=sim.dtype))


def test_beta_zero_tiny_alpha_recovers_permutation() -> None:
    g = torch.Generator().manual_seed(1)
    c = 30
    a = torch.randn(400, c, generator=g, dtype=torch.float64)
    perm = torch.randperm(c, generator=g)
    x = torch.cat([a, a[:, perm] + 0.3 * torch.randn(400, c, generator=g, dtype=torch.float64)], dim=1)
    sim = torch.corrcoef(x.T)
    sim = (sim + sim.T) / 2
    m = zip_match(sim, [c, c], alpha=1e-4, beta=0.0)
    # every cluster is one A unit and one B unit
    assert torch.equal(m.unmerge[0], torch.eye(c, dtype=sim.dtype))
    assert torch.equal(m.assignment(1), perm)  # B unit j is A unit perm[j]


def test_merge_semantics() -> None:
    sizes = [20, 20, 20]
    sim = stacked_corr(300, sizes, seed=4)
    m = zip_match(sim, sizes)
    merge, unmerge = torch.cat(m.merge, dim=1), torch.cat(m.unmerge, dim=0)
    assert m.width == 30
    assert torch.equal(unmerge.sum(dim=1), torch.ones(60, dtype=sim.dtype))  # every unit in one cluster
    torch.testing.assert_close(merge.sum(dim=1), torch.ones(30, dtype=sim.dtype), rtol=0, atol=1e-14)
    torch.testing.assert_close(merge @ unmerge, torch.eye(30, dtype=sim.dtype), rtol=0, atol=1e-14)
    torch.testing.assert_close(merge, (unmerge / unmerge.sum(dim=0)).T, rtol=0, atol=0)


def test_merged_order_is_ascending_representative() -> None:
    sim = random_sym(12, seed=9)
    m = zip_match(sim, [6, 6])
    cols = columns_from_matching(m)
    first_member = [int(np.flatnonzero(cols == k)[0]) for k in range(m.width)]
    assert first_member == sorted(first_member)


def test_budget_formula_matches_zipit_for_equal_sizes() -> None:
    for n_models in (1, 2, 3, 4):
        for c in (1, 3, 8, 17, 64):
            total = n_models * c
            for width in range(1, total + 1, max(1, total // 9)):
                for beta in (0.0, 0.075, 0.125, 0.29, 0.5, 1.0):
                    zipit = int((total - width) // n_models * beta + 1e-4)
                    assert owner_budgets([c] * n_models, total - width, beta).tolist() == [zipit] * n_models


def test_budget_formula_unequal_sizes() -> None:
    # hetero.md §2.2: floor(floor(remove * d_i / D) * beta)
    assert owner_budgets([3, 5], 3, 1.0).tolist() == [1, 1]
    assert owner_budgets([10, 30], 20, 0.5).tolist() == [2, 7]


def test_rejects_bad_arguments() -> None:
    sim = random_sym(8, seed=0)
    with pytest.raises(MergeError, match="symmetric"):
        zip_match(sim + torch.triu(torch.ones(8, 8), 1), [4, 4])
    one_sided = sim.clone()
    one_sided[0, 5] = float("-inf")
    with pytest.raises(MergeError, match="symmetric"):
        zip_match(one_sided, [4, 4])
    with pytest.raises(MergeError, match="alpha"):
        zip_match(sim, [4, 4], alpha=0.0)
    with pytest.raises(MergeError, match="r "):
        zip_match(sim, [4, 4], r=1.0)
    with pytest.raises(MergeError, match="beta"):
        zip_match(sim, [4, 4], beta=-1.0)
    with pytest.raises(MergeError, match="target"):
        zip_match(sim, [4, 4], target=9)
    with pytest.raises(MergeError, match="forbidden"):
        zip_match(sim, [8], beta=0.0)  # one model, no intra merges allowed


def test_minus_inf_pairs_are_never_merged() -> None:
    sim = random_sym(10, seed=3)
    sim[0, 5:] = sim[5:, 0] = float("-inf")
    m = zip_match(sim, [5, 5], alpha=1.0)
    cols = columns_from_matching(m)
    assert not any(cols[0] == cols[j] for j in range(5, 10))
    assert_same(m, zip_match_reference(sim, [5, 5], alpha=1.0))


def test_inputs_untouched_and_dtype_device_kept() -> None:
    sim = stacked_corr(100, [8, 8], seed=1, dtype=torch.float32)
    before = sim.clone()
    m = zip_match(sim, [8, 8])
    assert torch.equal(sim, before)
    assert all(t.dtype == torch.float32 and t.device == sim.device for t in m.merge + m.unmerge)
