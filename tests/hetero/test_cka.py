"""Minibatch unbiased linear CKA against brute-force U-statistic references."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from fxmerge.errors import MergeError
from fxmerge.hetero.cka import MinibatchCKA, gram_stack, hsic1_cross, linear_cka

TOL = 1e-10


def hsic_u_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC_1 as the explicit U-statistic over distinct index tuples (Song et al. 2012, Thm. 2).

    (1/(n)_2) Σ_{i≠j} k_ij l_ij + (1/(n)_4) Σ_{i,j,q,r distinct} k_ij l_qr - (2/(n)_3) Σ_{i,j,q distinct} k_ij l_iq
    """
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    k, g, n = x @ x.T, y @ y.T, len(x)
    pairs = [(i, j) for i, j in itertools.permutations(range(n), 2)]
    triples = list(itertools.permutations(range(n), 3))
    quads = list(itertools.permutations(range(n), 4))
    t2 = sum(k[i, j] * g[i, j] for i, j in pairs) / len(pairs)
    t3 = sum(k[i, j] * g[i, q] for i, j, q in triples) / len(triples)
    t4 = sum(k[i, j] * g[q, r] for i, j, q, r in quads) / len(quads)
    return float(t2 + t4 - 2.0 * t3)


def cka_reference(batches_a: list[list[np.ndarray]], batches_b: list[list[np.ndarray]]) -> np.ndarray:
    """mean_b h(K_i, L_j) / sqrt(mean_b h(K_i, K_i) mean_b h(L_j, L_j)) with the U-statistic HSIC."""
    n_a, n_b = len(batches_a[0]), len(batches_b[0])
    out = np.zeros((n_a, n_b))
    for i, j in itertools.product(range(n_a), range(n_b)):
        cross = np.mean([hsic_u_statistic(fa[i], fb[j]) for fa, fb in zip(batches_a, batches_b, strict=True)])
        self_a = np.mean([hsic_u_statistic(fa[i], fa[i]) for fa in batches_a])
        self_b = np.mean([hsic_u_statistic(fb[j], fb[j]) for fb in batches_b])
        out[i, j] = cross / np.sqrt(self_a * self_b)
    return out


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def correlated_blocks(gen: torch.Generator, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three A blocks and two B blocks with shared structure, so CKA values are spread over (0, 1)."""
    base = randn(gen, n, 4)
    feats_a = [base @ randn(gen, 4, 6) + 0.5 * randn(gen, n, 6), torch.relu(base @ randn(gen, 4, 5)),
               randn(gen, n, 2, 3, 3)]
    feats_b = [base @ randn(gen, 4, 7) + randn(gen, n, 7), (base[:, :2] ** 2) @ randn(gen, 2, 3)]
    return feats_a, feats_b


def test_hsic_terms_match_u_statistic() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = randn(gen, 7, 3), randn(gen, 7, 5)
    y[:, :3] += x
    k, g = gram_stack([x, y], torch.float64, x.device), gram_stack([y], torch.float64, x.device)
    got = hsic1_cross(k, g)
    assert got[0, 0].item() == pytest.approx(hsic_u_statistic(x.numpy(), y.numpy()), rel=TOL, abs=TOL)
    assert got[1, 0].item() == pytest.approx(hsic_u_statistic(y.numpy(), y.numpy()), rel=TOL, abs=TOL)


def test_single_batch_equals_full_batch_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    feats_a, feats_b = correlated_blocks(gen, 8)
    cka = MinibatchCKA(3, 2)
    cka.update(feats_a, feats_b)
    ref = cka_reference([[f.numpy() for f in feats_a]], [[f.numpy() for f in feats_b]])
    np.testing.assert_allclose(cka.result().numpy(), ref, rtol=1e-9, atol=1e-12)
    for i, j in itertools.product(range(3), range(2)):
        assert linear_cka(feats_a[i], feats_b[j]).item() == pytest.approx(ref[i, j], rel=1e-9, abs=1e-12)
    assert np.ptp(ref) > 0.3  # the data spreads CKA values, so a wrong pairing would show


def test_batches_aggregated_like_manual_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    batches = [correlated_blocks(gen, n) for n in (6, 5, 7)]  # unequal batch sizes are allowed
    cka = MinibatchCKA(3, 2)
    for fa, fb in batches:
        cka.update(fa, fb)
    ref = cka_reference([[f.numpy() for f in fa] for fa, _ in batches], [[f.numpy() for f in fb] for _, fb in batches])
    np.testing.assert_allclose(cka.result().numpy(), ref, rtol=1e-9, atol=1e-12)
    assert cka.num_batches == 3
    # Minibatch CKA is a ratio of means, not a mean of per-batch CKAs: the two differ here.
    per_batch = np.mean([cka_reference([[f.numpy() for f in fa]], [[f.numpy() for f in fb]]) for fa, fb in batches], 0)
    assert np.abs(per_batch - ref).max() > 1e-3


def test_self_similarity_is_one_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = randn(gen, 12, 9), randn(gen, 12, 4)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y).item() == pytest.approx(linear_cka(y, x).item(), abs=1e-14)
    feats_a, feats_b = correlated_blocks(gen, 10)
    ab, ba = MinibatchCKA(3, 2), MinibatchCKA(2, 3)
    ab.update(feats_a, feats_b)
    ba.update(feats_b, feats_a)
    torch.testing.assert_close(ab.result(), ba.result().T, rtol=1e-12, atol=1e-14)
    same = MinibatchCKA(3, 3)
    same.update(feats_a, feats_a)
    torch.testing.assert_close(torch.diagonal(same.result()), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_invariant_to_column_permutation_rotation_and_scale() -> None:
    gen = torch.Generator().manual_seed(4)
    x = randn(gen, 10, 6)
    y = x @ randn(gen, 6, 5) + randn(gen, 10, 5)
    base = linear_cka(x, y).item()
    perm = torch.randperm(6, generator=gen)
    q, _ = torch.linalg.qr(randn(gen, 6, 6))
    assert linear_cka(x[:, perm], y).item() == pytest.approx(base, abs=1e-12)
    assert linear_cka(x @ q, y).item() == pytest.approx(base, abs=1e-12)
    assert linear_cka(3.5 * x, y).item() == pytest.approx(base, abs=1e-12)
    # Control: a non-orthogonal column scaling is not an invariance, and changes the value.
    assert abs(linear_cka(x * torch.tensor([9.0, 1, 1, 1, 1, 0.1], dtype=torch.float64), y).item() - base) > 1e-3


def test_conv_features_channel_permutation_invariance() -> None:
    gen = torch.Generator().manual_seed(5)
    fa, fb = randn(gen, 8, 4, 3, 3), randn(gen, 8, 6)
    fb = fb + fa.flatten(1)[:, :6]
    perm = torch.randperm(4, generator=gen)
    one, two = MinibatchCKA(1, 1), MinibatchCKA(1, 1)
    one.update([fa], [fb])
    two.update([fa[:, perm]], [fb])
    torch.testing.assert_close(one.result(), two.result(), rtol=0, atol=1e-12)


class _MatmulCounter(TorchFunctionMode):
    """Counts matrix products whose output is an n x n Gram of a [n, d] input."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.grams = n, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        is_product = getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm")
        if is_product and out.shape == (self.n, self.n):
            self.grams += 1
        return out


def test_each_gram_computed_once_per_batch() -> None:
    gen = torch.Generator().manual_seed(6)
    feats_a, feats_b = correlated_blocks(gen, 11)
    cka = MinibatchCKA(3, 2)
    with _MatmulCounter(11) as counter:
        cka.update(feats_a, feats_b)
    assert counter.grams == 3 + 2


def test_inputs_not_modified_and_float32_close() -> None:
    gen = torch.Generator().manual_seed(7)
    feats_a, feats_b = correlated_blocks(gen, 9)
    copies = [f.clone() for f in feats_a + feats_b]
    f64, f32 = MinibatchCKA(3, 2), MinibatchCKA(3, 2, dtype=torch.float32)
    f64.update(feats_a, feats_b)
    f32.update([f.float() for f in feats_a], [f.float() for f in feats_b])
    for before, after in zip(copies, feats_a + feats_b, strict=True):
        assert torch.equal(before, after)
    assert f32.result().dtype == torch.float32
    torch.testing.assert_close(f32.result().double(), f64.result(), rtol=0, atol=1e-4)


def test_errors_name_the_problem() -> None:
    gen = torch.Generator().manual_seed(8)
    cka = MinibatchCKA(2, 1)
    with pytest.raises(MergeError, match="before any update"):
        cka.result()
    with pytest.raises(MergeError, match="at least 4"):
        cka.update([randn(gen, 3, 2), randn(gen, 3, 2)], [randn(gen, 3, 2)])
    with pytest.raises(MergeError, match="2 blocks, expected 1"):
        cka.update([randn(gen, 5, 2), randn(gen, 5, 2)], [randn(gen, 5, 2), randn(gen, 5, 2)])
    with pytest.raises(MergeError, match="batch size 6"):
        cka.update([randn(gen, 5, 2), randn(gen, 5, 2)], [randn(gen, 6, 2)])
    bad = randn(gen, 5, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(MergeError, match="model B blocks \\[0\\]"):
        cka.update([randn(gen, 5, 2), randn(gen, 5, 2)], [bad])
    with pytest.raises(MergeError, match="at least 4 samples"):
        linear_cka(randn(gen, 3, 2), randn(gen, 3, 2))
    with pytest.raises(MergeError, match="at least one block"):
        MinibatchCKA(0, 1)
    assert cka.num_batches == 0  # rejected batches left no trace
    cka.update([torch.ones(5, 2, dtype=torch.float64), randn(gen, 5, 2)], [randn(gen, 5, 2)])
    with pytest.raises(MergeError, match="model A blocks \\[0\\]"):
        cka.result()  # a constant block has zero self-HSIC


def test_all_reduce_without_process_group_is_final() -> None:
    gen = torch.Generator().manual_seed(9)
    feats_a, feats_b = correlated_blocks(gen, 8)
    cka = MinibatchCKA(3, 2)
    cka.update(feats_a, feats_b)
    before = cka.result().clone()
    cka.all_reduce()
    cka.all_reduce()  # idempotent
    torch.testing.assert_close(cka.result(), before, rtol=0, atol=0)
    with pytest.raises(MergeError, match="after all_reduce"):
        cka.update(feats_a, feats_b)


def _dataset(seed: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    return [correlated_blocks(gen, n) for n in (6, 8, 5, 7, 9)]


def _rank_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cka = MinibatchCKA(3, 2)
        for fa, fb in _dataset(10)[rank::world]:  # uneven split: 3 batches on rank 0, 2 on rank 1
            cka.update(fa, fb)
        cka.all_reduce()
        torch.save({"cka": cka.result(), "batches": cka.num_batches}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_all_reduce_two_ranks_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    single = MinibatchCKA(3, 2)
    for fa, fb in _dataset(10):
        single.update(fa, fb)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["batches"] == 5
        torch.testing.assert_close(got["cka"], single.result(), rtol=1e-12, atol=1e-14)
