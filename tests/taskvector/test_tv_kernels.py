"""Selection and combine kernels on tensors large enough for the sampled/streamed code paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxmerge.taskvector import workspace
from fxmerge.taskvector.combine import combine_linear
from fxmerge.taskvector.globalk import GlobalThreshold
from fxmerge.taskvector.sparsify import band_masks, keep_count, random_mask, tensor_generator, topk_mask
from fxmerge.taskvector.workspace import (
    Workspace,
    band_scale_,
    bernoulli_drop_,
    kth_largest_abs,
    ties_combine_,
    ties_trim_combine_,
    topk_trim_,
)


def _brute_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.abs().reshape(-1).numpy()
    order = np.lexsort((np.arange(a.size), -a))  # |x| descending, then index ascending
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:k]] = True
    return x * torch.from_numpy(mask).view(x.shape)


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.9])
def test_topk_trim_matches_brute_force(quantise: bool, density: float) -> None:
    g = torch.Generator().manual_seed(int(density * 100) + quantise)
    x = torch.randn(300, 700, generator=g)  # 210k elements: above the exact-selection cut-off
    if quantise:
        x = torch.round(x * 20) / 20  # heavy ties at every threshold
    k = keep_count(density, x.numel())
    y = x.clone()
    topk_trim_(y, k, Workspace())
    assert torch.equal(y, _brute_topk(x, k))
    assert torch.equal(y, x * topk_mask(x.abs(), k))


def test_bracket_miss_falls_back_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace, "_SAMPLE", 4)  # a 4-point sample cannot bracket reliably
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g).abs()
    for k in (1, 17, 123_456, 200_000):
        thr, greater, equal = kth_largest_abs(x.clone(), k, Workspace())
        assert thr == float(torch.sort(x, descending=True).values[k - 1])
        assert greater == int((x > thr).sum()) and equal == int((x == thr).sum())


def test_global_threshold_matches_sorting_with_ties() -> None:
    g = torch.Generator().manual_seed(4)
    parts = [torch.round(torch.randn(n, generator=g) * 30).abs() / 30 for n in (5000, 70_000, 1234)]
    allv = torch.cat(parts)
    k = 20_000
    th = GlobalThreshold(k)
    for p in parts:
        th.add_first(p)
    th.finish_first()
    for p in parts:
        th.add_second(p)
    th.finish_second()
    assert th.value == float(torch.sort(allv, descending=True).values[k - 1])
    kept = sum(int(th.mask(p).sum()) for p in parts)
    assert kept == k


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_combine_matches_reference(consensus: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(50, 40, generator=g) * (torch.rand(50, 40, generator=g) > 0.5) for _ in range(4)]
    weights = [0.5, 2.0, 1.0, 0.25]
    ref = combine_linear([d.clone() for d in deltas], weights, consensus, normalize)
    fast = ties_combine_([d.clone() for d in deltas], weights, consensus, normalize, Workspace())
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize(("consensus", "normalize"), [("sum", True), ("count", False)])
def test_fused_ties_equals_trim_then_combine(quantise: bool, consensus: str, normalize: bool) -> None:
    """Chunked threshold pass + chunked trim/elect/mean == whole-tensor topk_trim_ then ties_combine_,
    bit for bit: 210k elements (sampled bracket path), chunks not dividing the tensor, heavy ties when
    quantised, one model at density 1 and one with negative weight."""
    g = torch.Generator().manual_seed(8 + quantise)
    deltas = [torch.randn(300, 700, generator=g) for _ in range(3)]
    if quantise:
        deltas = [torch.round(d * 20) / 20 for d in deltas]
    ks = [keep_count(0.2, 210_000), 210_000, keep_count(0.03, 210_000)]
    weights = [0.5, 1.0, -0.3]
    trimmed = [topk_trim_(d.clone(), k, Workspace()) for d, k in zip(deltas, ks, strict=True)]
    ref = ties_combine_(trimmed, weights, consensus, normalize, Workspace())
    fused = ties_trim_combine_([d.clone() for d in deltas], ks, weights, consensus, normalize, Workspace(),
                               chunk=10_007)
    assert torch.equal(fused, ref)


def test_kth_largest_abs_matches_sorting_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.round(torch.randn(200_000, generator=g) * 50) / 50
    a = x.abs()
    for sample in (1 << 16, 4):  # 4 points cannot bracket: the exact fallback runs
        monkeypatch.setattr(workspace, "_SAMPLE", sample)
        for k in (1, 17, 123_456, 200_000):
            thr, greater, equal = kth_largest_abs(x, k, Workspace(), chunk=3_001)
            assert thr == float(torch.sort(a, descending=True).values[k - 1])
            assert greater == int((a > thr).sum()) and equal == int((a == thr).sum())


def test_bernoulli_drop_equals_mask_path() -> None:
    g = torch.Generator().manual_seed(6)
    d = torch.randn(64, 33, generator=g)
    fast = bernoulli_drop_(d.clone(), 0.3, tensor_generator(1, 2, "w"), Workspace())
    ref = d * random_mask(d.shape, 0.3, tensor_generator(1, 2, "w"))
    assert torch.equal(fast, ref)
    assert abs(float((fast != 0).float().mean()) - 0.3) < 0.05


@pytest.mark.parametrize("quantise", [False, True])
def test_band_scale_matches_band_masks(quantise: bool) -> None:
    g = torch.Generator().manual_seed(7 + quantise)
    x = torch.randn(400, 500, generator=g)
    if quantise:
        x = torch.round(x * 10) / 10
    dens = [0.05, 0.1, 0.3]
    ks = [keep_count(d, x.numel()) for d in dens]
    factors = (2.0, 1.5, 0.5)
    expected = torch.zeros_like(x)
    for mask, alpha in zip(band_masks(x, dens), factors, strict=True):
        expected += x * mask * alpha
    got = band_scale_(x.clone(), ks, factors, Workspace())
    assert torch.equal(got, expected)
    brute = _brute_topk(x, ks[2]) * 0.5
    inner = _brute_topk(x, ks[1]) != 0
    assert int((got != 0).sum()) == int((brute != 0).sum()) and torch.equal(got[~inner], brute[~inner])
