"""Brute-force oracles and similarity generators for the matcher tests (no fxmerge code used)."""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import torch


def stacked_corr(
    n: int, sizes: list[int], seed: int, noise: float = 0.8, dtype=torch.float64
) -> torch.Tensor:
    """Pearson correlation of [A | B | …] where every model's units are noisy mixtures of shared factors."""
    g = torch.Generator().manual_seed(seed)
    width = max(sizes)
    base = torch.randn(n, width, generator=g, dtype=torch.float64)
    feats = []
    for c in sizes:
        perm = torch.randperm(width, generator=g)[:c]
        feats.append(base[:, perm] + noise * torch.randn(n, c, generator=g, dtype=torch.float64))
    x = torch.cat(feats, dim=1)
    x = x - x.mean(dim=0)
    cov = x.T @ x
    d = cov.diagonal().sqrt()
    corr = cov / d[:, None] / d[None, :]
    corr = (corr + corr.T) / 2
    return corr.to(dtype)


def random_sym(total: int, seed: int, levels: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """Symmetric matrix with entries in [-1, 1]; with ``levels`` the entries are quantised (many ties)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(total, total))
    if levels is not None:
        a = np.round(a * levels) / levels
    a = np.triu(a) + np.triu(a, 1).T
    return torch.as_tensor(a, dtype=dtype)


def brute_perm(cross: np.ndarray) -> tuple[tuple[int, ...], float]:
    """Injective map rows -> cols maximising the summed score, by enumeration (rows <= cols)."""
    rows, cols = cross.shape
    best, best_p = -math.inf, None
    for p in itertools.permutations(range(cols), rows):
        score = float(sum(cross[i, p[i]] for i in range(rows)))
        if score > best:
            best, best_p = score, p
    return best_p, best / rows


def zip_definitional(
    sim: np.ndarray, owner: list[int], n_merges: int, alpha: float, budgets: list[int]
) -> tuple[list[tuple[int, int]], list[float]]:
    """Greedy zip from its definition, without any matrix bookkeeping.

    A cluster's similarity to another is evaluated recursively from the merge history: for the
    younger cluster Z = Z1 ∪ Z2 (formed at step t), sim(Z, W) = alpha * min(sim(Z1, W), sim(Z2, W))
    evaluated in the state before step t; two singletons use the input matrix; a pair with the same
    owner (owner of the lowest member) is -inf once that owner's budget is exhausted. Every step
    enumerates all live pairs and takes the largest, ties to the lexicographically smallest
    (lowest rep, then its partner's rep).
    """
    n = len(owner)
    budgets = list(budgets)
    kill_state = {o: 0 for o, b in enumerate(budgets) if b <= 0}  # owner -> first state it is killed in
    created = dict.fromkeys(range(n), 0)  # cluster id -> state it exists from
    children: dict[int, tuple[int, int]] = {}
    rep = {i: i for i in range(n)}
    alive = set(range(n))
    next_id = n

    @cache
    def value(a: int, b: int, state: int) -> float:
        oa, ob = owner[rep[a]], owner[rep[b]]
        if oa == ob and kill_state.get(oa, math.inf) <= state:
            return -math.inf
        if a not in children and b not in children:
            return float(sim[rep[a], rep[b]])
        z, w = (a, b) if created[a] > created[b] else (b, a)
        z1, z2 = children[z]
        before = created[z] - 1
        return alpha * min(value(z1, w, before), value(z2, w, before))

    pairs, picks = [], []
    for step in range(n_merges):
        best = None
        for a, b in itertools.combinations(sorted(alive, key=lambda c: rep[c]), 2):
            key = (value(a, b, step), -rep[a], -rep[b])
            if best is None or key > best[0]:
                best = (key, a, b)
        (v, _, _), a, b = best
        if v == -math.inf:
            raise ValueError("all pairs forbidden")
        pairs.append((rep[a], rep[b]))
        picks.append(v)
        new = next_id
        next_id += 1
        children[new], created[new], rep[new] = (a, b), step + 1, rep[a]
        alive -= {a, b}
        alive.add(new)
        o = owner[rep[a]]
        if o == owner[rep[b]]:
            budgets[o] -= 1
            if budgets[o] <= 0 and o not in kill_state:
                kill_state[o] = step + 1
    return pairs, picks


def columns_of(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Merged column of each unit (columns by ascending representative) from (x, y) merge pairs."""
    root = list(range(n))

    def find(u: int) -> int:
        while root[u] != u:
            u = root[u]
        return u

    for x, y in pairs:
        root[find(y)] = find(x)
    reps = sorted({find(u) for u in range(n)})
    col = {r: k for k, r in enumerate(reps)}
    return np.array([col[find(u)] for u in range(n)])


def columns_from_matching(matching) -> np.ndarray:
    """Merged column of every stacked unit, read from a Matching's 0/1 unmerge blocks."""
    u = torch.cat(matching.unmerge, dim=0)
    assert torch.all(u.sum(dim=1) <= 1)
    cols = u.argmax(dim=1).numpy()
    cols[u.sum(dim=1).numpy() == 0] = -1
    return cols
