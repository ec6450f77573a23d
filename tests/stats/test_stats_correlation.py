"""CorrelationAccumulator against direct dense computation on the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxmerge.stats.correlation as corr_mod
from fxmerge.errors import MergeError
from fxmerge.stats import CorrelationAccumulator


def features(n: int, dims: list[int], seed: int, offset: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 8, generator=g)
    out = []
    for d in dims:
        mix = torch.randn(8, d, generator=g)
        out.append(shared @ mix + 0.5 * torch.randn(n, d, generator=g) + offset)
    return out


def direct(feats: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = torch.cat(feats, dim=1).double().numpy()
    mean = x.mean(axis=0)
    cov = np.cov(x.T, bias=True)
    std = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):  # constant units: compared separately
        return mean, cov, cov / np.outer(std, std)


def feed(acc: CorrelationAccumulator, feats: list[torch.Tensor], batch: int) -> None:
    for i in range(0, feats[0].shape[0], batch):
        acc.update([f[i : i + batch] for f in feats])


@pytest.mark.parametrize(("dims", "batch"), [([5, 7], 13), ([300, 400], 97), ([400, 400, 300], 1000)])
def test_equals_direct_computation(dims: list[int], batch: int) -> None:
    feats = features(900, dims, seed=1)
    acc = CorrelationAccumulator(dims)
    feed(acc, feats, batch)
    mean, cov, corr = direct(feats)
    assert acc.count == 900
    np.testing.assert_allclose(acc.mean().numpy(), mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc.covariance().numpy(), cov, rtol=0, atol=1e-11)
    np.testing.assert_allclose(acc.correlation().numpy(), corr, rtol=0, atol=1e-12)
    c = acc.correlation()
    assert torch.equal(c, c.T) and c.dtype == torch.float64


def test_chunked_work_buffer_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corr_mod, "_WORK_ELEMENTS", 4096)  # chunks of 64 samples for D = 60
    feats = features(500, [20, 40], seed=2)
    acc = CorrelationAccumulator([20, 40])
    acc.update(feats)
    np.testing.assert_allclose(acc.correlation().numpy(), direct(feats)[2], rtol=0, atol=1e-12)


def test_large_means_do_not_cancel() -> None:
    feats = features(2000, [30, 30], seed=3, offset=1e6)
    acc = CorrelationAccumulator([30, 30])
    feed(acc, feats, 250)
    centered = [f.double() - 1e6 for f in feats]
    _, _, corr = direct(centered)
    np.testing.assert_allclose(acc.correlation().numpy(), corr, rtol=0, atol=1e-9)


def test_float32_accumulation() -> None:
    feats = features(1000, [64, 64], seed=4, offset=3.0)
    acc = CorrelationAccumulator([64, 64], dtype=torch.float32)
    feed(acc, feats, 128)
    assert acc.correlation().dtype == torch.float32
    np.testing.assert_allclose(acc.correlation().numpy(), direct(feats)[2], rtol=0, atol=2e-5)


def test_zero_variance_units() -> None:
    feats = features(300, [4, 4], seed=5)
    feats[0][:, 1] = 0.1  # constant, with a value that is not exact in binary
    feats[1][:, 3] = -7.0
    acc = CorrelationAccumulator([4, 4])
    feed(acc, feats, 64)
    c = acc.correlation()
    assert not torch.isnan(c).any()
    for u in (1, 7):
        expected = torch.zeros(8, dtype=c.dtype)
        expected[u] = 1.0
        assert torch.equal(c[u], expected) and torch.equal(c[:, u], expected)
    keep = [0, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(c[keep][:, keep].numpy(), direct(feats)[2][np.ix_(keep, keep)], atol=1e-12)
    assert acc.covariance()[1, 1] == pytest.approx(0.0, abs=1e-15)


def test_nonfinite_handling() -> None:
    feats = features(50, [3, 3], seed=6)
    feats[1][4, 2] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        CorrelationAccumulator([3, 3]).update(feats)
    acc = CorrelationAccumulator([3, 3], nonfinite="zero")
    acc.update(feats)
    fixed = [f.clone() for f in feats]
    fixed[1][4, 2] = 0.0
    np.testing.assert_allclose(acc.correlation().numpy(), direct(fixed)[2], atol=1e-12)


def test_inputs_untouched_and_validation() -> None:
    feats = features(40, [3, 5], seed=7)
    before = [f.clone() for f in feats]
    acc = CorrelationAccumulator([3, 5])
    acc.update(feats)
    assert all(torch.equal(a, b) for a, b in zip(feats, before, strict=True))
    with pytest.raises(MergeError, match="feats\\[1\\]"):
        acc.update([feats[0], feats[1][:, :4]])
    with pytest.raises(MergeError, match="same samples"):
        acc.update([feats[0], feats[1][:10]])
    with pytest.raises(MergeError, match="list of 2"):
        acc.update(feats[0])
    with pytest.raises(MergeError, match="no samples"):
        CorrelationAccumulator([2]).correlation()
    with pytest.raises(MergeError, match="dims"):
        CorrelationAccumulator([3, 0])


def test_all_reduce_without_process_group_is_noop() -> None:
    feats = features(100, [6, 6], seed=8)
    acc = CorrelationAccumulator([6, 6])
    acc.update(feats)
    before = acc.correlation()
    acc.all_reduce()
    assert acc.count == 100 and torch.equal(acc.correlation(), before)
    acc.update(feats)  # still allowed: nothing was reduced
    assert acc.count == 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_k_update_both_paths(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The BLAS syrk path (contiguous CPU tensors) and the block-GEMM path (other devices, small
    float32; forced here with a non-contiguous work matrix) both add wᵀw to the lower triangle."""
    monkeypatch.setattr(corr_mod, "_SYRK_MIN_FLOAT32", 1000)  # syrk for float32 at D = 1200 too
    g = torch.Generator().manual_seed(9)
    w = torch.randn(300, 1200, generator=g, dtype=dtype)
    start = torch.randn(1200, 1200, generator=g, dtype=dtype)
    want = torch.tril(start + w.T @ w)
    tol = {"rtol": 1e-5, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    fast = start.clone()
    corr_mod._rank_k_update(fast, w, corr_mod._bounds(1200))
    torch.testing.assert_close(torch.tril(fast), want, **tol)
    blocked = start.clone()
    wide = torch.zeros(300, 2400, dtype=dtype)
    wide[:, ::2] = w
    corr_mod._rank_k_update(blocked, wide[:, ::2], corr_mod._bounds(1200))
    assert len(corr_mod._bounds(1200)) == 5  # four block rows
    torch.testing.assert_close(torch.tril(blocked), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_second_moment_is_the_full_symmetric_product(dtype: torch.dtype) -> None:
    """D = 1500 crosses the 1024-row mirroring blocks; the result equals sum (x - shift)(x - shift)^T / n."""
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(300, 700, generator=gen, dtype=dtype), torch.randn(300, 800, generator=gen, dtype=dtype)]
    acc = CorrelationAccumulator([700, 800], dtype=dtype)
    acc.update(feats)
    m = acc.raw_second_moment()
    y = torch.cat(feats, dim=1).double() - acc._shift.double()
    assert m.dtype == torch.float64 and torch.equal(m, m.T)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(m, y.T @ y / 300, rtol=0, atol=tol)
    acc.release()
    with pytest.raises(MergeError, match="no samples"):
        acc.raw_second_moment()
