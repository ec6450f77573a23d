"""Normalisation-aware post-passes: REPAIR at normalisation layers and at any method's producer layers.

Merging two networks that normalise with GroupNorm or LayerNorm loses the per-channel statistics the parents
had after each normalisation: a GroupNorm normalises a whole group per sample, so when a group's channels
come from different (partly unmatched) parent channels the per-channel mean and spread inside the group drift,
and LayerNorm mixes every channel of the residual stream. Resetting statistics (what fixes BatchNorm) does not
exist for them. The passes here restore the parents' statistics by rescaling affine parameters:

* ``norm_repair`` -- for every affine GroupNorm / LayerNorm / BatchNorm, per output channel ``c``:
  ``y_c <- s*_c / s_c * (y_c - m_c) + m*_c`` folded into the norm's weight and bias, where ``m_c, s_c`` are
  the merged model's output mean/std on the data and ``m*_c, s*_c`` the parents' output statistics merged
  unit for unit exactly as their weights were (:meth:`PostContext.merge_units`), so it works after zipping too.
* ``unit_repair`` -- the same at the outputs of every Linear/Conv whose output units were matched (REPAIR of
  Jordan et al. 2022), again with targets merged like the weights, so zip methods can use it as well.

Both fix one module at a time in the order the modules run, re-measuring after each fix (one data pass per
module), so every module's statistics match their targets exactly even though the modules feed each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fxmerge.clone import clone_module
from fxmerge.errors import MergeError
from fxmerge.passes.bn import output_moments
from fxmerge.passes.registry import PostContext, register_post_pass
from fxmerge.stats.moments import ChannelMoments

__all__ = ["NORM_TYPES", "module_moments", "norm_modules", "norm_repair", "rescale_outputs", "unit_repair"]

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _channel_dim(mod: nn.Module) -> int:
    return -1 if isinstance(mod, (nn.LayerNorm, nn.Linear)) else 1


def _affine(mod: nn.Module) -> bool:
    if isinstance(mod, nn.LayerNorm):
        return mod.weight is not None and mod.bias is not None and len(mod.normalized_shape) == 1
    if isinstance(mod, nn.GroupNorm):
        return mod.affine
    return isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine


def norm_modules(model: nn.Module) -> list[str]:
    """Names of the normalisation modules ``norm_repair`` can rescale: affine GroupNorm, BatchNorm and
    LayerNorm over one (channel) dimension."""
    return [name for name, m in model.named_modules() if isinstance(m, NORM_TYPES) and _affine(m)]


def module_moments(
    model: nn.Module, names: Sequence[str], data: Any, run: dict[str, Any], label: str = "model"
) -> tuple[dict[str, ChannelMoments], list[str]]:
    """Per-channel output moments of the modules ``names`` of ``model`` (eval mode) on ``data`` and the order
    they first ran in. The channel axis is the last one for Linear/LayerNorm outputs, axis 1 otherwise."""
    mods = {name: model.get_submodule(name) for name in names}
    dims = {name: _channel_dim(mod) for name, mod in mods.items()}
    moments, order = output_moments(model, mods, dims, data, run, f"statistics ({label})")
    missing = [n for n in names if n not in order]
    if missing:
        raise MergeError(f"module(s) {missing} of {label} never ran on the data")
    return moments, order


def _fold(mod: nn.Module, mean: Tensor, std: Tensor, mean_t: Tensor, std_t: Tensor, eps: float) -> None:
    """Make ``mod``'s output per channel ``std_t/std * (y - mean) + mean_t`` by rescaling weight and bias."""
    if mean.numel() != mean_t.numel():
        raise MergeError(f"{mean.numel()} channels in the merged model but {mean_t.numel()} targets")
    mean_t, std_t = mean_t.to(mean), std_t.to(mean)
    scale = torch.where(std > eps, std_t / std.clamp_min(eps), torch.ones_like(std))
    w = mod.weight
    bias = mod.bias.detach().double() if mod.bias is not None else torch.zeros_like(mean)
    new_bias = scale * (bias - mean) + mean_t
    with torch.no_grad():
        w.mul_(scale.to(w).view((-1,) + (1,) * (w.dim() - 1)))
        if mod.bias is None:
            mod.bias = nn.Parameter(new_bias.to(w))
        else:
            mod.bias.copy_(new_bias.to(mod.bias))


def rescale_outputs(
    model: nn.Module,
    targets: dict[str, tuple[Tensor, Tensor]],
    data: Any,
    *,
    sequential: bool = True,
    num_batches: int | None = None,
    progress: bool = True,
    eps: float = 1e-8,
) -> nn.Module:
    """A copy of ``model`` whose modules ``targets`` (name -> (mean, std) per output channel) have those
    output statistics on ``data``, by rescaling each module's weight and bias per output channel.

    The modules are affine normalisations or Linear/Conv layers (output channel = weight axis 0). With
    ``sequential`` they are fixed one at a time in the order they run, re-measuring after each fix, so
    each matches its target exactly; otherwise all are measured once and fixed together.
    """
    new = clone_module(model)
    run = {"num_batches": num_batches, "progress": progress}
    for name in targets:
        mod = new.get_submodule(name)
        if not (isinstance(mod, _PRODUCERS) or (isinstance(mod, NORM_TYPES) and _affine(mod))):
            raise MergeError(f"{name!r} is a {type(mod).__name__}; only affine norms and Linear/Conv rescale")
    remaining = list(targets)
    while remaining:
        moments, order = module_moments(new, remaining, data, run, "the merged model")
        fix = order[:1] if sequential else order
        for name in fix:
            mom = moments[name]
            _fold(new.get_submodule(name), mom.mean(), mom.std(), *targets[name], eps)
        remaining = [n for n in remaining if n not in fix]
    return new


def _merged_targets(ctx: PostContext, names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """The parents' per-channel output statistics of ``names``, merged unit for unit like their weights."""
    means, stds = [], []
    for i, parent in enumerate(ctx.models):
        moments, _ = module_moments(parent, names, ctx.data, ctx.run, f"parent {i}")
        means.append({f"{n}.weight": moments[n].mean() for n in names})
        stds.append({f"{n}.weight": moments[n].std() for n in names})
    mean_t, std_t = ctx.merge_units(means), ctx.merge_units(stds)
    return {n: (mean_t[f"{n}.weight"].flatten(), std_t[f"{n}.weight"].flatten()) for n in names}


def _check(ctx: PostContext, name: str) -> None:
    if ctx.data is None:
        raise MergeError(f"post-pass {name!r} needs data to measure the parents' statistics")


@register_post_pass("norm_repair")
def norm_repair(
    model: nn.Module, ctx: PostContext, *, sequential: bool = True, eps: float = 1e-8
) -> tuple[nn.Module, dict[str, Any]]:
    """REPAIR at every affine GroupNorm / LayerNorm / BatchNorm output (targets: the parents' per-channel
    output statistics merged like the weights). Reports the rescaled modules."""
    _check(ctx, "norm_repair")
    names = norm_modules(model)
    if not names:
        return clone_module(model), {"modules": []}
    targets = _merged_targets(ctx, names)
    new = rescale_outputs(model, targets, ctx.data, sequential=sequential, eps=eps, **ctx.run)
    return new, {"modules": names}


def producer_modules(model: nn.Module, spec: Any, spaces: dict) -> list[str]:
    """Linear/Conv modules whose weight's output axis 0 is a merge space and that contract an input axis."""
    if spec is None:
        return [name for name, m in model.named_modules() if isinstance(m, _PRODUCERS)]
    out = []
    for name, mod in model.named_modules():
        lays = spec.axes.get(f"{name}.weight")
        roles = spec.roles.get(f"{name}.weight", [])
        if lays and len(lays) >= 2 and lays[0] in spaces and "in" in roles[1:] and isinstance(mod, _PRODUCERS):
            out.append(name)
    return out


@register_post_pass("unit_repair")
def unit_repair(
    model: nn.Module, ctx: PostContext, *, sequential: bool = True, eps: float = 1e-8
) -> tuple[nn.Module, dict[str, Any]]:
    """REPAIR at every Linear/Conv whose output units were matched, for any method (zipping included):
    targets are the parents' per-unit output statistics merged like the weights."""
    _check(ctx, "unit_repair")
    names = producer_modules(model, ctx.spec, ctx.spaces)
    if not names:
        return clone_module(model), {"modules": []}
    targets = _merged_targets(ctx, names)
    new = rescale_outputs(model, targets, ctx.data, sequential=sequential, eps=eps, **ctx.run)
    return new, {"modules": names}
