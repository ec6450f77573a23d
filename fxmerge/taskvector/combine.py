"""Combining sparsified deltas of one tensor: weighted sum/mean with optional TIES sign election,
Model Stock, and SLERP.

Weighted combine (mergekit's convention, which equals the TIES paper at unit weights)::

    wd_t      = w_t * delta_t
    gamma     = sign(sum_t wd_t) (consensus 'sum') or sign(sum_t sign(wd_t)) ('count'); 0 -> +1
    keep_t    = sign(wd_t) == gamma            (a zero delta never agrees)
    merged    = sum_t keep_t * wd_t
    normalize : merged / sum_t keep_t * w_t    (a zero divisor becomes 1)

Without consensus ``keep_t`` is 1 wherever model t covers the position.
"""

from __future__ import annotations

import math

import torch

_DOT_THRESHOLD = 0.9995


def combine_linear(
    deltas: list[torch.Tensor],
    weights: list[float],
    consensus: str | None,
    normalize: bool,
    coverage: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Combine same-shape float32 deltas (modified in place) as in the module docstring.

    ``coverage[t]`` (bool, optional) marks where model t has a value at all (shape mismatches); it only
    matters for the divisor of a normalised combine without consensus.
    """
    for d, w in zip(deltas, weights, strict=True):
        d.mul_(w)
    if consensus is None:
        mixed = _sum(deltas)
        if not normalize:
            return mixed
        if coverage is None or all(c is None for c in coverage):
            total = sum(weights)
            return mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        divisor = torch.zeros_like(mixed)
        for c, w in zip(coverage, weights, strict=True):
            divisor.add_(c.to(mixed.dtype) if c is not None else torch.ones_like(mixed), alpha=w)
        divisor[divisor.abs() < 1e-8] = 1.0
        return mixed.div_(divisor)
    if consensus == "sum":
        majority = _sum(deltas, copy=True) >= 0
    else:
        majority = _sum([torch.sign(d) for d in deltas]) >= 0
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for d, w in zip(deltas, weights, strict=True):
        agree = torch.where(majority, d > 0, d < 0)
        mixed.add_(d * agree)
        if divisor is not None:
            divisor.add_(agree.to(divisor.dtype), alpha=w)
    if divisor is not None:
        divisor[divisor == 0] = 1.0
        mixed.div_(divisor)
    return mixed


def _sum(tensors: list[torch.Tensor], copy: bool = False) -> torch.Tensor:
    out = tensors[0].clone() if copy or len(tensors) > 1 else tensors[0]
    for t in tensors[1:]:
        out.add_(t)
    return out


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = (a * b).sum(dim=-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.zeros_like(dot))


def model_stock_delta(deltas: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: ``t * mean_t(delta_t)`` with ``t = N cos / (1 + (N - 1) cos)``.

    ``cos`` is the mean pairwise cosine between task vectors, over the whole tensor or per row
    (``filter_wise``); a zero-norm task vector counts as cosine 0.
    """
    n = len(deltas)
    shape = deltas[0].shape
    flat = [d.reshape(shape[0], -1) if filter_wise and d.dim() > 1 else d.reshape(1, -1) for d in deltas]
    cos = torch.stack([_cosines(flat[i], flat[j]) for i in range(n) for j in range(i + 1, n)]).mean(dim=0)
    denom = 1.0 + (n - 1) * cos
    t = torch.where(denom.abs() > 1e-8, n * cos / torch.where(denom.abs() > 1e-8, denom, torch.ones_like(denom)), 0.0)
    mean = _sum(flat, copy=True).div_(n)
    return (mean * t.unsqueeze(-1)).reshape(shape)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1) of the flattened tensors.

    Uses the angle between the normalised tensors and the *unnormalised* endpoints; falls back to
    linear interpolation when |cos| > 0.9995 (nearly parallel).
    """
    an = a / a.norm().clamp_min(eps)
    bn = b / b.norm().clamp_min(eps)
    dot = float((an * bn).sum().clamp(-1.0, 1.0))
    if abs(dot) > _DOT_THRESHOLD:
        return torch.lerp(a, b, t)
    omega = math.acos(dot)
    so = math.sin(omega)
    return a * (math.sin((1.0 - t) * omega) / so) + b * (math.sin(t * omega) / so)
