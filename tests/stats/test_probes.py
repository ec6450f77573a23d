"""SpaceStatistics against a hand computation: the pooled within-point Pearson correlation of stacked points."""

from __future__ import annotations

import pytest
import torch

from fxmerge.errors import MergeError
from fxmerge.stats.probes import Probe, SpaceStatistics


def _values(gen: torch.Generator, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Two models, two probe nodes of a 3-unit space: node b = node a shifted by a large per-unit offset."""
    a0 = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)  # [batch, units, tokens]
    a1 = a0[:, [2, 0, 1]] * 2.0 + 0.1 * torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    offset = torch.tensor([100.0, -50.0, 7.0], dtype=torch.float64)[None, :, None]
    return [{"a": a.to(dtype), "b": (a * 0.5 + offset).to(dtype)} for a in (a0, a1)]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1).reshape(-1, t.shape[1]).double()


def _expected(batches: list[list[dict[str, torch.Tensor]]]) -> torch.Tensor:
    per_point = []
    for node in ("a", "b"):
        x = torch.cat([torch.cat([_rows(v[m][node]) for m in range(2)], dim=1) for v in batches])
        per_point.append(x - x.mean(dim=0))
    return torch.corrcoef(torch.cat(per_point).T)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_correlation_is_that_of_points_centred_each_on_its_own_mean(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [_values(gen, dtype) for _ in range(3)]
    stats = SpaceStatistics({"s": [Probe("a", (1,)), Probe("b", (1,))]}, {"s": [0, 1]}, {"s": [3, 3]}, {},
                            torch.Generator().manual_seed(1))  # fmt: skip
    for v in batches:
        stats.add(v)
    corr = stats.correlations()["s"]
    assert corr.dtype == dtype
    expected = _expected(batches)
    assert torch.allclose(corr.double(), expected, atol=tol, rtol=0)
    # the twins (model 1's unit j is model 0's unit [2, 0, 1][j]) correlate best
    assert corr[:3, 3:].argmax(dim=1).tolist() == [1, 2, 0]


def test_sentinel_rows_are_dropped_and_nan_is_an_error() -> None:
    gen = torch.Generator().manual_seed(0)
    v = _values(gen, torch.float32)
    masked = [{k: t.clone() for k, t in m.items()} for m in v]
    for m in masked:
        m["a"][0, :, 0] = torch.finfo(torch.float32).min  # one sample masked in both models
    stats = SpaceStatistics({"s": [Probe("a", (1,))]}, {"s": [0, 1]}, {"s": [3, 3]}, {},
                            torch.Generator().manual_seed(1))  # fmt: skip
    stats.add(masked)
    assert stats.accs["s"].count == 6 * 4 - 1
    stats.add([{k: t[:0] for k, t in m.items()} for m in v])  # a batch without samples (empty tensors) adds nothing
    assert stats.accs["s"].count == 6 * 4 - 1
    bad = [{k: t.clone() for k, t in m.items()} for m in v]
    bad[1]["a"][2, 1, 3] = float("nan")
    with pytest.raises(MergeError, match="NaN or inf"):
        stats.add(bad)
