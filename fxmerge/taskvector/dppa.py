"""DPPA (Zhu, Xia, Zhang 2024, arXiv 2403.02799): Dynamic Pruning + Dynamic Partition Amplification.

DP assigns each targeted module u (a 2-D weight inside a numbered block l) a density shift from
outlier ratios of its delta magnitudes, computed once per model (whole-model statistics)::

    a_l = 100 * #{|d| > Mb * mean_l|d|} / N_l      (pooled over the block's targeted weights, Mb = 3)
    o_u = 100 * #{|d| > M  * mean_u|d|} / n_u      (M = 5)
    A_l = (a_l - mean_l a) / max_l |a_l - mean a|                      (0 when all equal)
    O_u = (o_u - obar) / max_u |o_u - obar|,   obar = sum n_u o_u / sum n_u
    shift_u = lam * A_l(u) + lam * O_u
    density of band k for u = clamp(density * bands[k] + shift_u, min_density, 1)

DPA then keeps the union of the bands and multiplies band k (ranks of |d| within the module, exact
top-k) by ``band_factors[k]``. Non-targeted tensors (embeddings, norms, biases, head) keep their dense
delta unamplified. :func:`search_dppa_factors` tunes the factors on a user validation callback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fxmerge.errors import TaskVectorError


def block_of(name: str) -> str | None:
    """The block prefix of a tensor name: everything up to and including its first all-digit component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def is_target(name: str, ndim: int, target: str) -> bool:
    """Whether DP/DPA prune this tensor: a >= 2-D tensor in a numbered block matching ``target``."""
    return ndim >= 2 and block_of(name) is not None and re.search(target, name) is not None


def outlier_pct(absval: torch.Tensor, mult: float, mean: float | None = None) -> float:
    """``100 * fraction of entries with |d| > mult * mean|d|`` (the mean is over ``absval`` unless given)."""
    if absval.numel() == 0:
        return 0.0
    m = float(absval.mean()) if mean is None else mean
    return 100.0 * float((absval > mult * m).sum()) / absval.numel()


@dataclass
class ModuleStat:
    """Per-module statistics gathered in DPPA's first pass."""

    block: str
    numel: int
    abs_sum: float
    outlier: float = 0.0


@dataclass
class BlockStat:
    """Per-block pooled statistics (outlier count needs the pooled mean, hence a second look)."""

    numel: int = 0
    abs_sum: float = 0.0
    count: int = 0
    members: list[str] = field(default_factory=list)

    @property
    def pct(self) -> float:
        """Pooled outlier percentage ``a_l``."""
        return 100.0 * self.count / self.numel if self.numel else 0.0


def _normalised(values: dict[str, float], weights: dict[str, float] | None = None) -> dict[str, float]:
    if not values:
        return {}
    if weights is None:
        centre = sum(values.values()) / len(values)
    else:
        centre = sum(weights[k] * v for k, v in values.items()) / sum(weights.values())
    spread = max(abs(v - centre) for v in values.values())
    if spread == 0.0:
        return dict.fromkeys(values, 0.0)
    return {k: (v - centre) / spread for k, v in values.items()}


def dp_shifts(modules: dict[str, ModuleStat], blocks: dict[str, BlockStat], shift: float) -> dict[str, float]:
    """Per-module density shift ``lam * (A_block + O_module)`` from first-pass statistics."""
    a_hat = _normalised({b: s.pct for b, s in blocks.items()})
    o_hat = _normalised({u: s.outlier for u, s in modules.items()}, {u: float(s.numel) for u, s in modules.items()})
    return {u: shift * (a_hat[s.block] + o_hat[u]) for u, s in modules.items()}


def band_densities(density: float, shift: float, bands: Sequence[float], min_density: float) -> list[float]:
    """Clamped densities of the nested bands of one module."""
    return [min(1.0, max(min_density, density * b + shift)) for b in bands]


@dataclass(frozen=True)
class FactorSearchResult:
    """Outcome of :func:`search_dppa_factors`: best factors, their score, and every (factors, score) tried."""

    factors: tuple[float, ...]
    score: float
    history: tuple[tuple[tuple[float, ...], float], ...]


def search_dppa_factors(
    evaluate: Callable[[tuple[float, ...]], float],
    start: Sequence[float] = (1.8, 1.0),
    step: float = 0.1,
    max_steps: int = 20,
) -> FactorSearchResult:
    """Greedy coordinate ascent over DPPA band factors, driven by a *validation* score (higher is better).

    Bands are tuned in order (the most significant first). While band k is tuned, later bands are
    absent (factor 0) as in the reference procedure; band k starts at ``start[k]`` and moves up by
    ``step`` while the score strictly improves, or down (staying > 0) if the first step up did not
    help. ``evaluate`` must score a merge built with the given factors on held-out validation data,
    never on the test set. Scores are cached, so each factor tuple is evaluated once.
    """
    if step <= 0 or not start or max_steps < 0:
        raise TaskVectorError("search_dppa_factors: need a positive step, at least one start factor and max_steps >= 0")
    cache: dict[tuple[float, ...], float] = {}
    history: list[tuple[tuple[float, ...], float]] = []

    def score(f: list[float]) -> float:
        key = tuple(round(x, 10) for x in f)
        if key not in cache:
            value = float(evaluate(key))
            if math.isnan(value):
                raise TaskVectorError(f"search_dppa_factors: evaluate{key} returned NaN")
            cache[key] = value
            history.append((key, value))
        return cache[key]

    factors = [0.0] * len(start)
    for k, init in enumerate(start):
        factors[k] = float(init)
        best = score(factors)
        for direction in (1.0, -1.0):
            moved = False
            for _ in range(max_steps):
                trial = factors[k] + direction * step
                if trial <= 0:
                    break
                cand = factors.copy()
                cand[k] = trial
                value = score(cand)
                if value <= best:
                    break
                factors, best, moved = cand, value, True
            if moved:
                break
    final = tuple(round(x, 10) for x in factors)
    return FactorSearchResult(final, cache[final], tuple(history))
