"""Unbiased linear CKA between the blocks of two models, accumulated over minibatches.

The estimator is minibatch CKA with the unbiased HSIC_1 of Song et al. (2012), as used for layer
alignment in heterogeneous merging (see ``/work/shared/reference/hetero.md`` §1.2):

    h(K, L) = [tr(KL) + (1ᵀK1)(1ᵀL1) / ((n-1)(n-2)) - 2·1ᵀKL1 / (n-2)] / (n(n-3))

where K = X Xᵀ and L = Y Yᵀ are linear Gram matrices of one batch with their diagonals zeroed, and

    CKA_ij = mean_b h(K_i, L_j) / sqrt(mean_b h(K_i, K_i) · mean_b h(L_j, L_j)).

Each Gram matrix is computed once per batch; all (i, j) cross terms then come from two small matrix
products, so a batch costs n_a + n_b Grams instead of 2·n_a·n_b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fxmerge.errors import MergeError

__all__ = ["MinibatchCKA", "gram_stack", "hsic1_cross", "hsic1_self", "linear_cka"]

MIN_BATCH = 4  # the unbiased estimator divides by n(n-3) and (n-2)


def _check_batch(feats: list[torch.Tensor], expected: int, name: str, n: int | None) -> int:
    """Check one model's feature list and return the common batch size."""
    if len(feats) != expected:
        raise MergeError(f"{name}: got features for {len(feats)} blocks, expected {expected}.")
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.dim() < 1:
            raise MergeError(f"{name}[{i}] must be a tensor of shape [batch, ...], got {_describe(f)}.")
        n = f.shape[0] if n is None else n
        if f.shape[0] != n:
            raise MergeError(
                f"{name}[{i}] has batch size {f.shape[0]} but other blocks have {n}: "
                "all blocks of both models must see the same samples."
            )
    return -1 if n is None else n


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def gram_stack(feats: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Linear Grams X Xᵀ with zeroed diagonals for every block, stacked to [blocks, n, n].

    Each tensor in ``feats`` is [n, ...] and is flattened per sample. Inputs are never modified.
    """
    grams = []
    for f in feats:
        x = f.detach().reshape(f.shape[0], -1).to(device=device, dtype=dtype)
        k = x @ x.T
        k.fill_diagonal_(0.0)
        grams.append(k)
    return torch.stack(grams)


def hsic1_cross(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 for every pair of Grams: [a, n, n] x [b, n, n] -> [a, b].

    The Grams must be symmetric with zero diagonals (as produced by :func:`gram_stack`).
    """
    n = k.shape[-1]
    trace = k.flatten(1) @ g.flatten(1).T  # tr(K L) = Σ K∘L for symmetric K, L
    k_rows, l_rows = k.sum(-1), g.sum(-1)  # K1, L1
    total = torch.outer(k_rows.sum(-1), l_rows.sum(-1)) / ((n - 1) * (n - 2))
    middle = 2.0 * (k_rows @ l_rows.T) / (n - 2)  # 1ᵀ K L 1 = (K1)ᵀ(L1)
    return (trace + total - middle) / (n * (n - 3))


def hsic1_self(k: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 of each Gram with itself: [a, n, n] -> [a]."""
    n = k.shape[-1]
    rows = k.sum(-1)
    trace = (k * k).sum((-2, -1))
    total = rows.sum(-1) ** 2 / ((n - 1) * (n - 2))
    middle = 2.0 * (rows * rows).sum(-1) / (n - 2)
    return (trace + total - middle) / (n * (n - 3))


def _cka_from_sums(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    bad_a = torch.nonzero(~(self_a > 0)).flatten().tolist()
    bad_b = torch.nonzero(~(self_b > 0)).flatten().tolist()
    if bad_a or bad_b:
        raise MergeError(
            "CKA is undefined for blocks whose outputs do not vary over the data "
            f"(self-HSIC <= 0 or not finite): model A blocks {bad_a}, model B blocks {bad_b}. "
            "Check the hooked outputs (dead or constant activations) or use more samples."
        )
    return cross / torch.sqrt(torch.outer(self_a, self_b))


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Full-batch unbiased linear CKA between two representations of the same n samples.

    Args:
        x: [n, ...] features of the first representation (flattened per sample).
        y: [n, ...] features of the second representation, same samples in the same order.
        dtype: dtype in which the Grams and HSIC terms are computed.

    Returns:
        A 0-d tensor with h(K, L) / sqrt(h(K, K) h(L, L)).

    Raises:
        MergeError: if the batch sizes differ, n < 4, or a representation is constant.
    """
    n = _check_batch([x], 1, "x", None)
    _check_batch([y], 1, "y", n)
    if n < MIN_BATCH:
        raise MergeError(f"Unbiased CKA needs at least {MIN_BATCH} samples, got {n}.")
    k, g = gram_stack([x], dtype, x.device), gram_stack([y], dtype, x.device)
    return _cka_from_sums(hsic1_cross(k, g), hsic1_self(k), hsic1_self(g))[0, 0]


class MinibatchCKA:
    """Accumulates the minibatch unbiased linear CKA matrix between n_a blocks of A and n_b blocks of B.

    Call :meth:`update` once per batch with every block's features for the same samples, optionally
    :meth:`all_reduce` once after the last update (when running under ``torch.distributed``), then
    :meth:`result`.

    Example:
        >>> cka = MinibatchCKA(2, 1)
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(8, 5, generator=g)
        >>> cka.update([x, 2 * x], [x])
        >>> torch.allclose(cka.result(), torch.ones(2, 1, dtype=torch.float64))
        True
    """

    def __init__(self, n_a: int, n_b: int, *, dtype: torch.dtype = torch.float64) -> None:
        """Create an empty accumulator for an [n_a, n_b] CKA matrix computed in ``dtype``."""
        if n_a < 1 or n_b < 1:
            raise MergeError(f"MinibatchCKA needs at least one block per model, got n_a={n_a}, n_b={n_b}.")
        if not dtype.is_floating_point:
            raise MergeError(f"MinibatchCKA dtype must be a floating dtype, got {dtype}.")
        self.n_a, self.n_b, self.dtype = n_a, n_b, dtype
        self._cross = torch.zeros(n_a, n_b, dtype=dtype)
        self._self_a = torch.zeros(n_a, dtype=dtype)
        self._self_b = torch.zeros(n_b, dtype=dtype)
        self._batches = 0
        self._reduced = False

    @property
    def num_batches(self) -> int:
        """Number of batches accumulated (summed over ranks after :meth:`all_reduce`)."""
        return self._batches

    @torch.no_grad()
    def update(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> None:
        """Add one batch: feats_a[i] is [n, ...] for block i of A, feats_b[j] for block j of B.

        Raises:
            MergeError: on wrong block counts, differing batch sizes, n < 4, non-finite features,
                or an update after :meth:`all_reduce`.
        """
        if self._reduced:
            raise MergeError("MinibatchCKA.update() after all_reduce(): create a new MinibatchCKA per pass.")
        n = _check_batch(feats_a, self.n_a, "feats_a", None)
        _check_batch(feats_b, self.n_b, "feats_b", n)
        if n < MIN_BATCH:
            raise MergeError(
                f"Unbiased minibatch CKA needs batches of at least {MIN_BATCH} samples, got {n}; "
                "use a larger batch size (drop_last=True avoids a short final batch)."
            )
        device = feats_a[0].device
        k, g = gram_stack(feats_a, self.dtype, device), gram_stack(feats_b, self.dtype, device)
        self._check_finite(k, "A")
        self._check_finite(g, "B")
        self._move_to(device)
        self._cross += hsic1_cross(k, g)
        self._self_a += hsic1_self(k)
        self._self_b += hsic1_self(g)
        self._batches += 1

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the accumulated terms over all ranks if ``torch.distributed`` is initialised.

        Call it once on every rank, after the last :meth:`update`; later calls are no-ops, and further
        updates are refused. Without an initialised process group it only marks the state as final.
        """
        if self._reduced:
            return
        if dist.is_available() and dist.is_initialized():
            flat = torch.cat(
                [
                    self._cross.flatten(),
                    self._self_a,
                    self._self_b,
                    torch.tensor([float(self._batches)], dtype=self.dtype, device=self._cross.device),
                ]
            )
            home = flat.device
            if dist.get_backend(group) == "nccl" and not flat.is_cuda:
                flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            self._unflatten(flat.to(home))
        self._reduced = True

    def result(self) -> torch.Tensor:
        """The [n_a, n_b] CKA matrix (dtype of the accumulator, on the features' device).

        Raises:
            MergeError: if no batch was added, or a block's outputs are constant over the data.
        """
        if self._batches == 0:
            raise MergeError("MinibatchCKA.result() called before any update(): feed at least one batch.")
        scale = 1.0 / self._batches  # means over batches; the scale cancels but keeps the terms readable
        return _cka_from_sums(self._cross * scale, self._self_a * scale, self._self_b * scale)

    def _move_to(self, device: torch.device) -> None:
        if self._cross.device != device:
            self._cross = self._cross.to(device)
            self._self_a = self._self_a.to(device)
            self._self_b = self._self_b.to(device)

    def _unflatten(self, flat: torch.Tensor) -> None:
        na, nb = self.n_a, self.n_b
        self._cross = flat[: na * nb].reshape(na, nb).clone()
        self._self_a = flat[na * nb : na * nb + na].clone()
        self._self_b = flat[na * nb + na : na * nb + na + nb].clone()
        self._batches = round(float(flat[-1]))

    @staticmethod
    def _check_finite(grams: torch.Tensor, model: str) -> None:
        bad = torch.nonzero(~torch.isfinite(grams).flatten(1).all(1)).flatten().tolist()
        if bad:
            raise MergeError(f"Non-finite features (NaN/inf) from model {model} blocks {bad} in this batch.")
