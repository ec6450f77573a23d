"""Dense, brute-force reference implementations (pure Python / float64) for the task-vector tests.

They follow the formulas in docs/taskvector.md literally, element by element, sharing no code with
fxmerge.taskvector, so a disagreement points at the library.
"""

from __future__ import annotations

import math

import torch


def make_models(n_models: int = 3, seed: int = 0, scale: float = 0.1) -> tuple[dict, list[dict]]:
    """A small base (two numbered blocks, embedding, norm, int buffer) and noisy fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "emb.weight": torch.randn(7, 4, generator=g),
        "blocks.0.fc.weight": torch.randn(5, 4, generator=g),
        "blocks.0.fc.bias": torch.randn(5, generator=g),
        "blocks.0.norm.weight": torch.ones(4),
        "blocks.1.fc.weight": torch.randn(6, 5, generator=g),
        "blocks.1.proj.weight": torch.randn(4, 6, generator=g),
        "position_ids": torch.arange(6),
    }
    models = []
    for _ in range(n_models):
        models.append({k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
                       for k, v in base.items()})
    return base, models


def flat(t: torch.Tensor) -> list[float]:
    """Tensor as a Python list of floats (float64)."""
    return [float(x) for x in t.double().reshape(-1)]


def topk_indices(values: list[float], k: int) -> set[int]:
    """Indices of the k largest |values|; ties go to the lower index."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    return set(order[:k])


def keep(density: float, n: int) -> int:
    """mergekit's k: max(1, floor(density * n)); all at density >= 1."""
    return n if density >= 1 else min(n, max(1, int(density * n)))


def sign(x: float) -> int:
    """-1, 0 or +1."""
    return (x > 0) - (x < 0)


def ref_combine(deltas: list[list[float]], weights: list[float], consensus: str | None, normalize: bool) -> list[float]:
    """Weighted combine with optional TIES sign election (mergekit convention), element by element."""
    out = []
    for p in range(len(deltas[0])):
        wd = [w * d[p] for w, d in zip(weights, deltas, strict=True)]
        if consensus is None:
            total = sum(wd)
            div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
            out.append(total / div if normalize else total)
            continue
        s = sum(wd) if consensus == "sum" else sum(sign(x) for x in wd)
        gamma = 1 if s >= 0 else -1
        agree = [i for i, x in enumerate(wd) if sign(x) == gamma]
        total = sum(wd[i] for i in agree)
        div = sum(weights[i] for i in agree) or 1.0
        out.append(total / div if normalize else total)
    return out


def ref_ties_tensor(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float,
                    lam: float, normalize: bool = True) -> torch.Tensor:
    """TIES on one tensor: per-tensor exact top-k trim, sign election, disjoint (weighted) mean."""
    b = flat(base)
    deltas = []
    for m in models:
        d = [x - y for x, y in zip(flat(m), b, strict=True)]
        kept = topk_indices(d, keep(density, len(d)))
        deltas.append([d[i] if i in kept else 0.0 for i in range(len(d))])
    mixed = ref_combine(deltas, weights, "sum", normalize)
    return torch.tensor([x + lam * y for x, y in zip(b, mixed, strict=True)], dtype=torch.float64).view(base.shape)


def ref_outlier_pct(values: list[float], mult: float, mean: float | None = None) -> float:
    """100 * #{|v| > mult * mean|v|} / n."""
    a = [abs(v) for v in values]
    m = sum(a) / len(a) if mean is None else mean
    return 100.0 * sum(1 for x in a if x > mult * m) / len(a)


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP in float64 from the textbook formula (lerp when nearly parallel)."""
    x, y = flat(a), flat(b)
    nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    dot = sum(p * q for p, q in zip(x, y, strict=True)) / (nx * ny)
    if abs(dot) > 0.9995:
        return torch.tensor([(1 - t) * p + t * q for p, q in zip(x, y, strict=True)], dtype=torch.float64).view(a.shape)
    om = math.acos(max(-1.0, min(1.0, dot)))
    c0, c1 = math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)
    return torch.tensor([c0 * p + c1 * q for p, q in zip(x, y, strict=True)], dtype=torch.float64).view(a.shape)
