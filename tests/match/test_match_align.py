"""Hungarian alignment: brute force on small blocks, permutation recovery, merge semantics, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from match_oracles import brute_perm, random_sym, stacked_corr

from fxmerge.errors import MergeError
from fxmerge.match import align, align_perm


@pytest.mark.parametrize("c", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(4))
def test_align_perm_equals_brute_force(c: int, seed: int) -> None:
    cross = torch.as_tensor(np.random.default_rng(seed).normal(size=(c, c)))
    p = align_perm(cross)
    best, _ = brute_perm(cross.numpy())
    assert p.tolist() == list(best)
    assert p.dtype == torch.long


def test_align_perm_rectangular_brute_force() -> None:
    cross = torch.as_tensor(np.random.default_rng(7).normal(size=(3, 5)))
    best, _ = brute_perm(cross.numpy())
    assert align_perm(cross).tolist() == list(best)
    with pytest.raises(MergeError, match="more rows"):
        align_perm(cross.T)


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_align_matches_brute_force_per_model(n_models: int, seed: int) -> None:
    c = 4
    sim = random_sym(c * n_models, seed)
    m = align(sim, [c] * n_models)
    values = []
    for k in range(1, n_models):
        cross = sim[:c, k * c : (k + 1) * c].numpy()
        best, mean = brute_perm(cross)
        values.append(mean)
        # anchor unit i and model-k unit best[i] share merged unit i
        expected = torch.zeros(c, c, dtype=sim.dtype)
        expected[list(best), list(range(c))] = 1.0
        assert torch.equal(m.unmerge[k], expected)
    assert torch.equal(m.unmerge[0], torch.eye(c, dtype=sim.dtype))
    assert m.value == pytest.approx(float(np.mean(values)), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_align_recovers_permuted_copy(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    c = 64
    a = torch.randn(500, c, generator=g, dtype=torch.float64) @ torch.randn(
        c, c, generator=g, dtype=torch.float64
    )
    perm = torch.randperm(c, generator=g)
    b = a[:, perm]
    x = torch.cat([a, b], dim=1)
    x = x - x.mean(0)
    cov = x.T @ x
    d = cov.diagonal().sqrt()
    sim = (cov / d[:, None] / d[None, :]).to(dtype)
    p = align_perm(sim[:c, c:])
    assert torch.equal(b[:, p], a)  # B's unit p[i] is A's unit i
    m = align(sim, [c, c])
    assert torch.equal(m.assignment(1), torch.argsort(p))
    merged = m.merge[0] @ a.T.to(dtype) + m.merge[1] @ b.T.to(dtype)
    torch.testing.assert_close(merged, a.T.to(dtype), rtol=1e-6, atol=1e-6)
    assert m.value == pytest.approx(1.0, abs=1e-6)


def test_align_merge_is_average_and_rows_sum_to_one() -> None:
    sim = stacked_corr(300, [6, 6, 6], seed=3)
    m = align(sim, [6, 6, 6])
    merge = torch.cat(m.merge, dim=1)
    torch.testing.assert_close(merge.sum(dim=1), torch.ones(6, dtype=sim.dtype), rtol=0, atol=1e-15)
    assert set(merge.unique().tolist()) == {0.0, 1 / 3}
    for k in range(3):
        torch.testing.assert_close(m.merge[k], m.unmerge[k].T / 3, rtol=0, atol=1e-15)
    assert m.width == 6 and m.sizes == [6, 6, 6]


def test_align_unequal_sizes() -> None:
    sim = random_sym(3 + 5 + 2, seed=11)
    m = align(sim, [3, 5, 2])
    best, _ = brute_perm(sim[:3, 3:8].numpy())
    assert m.assignment(1).tolist() == [best.index(j) if j in best else -1 for j in range(5)]
    # model 2 (2 units) against the 3 anchor units: brute force over injections B -> A
    best2, _ = brute_perm(sim[:3, 8:10].numpy().T)
    assert m.assignment(2).tolist() == list(best2)
    counts = torch.cat(m.unmerge, dim=0).sum(dim=0)
    merge = torch.cat(m.merge, dim=1)
    torch.testing.assert_close(merge.sum(dim=1), torch.ones(3, dtype=sim.dtype), rtol=0, atol=1e-15)
    assert counts.tolist() == [float(1 + 1 + (k in best2)) for k in range(3)]


def test_align_single_model_is_identity() -> None:
    m = align(torch.eye(3), [3])
    assert torch.equal(m.unmerge[0], torch.eye(3)) and m.value == 0.0


def test_align_errors() -> None:
    with pytest.raises(MergeError, match="shape"):
        align(torch.zeros(4, 4), [2, 3])
    with pytest.raises(MergeError, match="NaN"):
        align(torch.full((4, 4), float("nan")), [2, 2])
    with pytest.raises(MergeError, match="dtype"):
        align(torch.zeros(4, 4, dtype=torch.float16), [2, 2])
    with pytest.raises(MergeError, match="sizes"):
        align(torch.zeros(4, 4), [4, 0])
    infeasible = torch.zeros(4, 4)
    infeasible[:2, 2:] = float("-inf")
    with pytest.raises(MergeError, match="feasible"):
        align(infeasible, [2, 2])


def test_align_does_not_modify_input() -> None:
    sim = random_sym(8, seed=2)
    before = sim.clone()
    align(sim, [4, 4])
    assert torch.equal(sim, before)
