"""Each method against a dense reference on small random tensors (and a few hand-computed cases)."""

from __future__ import annotations

import math

import pytest
import torch
from tv_refs import flat, keep, make_models, ref_combine, ref_slerp, ref_ties_tensor, topk_indices

from fxmerge.taskvector import merge_task_vectors
from fxmerge.taskvector.sparsify import della_keep_prob, tensor_generator

ATOL = 1e-5


def _delta(m: dict, b: dict, k: str) -> list[float]:
    return [x - y for x, y in zip(flat(m[k]), flat(b[k]), strict=True)]


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_honours_weights_and_lambda(normalize: bool) -> None:
    base, models = make_models()
    w, lam = [0.5, -0.25, 2.0], 0.7
    out = merge_task_vectors(base, models, method="task_arithmetic", weights=w, lam=lam, normalize=normalize)
    div = sum(w) if normalize else 1.0
    for k, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(out[k], b)
            continue
        expected = b.double() + lam * sum(wi * (m[k].double() - b.double()) for wi, m in zip(w, models, strict=True)) / div
        torch.testing.assert_close(out[k].double(), expected, atol=ATOL, rtol=0)


def test_ties_hand_computed() -> None:
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([3.0, -1.0, 0.5, -2.0])},
              {"w": torch.tensor([-1.0, -2.0, 4.0, 0.25])},
              {"w": torch.tensor([2.0, 1.0, -3.0, -0.1])}]
    # density 0.5 keeps 2 of 4: [3,0,0,-2], [0,-2,4,0], [2,0,-3,0]
    # elect sum: [5,-2,1,-2] -> +,-,+,-; disjoint mean: [2.5, -2, 4, -2]
    out = merge_task_vectors(base, models, method="ties", density=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([2.5, -2.0, 4.0, -2.0]))
    # lambda 2 and weights (mergekit convention: weights before election, weighted disjoint mean)
    # weighted trimmed: [3,0,0,-2], [0,-6,12,0], [2,0,-3,0]; sums [5,-6,9,-2]
    # agree: p0 {0,2} -> (3+2)/(1+1); p1 {1} -> -6/3; p2 {1} -> 12/3; p3 {0} -> -2/1
    out = merge_task_vectors(base, models, method="ties", density=0.5, weights=[1.0, 3.0, 1.0], lam=2.0)
    torch.testing.assert_close(out["w"], 2.0 * torch.tensor([2.5, -2.0, 4.0, -2.0]))


@pytest.mark.parametrize("density", [0.3, 0.55, 1.0])
def test_ties_matches_dense_reference(density: float) -> None:
    base, models = make_models(seed=1)
    w = [0.6, 1.3, 0.9]
    out = merge_task_vectors(base, models, method="ties", density=density, weights=w, lam=1.4)
    for k, b in base.items():
        if b.is_floating_point():
            ref = ref_ties_tensor(b, [m[k] for m in models], w, density, 1.4)
            torch.testing.assert_close(out[k].double(), ref, atol=ATOL, rtol=0)


def test_ties_count_consensus_and_unnormalised() -> None:
    base, models = make_models(seed=2)
    out = merge_task_vectors(base, models, method="ties", density=0.5, consensus="count", normalize=False)
    k = "blocks.1.fc.weight"
    deltas = []
    for m in models:
        d = _delta(m, base, k)
        kept = topk_indices(d, keep(0.5, len(d)))
        deltas.append([d[i] if i in kept else 0.0 for i in range(len(d))])
    ref = [x + y for x, y in zip(flat(base[k]), ref_combine(deltas, [1.0] * 3, "count", False), strict=True)]
    torch.testing.assert_close(out[k].double().reshape(-1), torch.tensor(ref, dtype=torch.float64), atol=ATOL, rtol=0)


def test_row_and_global_scopes_match_brute_force() -> None:
    base, models = make_models(n_models=2, seed=3)
    w = [1.0, 1.0]
    out_row = merge_task_vectors(base, models, method="ties", density=0.4, scope="row")
    k = "blocks.1.fc.weight"  # 6 rows x 5 cols -> keep 2 per row
    per_model = []
    for m in models:
        d = (m[k] - base[k]).double()
        rows = []
        for r in range(d.shape[0]):
            row = flat(d[r])
            kept = topk_indices(row, keep(0.4, 5))
            rows += [row[i] if i in kept else 0.0 for i in range(5)]
        per_model.append(rows)
    ref = torch.tensor(flat(base[k]), dtype=torch.float64) + torch.tensor(ref_combine(per_model, w, "sum", True), dtype=torch.float64)
    torch.testing.assert_close(out_row[k].double().reshape(-1), ref, atol=ATOL, rtol=0)

    out_glob = merge_task_vectors(base, models, method="ties", density=0.25, scope="global")
    floats = [n for n, v in base.items() if v.is_floating_point()]
    kept_sets = []
    for m in models:
        allv = [(n, i, x) for n in floats for i, x in enumerate(_delta(m, base, n))]
        order = sorted(range(len(allv)), key=lambda j: (-abs(allv[j][2]), j))
        kept_sets.append({(allv[j][0], allv[j][1]) for j in order[: keep(0.25, len(allv))]})
    for n in floats:
        dl = [[x if (n, i) in kept_sets[t] else 0.0 for i, x in enumerate(_delta(models[t], base, n))] for t in range(2)]
        ref = torch.tensor(flat(base[n]), dtype=torch.float64) + torch.tensor(ref_combine(dl, w, "sum", True), dtype=torch.float64)
        torch.testing.assert_close(out_glob[n].double().reshape(-1), ref, atol=ATOL, rtol=0)


def test_dare_masks_rescale_and_reproducibility() -> None:
    base, models = make_models(seed=4)
    out = merge_task_vectors(base, models, method="dare_linear", density=0.3, seed=11, weights=[1.0, 0.5, 2.0])
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        expected = b.double().clone()
        for i, (m, w) in enumerate(zip(models, [1.0, 0.5, 2.0], strict=True)):
            mask = torch.rand(b.shape, generator=tensor_generator(11, i, k)) < 0.3
            expected += w * (m[k].double() - b.double()) * mask / 0.3
        torch.testing.assert_close(out[k].double(), expected, atol=ATOL, rtol=0)
    again = merge_task_vectors(base, models, method="dare_linear", density=0.3, seed=11, weights=[1.0, 0.5, 2.0])
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = merge_task_vectors(base, models, method="dare_linear", density=0.3, seed=12, weights=[1.0, 0.5, 2.0])
    assert not torch.equal(out["emb.weight"], other["emb.weight"])


def test_dare_expectation_is_the_delta() -> None:
    n, c, p = 40000, 0.5, 0.2
    base = {"w": torch.zeros(n)}
    model = {"w": torch.full((n,), c)}
    out = merge_task_vectors(base, [model], method="dare_linear", density=p, seed=5)["w"]
    kept = out != 0
    assert torch.allclose(out[kept], torch.tensor(c / p))  # survivors are exactly delta / density
    frac = float(kept.float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)  # Bernoulli(p) keep rate
    assert abs(float(out.mean()) - c) < 5 * c * math.sqrt((1 - p) / p / n)  # E[out] = delta


def test_dare_l1_rescale_matches_norm() -> None:
    base, models = make_models(n_models=1, seed=6)
    out = merge_task_vectors(base, models, method="dare_linear", density=0.5, rescale="l1", seed=3)
    for k in ("emb.weight", "blocks.1.fc.weight"):
        d = models[0][k] - base[k]
        merged = out[k] - base[k]
        assert abs(float(merged.abs().sum()) - float(d.abs().sum())) < 1e-4


def test_dare_ties_reference() -> None:
    base, models = make_models(seed=7)
    out = merge_task_vectors(base, models, method="dare_ties", density=0.6, seed=2)
    k = "blocks.0.fc.weight"
    deltas = []
    for i, m in enumerate(models):
        mask = flat((torch.rand(base[k].shape, generator=tensor_generator(2, i, k)) < 0.6).double())
        deltas.append([d * mk / 0.6 for d, mk in zip(_delta(m, base, k), mask, strict=True)])
    ref = torch.tensor(flat(base[k]), dtype=torch.float64) + torch.tensor(ref_combine(deltas, [1.0] * 3, "sum", False), dtype=torch.float64)
    torch.testing.assert_close(out[k].double().reshape(-1), ref, atol=ATOL, rtol=0)


def test_della_probabilities_and_reference() -> None:
    row = torch.tensor([[0.3, -0.1, 0.05, 0.9, -0.4]])
    # ranks by |x| ascending: 0.05->0, -0.1->1, 0.3->2, -0.4->3, 0.9->4; p = 0.5-0.2 + 0.4*rank/4
    probs = della_keep_prob(row, 0.5, 0.2, "row")
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.4, 0.3, 0.7, 0.6]]))
    base, models = make_models(seed=8)
    out = merge_task_vectors(base, models, method="della", density=0.5, epsilon=0.2, scope="row", seed=9)
    k = "blocks.1.proj.weight"
    deltas = []
    for i, m in enumerate(models):
        d = m[k] - base[k]
        pr = della_keep_prob(d, 0.5, 0.2, "row")
        mask = torch.rand(d.shape, generator=tensor_generator(9, i, k)) < pr
        deltas.append(flat(d * mask / pr))
    ref = torch.tensor(flat(base[k]), dtype=torch.float64) + torch.tensor(ref_combine(deltas, [1.0] * 3, "sum", True), dtype=torch.float64)
    torch.testing.assert_close(out[k].double().reshape(-1), ref, atol=ATOL, rtol=0)


def test_breadcrumbs_drops_top_gamma_and_bottom() -> None:
    base = {"w": torch.zeros(10)}
    model = {"w": torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]) * torch.tensor([1, -1] * 5)}
    # density 0.5 keeps 5; gamma 0.2 drops the top 2 -> ranks 3..7: values 8..4
    out = merge_task_vectors(base, [model], method="breadcrumbs", density=0.5, gamma=0.2)["w"]
    expected = model["w"].clone()
    expected[:2] = 0
    expected[7:] = 0
    torch.testing.assert_close(out, expected)
    # gamma too large for the density: top removal shrinks so exactly k remain (ranks 5..9 -> bottom 5)
    out = merge_task_vectors(base, [model], method="breadcrumbs", density=0.5, gamma=0.8)["w"]
    expected = model["w"].clone()
    expected[:5] = 0
    torch.testing.assert_close(out, expected)


def test_model_stock_formula() -> None:
    base, models = make_models(n_models=3, seed=10)
    out = merge_task_vectors(base, models, method="model_stock")
    for k in ("emb.weight", "blocks.1.fc.weight"):
        d = [torch.tensor(_delta(m, base, k)) for m in models]
        cos = [float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i in range(3) for j in range(i + 1, 3)]
        c = sum(cos) / 3
        t = 3 * c / (1 + 2 * c)
        mean_models = sum(m[k].double() for m in models) / 3
        expected = t * mean_models + (1 - t) * base[k].double()
        torch.testing.assert_close(out[k].double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_reference(t: float) -> None:
    base, models = make_models(n_models=1, seed=11, scale=1.0)
    out = merge_task_vectors(base, models, method="slerp", t=t)
    for k in ("emb.weight", "blocks.1.proj.weight"):
        torch.testing.assert_close(out[k].double(), ref_slerp(base[k], models[0][k], t), atol=ATOL, rtol=0)


def test_lambda_zero_returns_base_and_weights_zero_ignore_model() -> None:
    base, models = make_models(seed=12)
    out = merge_task_vectors(base, models, method="ties", density=0.5, lam=0.0)
    assert all(torch.equal(out[k], base[k]) for k in base)
    a = merge_task_vectors(base, models, method="task_arithmetic", weights=[1.0, 0.0, 1.0])
    b = merge_task_vectors(base, [models[0], models[2]], method="task_arithmetic")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in base)


def test_out_dtype_and_inputs_untouched() -> None:
    base, models = make_models(seed=13)
    copies = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    out = merge_task_vectors(base, models, method="dare_ties", density=0.5, out_dtype="bfloat16")
    assert out["emb.weight"].dtype == torch.bfloat16 and out["position_ids"].dtype == torch.int64
    for orig, m in zip(copies, [base, *models], strict=True):
        assert all(torch.equal(orig[k], m[k]) for k in orig)
