"""DPPA: DP densities and DPA bands checked by hand and against a brute-force reference merge."""

from __future__ import annotations

import pytest
import torch
from tv_refs import flat, keep, ref_outlier_pct, topk_indices

from fxmerge.errors import TaskVectorError
from fxmerge.taskvector import merge_task_vectors, search_dppa_factors
from fxmerge.taskvector.dppa import BlockStat, ModuleStat, band_densities, dp_shifts, is_target


def test_dp_shifts_hand_computed() -> None:
    # blocks: A has a = 6 %, B has a = 2 %  -> centred / max: A +1, B -1
    blocks = {"A": _block(6.0), "B": _block(2.0)}
    modules = {"u1": ModuleStat("A", 20, 0.0, 10.0), "u2": ModuleStat("A", 10, 0.0, 0.0),
               "u3": ModuleStat("B", 20, 0.0, 5.0), "u4": ModuleStat("B", 10, 0.0, 20.0)}
    # obar = (20*10 + 10*0 + 20*5 + 10*20) / 60 = 8.3333; deviations 1.6667, -8.3333, -3.3333, 11.6667
    # normalised by 11.6667: 0.142857, -0.714286, -0.285714, 1.0
    shifts = dp_shifts(modules, blocks, shift=0.08)
    expected = {"u1": 0.08 * (1 + 0.142857), "u2": 0.08 * (1 - 0.714286),
                "u3": 0.08 * (-1 - 0.285714), "u4": 0.08 * (-1 + 1.0)}
    for u, v in expected.items():
        assert shifts[u] == pytest.approx(v, abs=1e-6)
    # band densities: density 0.2, bands (0.5, 1.0) -> 0.1 + shift, 0.2 + shift, clamped to [1e-3, 1]
    assert band_densities(0.2, shifts["u3"], (0.5, 1.0), 1e-3) == pytest.approx([1e-3, 0.2 - 0.102857], abs=1e-6)
    assert band_densities(0.2, 0.9, (0.5, 1.0), 1e-3) == pytest.approx([1.0, 1.0])


def _block(pct: float) -> BlockStat:
    return BlockStat(numel=100, abs_sum=1.0, count=int(pct))


def test_equal_outlier_ratios_give_no_shift() -> None:
    blocks = {"A": _block(3.0), "B": _block(3.0)}
    modules = {"u": ModuleStat("A", 5, 0.0, 4.0), "v": ModuleStat("B", 7, 0.0, 4.0)}
    assert dp_shifts(modules, blocks, 0.08) == {"u": 0.0, "v": 0.0}


def test_targets_are_matrices_inside_numbered_blocks() -> None:
    target = r"\.\d+\..*weight$"
    assert is_target("model.layers.3.mlp.up_proj.weight", 2, target)
    assert not is_target("model.layers.3.input_layernorm.weight", 1, target)
    assert not is_target("model.embed_tokens.weight", 2, target)
    assert not is_target("model.layers.3.mlp.up_proj.bias", 1, target)


def _dppa_model(seed: int) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {"emb.weight": torch.randn(6, 4, generator=g), "head.weight": torch.randn(3, 4, generator=g)}
    for blk in range(3):
        base[f"layers.{blk}.a.weight"] = torch.randn(8, 5, generator=g)
        base[f"layers.{blk}.b.weight"] = torch.randn(4, 5, generator=g)
        base[f"layers.{blk}.norm.weight"] = torch.ones(5)
    models = []
    for t in range(2):
        m = {}
        for k, v in base.items():
            d = 0.05 * torch.randn(v.shape, generator=g)
            if k.startswith(f"layers.{t}."):  # a few outliers in one block per model
                d.view(-1)[::7] *= 12.0
            m[k] = v + d
        models.append(m)
    return base, models


def _ref_dppa(base: dict, models: list[dict], density: float, bands: tuple, factors: tuple, lam_shift: float,
              mult: float, block_mult: float, weights: list[float]) -> dict:
    names = [k for k in base if k.startswith("layers.") and base[k].dim() == 2]
    blocks = sorted({".".join(k.split(".")[:2]) for k in names})
    out = {k: flat(v) for k, v in base.items()}
    for t, m in enumerate(models):
        deltas = {k: [x - y for x, y in zip(flat(m[k]), flat(base[k]), strict=True)] for k in base}
        a = {}
        for b in blocks:
            pooled = [x for k in names if k.startswith(b + ".") for x in deltas[k]]
            a[b] = ref_outlier_pct(pooled, block_mult)
        o = {k: ref_outlier_pct(deltas[k], mult) for k in names}
        n = {k: len(deltas[k]) for k in names}
        abar = sum(a.values()) / len(a)
        amax = max(abs(v - abar) for v in a.values()) or 1.0
        obar = sum(n[k] * o[k] for k in names) / sum(n.values())
        omax = max(abs(o[k] - obar) for k in names) or 1.0
        for k in base:
            d = deltas[k]
            if k in names:
                blk = ".".join(k.split(".")[:2])
                shift = lam_shift * (a[blk] - abar) / amax + lam_shift * (o[k] - obar) / omax
                dens = [min(1.0, max(1e-3, density * b + shift)) for b in bands]
                sets = [topk_indices(d, keep(x, len(d))) for x in dens]
                amp = []
                for i, x in enumerate(d):
                    band = next((j for j, s in enumerate(sets) if i in s), None)
                    amp.append(0.0 if band is None else factors[band] * x)
                d = amp
            out[k] = [y + weights[t] * x for y, x in zip(out[k], d, strict=True)]
    return {k: torch.tensor(v, dtype=torch.float64).view(base[k].shape) for k, v in out.items()}


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_dppa_merge_matches_brute_force(density: float) -> None:
    base, models = _dppa_model(seed=0)
    out = merge_task_vectors(base, models, method="dppa", density=density, weights=[1.0, 0.5])
    ref = _ref_dppa(base, models, density, (0.5, 1.0), (1.8, 1.0), 0.08, 5.0, 3.0, [1.0, 0.5])
    for k in base:
        torch.testing.assert_close(out[k].double(), ref[k], atol=1e-5, rtol=0)


def test_dppa_custom_bands_and_factors() -> None:
    base, models = _dppa_model(seed=1)
    out = merge_task_vectors(base, models, method="dppa", density=0.4, bands=(0.25, 0.5, 1.0),
                             band_factors=(3.0, 2.0, 0.5), shift=0.05, outlier_mult=3.0)
    ref = _ref_dppa(base, models, 0.4, (0.25, 0.5, 1.0), (3.0, 2.0, 0.5), 0.05, 3.0, 3.0, [1.0, 1.0])
    for k in base:
        torch.testing.assert_close(out[k].double(), ref[k], atol=1e-5, rtol=0)


def test_dppa_keeps_about_density_of_targeted_deltas() -> None:
    base, models = _dppa_model(seed=2)
    out = merge_task_vectors(base, models[:1], method="dppa", density=0.3)
    kept = total = 0
    for k in base:
        if k.startswith("layers.") and base[k].dim() == 2:
            kept += int(((out[k] - base[k]).abs() > 0).sum())
            total += base[k].numel()
    assert abs(kept / total - 0.3) < 0.08  # shifts have zero (weighted) mean


def test_factor_search_climbs_to_validation_optimum() -> None:
    calls = []

    def score(f: tuple[float, ...]) -> float:  # peak at (2.3, 1.4)
        calls.append(f)
        return -((f[0] - 2.3) ** 2) - (f[1] - 1.4) ** 2 if f[1] > 0 else -((f[0] - 2.3) ** 2) - 5.0

    res = search_dppa_factors(score, start=(1.8, 1.0), step=0.1)
    assert res.factors == pytest.approx((2.3, 1.4))
    assert res.score == pytest.approx(0.0, abs=1e-12)
    assert len(set(calls)) == len(calls)  # cached: every tuple evaluated once
    assert all(c[1] == 0.0 for c in calls[:7])  # stage 1 tunes band 1 with band 2 absent

    down = search_dppa_factors(lambda f: -abs(f[0] - 1.2), start=(1.8,), step=0.2)
    assert down.factors == pytest.approx((1.2,))


def test_factor_search_rejects_nan_and_bad_step() -> None:
    with pytest.raises(TaskVectorError, match="NaN"):
        search_dppa_factors(lambda f: float("nan"))
    with pytest.raises(TaskVectorError, match="positive step"):
        search_dppa_factors(lambda f: 0.0, step=0.0)
