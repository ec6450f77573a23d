"""Sparsifiers for one delta tensor: exact top-k masks, Bernoulli (DARE), DELLA, breadcrumbs, rescale.

Conventions shared by every rule:

* ``k = max(1, floor(density * n))`` kept elements for density < 1 (mergekit's rule); density >= 1 keeps all.
* "Top-k" is exact: the order is |delta| descending, ties broken by the lower flat index (row scope:
  the lower column index), so masks for k1 < k2 are nested and results are deterministic.
* Random masks come from a ``torch.Generator`` seeded from (seed, model index, tensor name), so they
  do not depend on the order in which tensors are processed.
"""

from __future__ import annotations

import hashlib

import torch


def keep_count(density: float, n: int) -> int:
    """Number of elements a density keeps out of ``n``: ``max(1, floor(density * n))``, or ``n`` at density >= 1."""
    if n == 0:
        return 0
    if density >= 1.0:
        return n
    return min(n, max(1, int(density * n)))


def tensor_generator(seed: int, model_index: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, model index, tensor name) through BLAKE2b."""
    digest = hashlib.blake2b(f"{seed}\x00{model_index}\x00{name}".encode(), digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def _take_first_equal(mask: torch.Tensor, eq: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Add to ``mask`` the first ``need`` (per row) positions of ``eq`` along the last dim."""
    rank = torch.cumsum(eq, dim=-1, dtype=torch.int64)
    return mask | (eq & (rank <= need))


def topk_mask_rows(absval: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of each row of a 2-D tensor (ties: lower column first)."""
    _rows, cols = absval.shape
    if k >= cols:
        return torch.ones_like(absval, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(absval, dtype=torch.bool)
    thr = torch.kthvalue(absval, cols - k + 1, dim=1, keepdim=True).values
    mask = absval > thr
    need = k - mask.sum(dim=1, keepdim=True)
    return _take_first_equal(mask, absval == thr, need)


def topk_mask(absval: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape) of the ``k`` largest entries overall, ties broken by lower flat index."""
    flat = absval.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(absval, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(absval, dtype=torch.bool)
    thr = torch.kthvalue(flat, n - k + 1).values
    mask = flat > thr
    need = k - int(mask.sum())
    eq = flat == thr
    if int(eq.sum()) > need:
        mask = _take_first_equal(mask, eq, torch.tensor(need))
    else:
        mask |= eq
    return mask.view(absval.shape)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as (rows, cols): dim 0 is the row; 0-/1-D tensors are one row."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def magnitude_mask(delta: torch.Tensor, density: float, scope: str) -> torch.Tensor:
    """Exact top-k of |delta| per tensor (``scope='tensor'``) or per row (``scope='row'``)."""
    absval = delta.abs()
    if scope == "row":
        rows = as_rows(absval)
        return topk_mask_rows(rows, keep_count(density, rows.shape[1])).view(delta.shape)
    return topk_mask(absval, keep_count(density, delta.numel()))


def band_masks(delta: torch.Tensor, densities: list[float]) -> list[torch.Tensor]:
    """Disjoint masks of the rank bands ``[k_{i-1}, k_i)`` for increasing densities (exact top-k ranking)."""
    absval = delta.abs()
    n = delta.numel()
    masks, prev = [], torch.zeros_like(absval, dtype=torch.bool)
    for d in densities:
        cur = topk_mask(absval, keep_count(d, n)) if d < 1.0 else torch.ones_like(prev)
        cur |= prev  # clamping may make an inner density exceed an outer one
        masks.append(cur & ~prev)
        prev = cur
    return masks


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the rank band after dropping the top ``gamma`` fraction (reduced so exactly k remain)."""
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)
    absval = delta.abs()
    return topk_mask(absval, n_top + keep) & ~topk_mask(absval, n_top)


def random_mask(shape: torch.Size, density: float, gen: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep-mask drawn from ``gen``."""
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=gen) < density


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float, scope: str) -> torch.Tensor:
    """DELLA/MagPrune keep probabilities: linear in the |delta| rank over [density-eps, density+eps].

    Ranks are taken within each row (``scope='row'``) or over the whole tensor (``'tensor'``); the
    smallest magnitude gets ``density - eps`` and the largest ``density + eps``.
    """
    absval = as_rows(delta.abs()) if scope == "row" else delta.abs().reshape(1, -1)
    cols = absval.shape[1]
    order = torch.argsort(absval, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols).expand_as(order))
    norm = ranks.to(torch.float32) / max(cols - 1, 1)
    return ((density - epsilon) + 2.0 * epsilon * norm).view(delta.shape)


def apply_rescale(delta: torch.Tensor, kept: torch.Tensor, mode: str, keep_prob: float | torch.Tensor) -> torch.Tensor:
    """Rescale the kept delta: ``inverse`` divides by the keep probability (unbiased),
    ``l1`` matches the L1 norm of the unsparsified delta (mergekit), ``none`` leaves it."""
    if mode == "inverse":
        return kept.div_(keep_prob)
    if mode == "l1":
        after = kept.abs().sum()
        if float(after) > 1e-7:
            return kept.mul_(delta.abs().sum() / after)
    return kept
