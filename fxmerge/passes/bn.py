"""Data-dependent repairs applied after merging: BatchNorm statistics reset and REPAIR rescaling.

* :func:`reset_bn_stats` recomputes every BatchNorm's running statistics on data, as MuDSC/ZipIt do
  after merging (``/work/shared/reference/mudsc.md`` §8).
* :func:`repair` is REPAIR (Jordan et al., 2022) for models without BatchNorm: the outputs of chosen
  Linear/Conv modules are rescaled per unit so that their mean and standard deviation match the
  (weighted) average of the same units' statistics in the reference models.

Both return a new model and never modify their inputs (training flags are restored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fxmerge.clone import clone_module
from fxmerge.errors import MergeError
from fxmerge.stats.batches import iter_inputs, model_device, to_device
from fxmerge.stats.moments import ChannelMoments

__all__ = ["repair", "reset_bn_stats", "run_batches"]

InputFn = Callable[[Any], tuple[tuple, dict]]
_PROBE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _inputs(data: Any, input_fn: InputFn | None) -> Iterator[tuple[tuple, dict]]:
    if input_fn is None:
        yield from iter_inputs(data)
        return
    for batch in [data] if isinstance(data, (Tensor, Mapping)) else data:
        out = input_fn(batch)
        if not (
            isinstance(out, tuple)
            and len(out) == 2
            and isinstance(out[0], tuple)
            and isinstance(out[1], dict)
        ):
            raise MergeError("input_fn must return (args: tuple, kwargs: dict) for model(*args, **kwargs).")
        yield out


def run_batches(
    model: nn.Module,
    data: Any,
    *,
    num_batches: int | None = None,
    progress: bool = True,
    input_fn: InputFn | None = None,
    desc: str = "batches",
) -> int:
    """Call ``model`` under ``torch.no_grad()`` on the batches of ``data``; return the number of batches.

    Batches are normalised by :func:`~fxmerge.stats.iter_inputs` (or by ``input_fn(batch) -> (args,
    kwargs)``) and moved to the model's device. At most ``num_batches`` batches are used.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise MergeError(f"num_batches must be None or an int >= 1, got {num_batches!r}.")
    device = model_device(model)
    total = num_batches
    if total is None and hasattr(data, "__len__"):
        total = 1 if isinstance(data, (Tensor, Mapping)) else len(data)
    done = 0
    with torch.no_grad(), tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for args, kwargs in _inputs(data, input_fn):
            if num_batches is not None and done >= num_batches:
                break
            try:
                model(*to_device(args, device), **to_device(kwargs, device))
            except Exception as e:  # a batch that does not fit the model: say so, not deep inside torch
                raise MergeError(
                    f"{desc}: data batch {done} does not fit the model: {type(e).__name__}: {str(e)[:200]}"
                ) from e
            done += 1
            bar.update(1)
    if done == 0:
        raise MergeError("data produced no batches; pass a non-empty iterable of input batches.")
    return done


def _train_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore(flags: dict[nn.Module, bool]) -> None:
    for m, flag in flags.items():
        m.training = flag


def reset_bn_stats(
    model: nn.Module,
    data: Any,
    *,
    num_batches: int | None = None,
    progress: bool = True,
    input_fn: InputFn | None = None,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are recomputed on ``data``.

    Every ``BatchNorm*`` module that tracks running stats is reset and switched to momentum=None
    (cumulative average), then one pass runs in train mode under ``torch.no_grad()``: running_mean
    becomes the average of the batch means and running_var the average of the unbiased batch
    variances. Afterwards every module's train/eval flag and every BatchNorm's momentum are restored.
    A model without BatchNorm is returned as an unchanged copy without touching the data.
    """
    new = clone_module(model)
    bns = [
        m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return new
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    flags = _train_flags(new)
    new.train()
    try:
        run_batches(new, data, num_batches=num_batches, progress=progress, input_fn=input_fn, desc="BN reset")
    finally:
        _restore(flags)
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
    return new


def _probe_modules(model: nn.Module, probes: Sequence[str], label: str) -> dict[str, nn.Module]:
    out = {}
    for name in probes:
        try:
            mod = model.get_submodule(name)
        except AttributeError as exc:
            raise MergeError(
                f"{label} has no submodule {name!r} (probe names are module names, e.g. 'layers.0')."
            ) from exc
        if not isinstance(mod, _PROBE_TYPES):
            raise MergeError(
                f"probe {name!r} in {label} is a {type(mod).__name__}; REPAIR probes must be Linear or Conv1d/2d/3d."
            )
        out[name] = mod
    return out


def output_moments(
    model: nn.Module, mods: Mapping[str, nn.Module], dims: Mapping[str, int], data: Any, run: dict[str, Any],
    desc: str,
) -> tuple[dict[str, ChannelMoments], list[str]]:  # fmt: skip
    """Per-channel output moments of the modules ``mods`` of ``model`` (eval mode; channel axis ``dims[name]``)
    on ``data``, and the order they first ran in (modules that never ran are absent from it)."""
    moments = {name: ChannelMoments(dims[name]) for name in mods}
    order: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(_mod: nn.Module, _inp: Any, out: Tensor) -> None:
            if name not in order:
                order.append(name)
            moments[name].update(out)

        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in mods.items()]
    flags = _train_flags(model)
    model.eval()
    try:
        run_batches(model, data, desc=desc, **run)
    finally:
        _restore(flags)
        for h in handles:
            h.remove()
    return moments, order


def _collect(
    model: nn.Module, probes: Sequence[str], data: Any, run: dict[str, Any], label: str
) -> tuple[dict[str, ChannelMoments], list[str]]:
    """Per-unit output moments of every probe of ``model`` (eval mode) and the order the probes fired in."""
    mods = _probe_modules(model, probes, label)
    dims = {name: -1 if isinstance(mod, nn.Linear) else 1 for name, mod in mods.items()}
    moments, order = output_moments(model, mods, dims, data, run, f"REPAIR stats ({label})")
    missing = [p for p in probes if p not in order]
    if missing:
        raise MergeError(f"probe(s) {missing} of {label} never ran on the data; check the module names.")
    return moments, order


def _rescale(mod: nn.Module, stats: ChannelMoments, mean_t: Tensor, std_t: Tensor, eps: float) -> None:
    """y' = s·(y − μ) + μ* with s = σ*/σ per output unit, folded into weight and bias."""
    mean, std = stats.mean(), stats.std()
    mean_t, std_t = mean_t.to(mean.device), std_t.to(mean.device)
    if mean.numel() != mean_t.numel():
        raise MergeError(
            f"a probe has {mean.numel()} units in the merged model but {mean_t.numel()} in the references."
        )
    scale = torch.where(std > eps, std_t / std.clamp_min(eps), torch.ones_like(std))
    w = mod.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    bias = mod.bias.detach().to(torch.float64) if mod.bias is not None else torch.zeros_like(mean)
    new_bias = scale * (bias - mean) + mean_t
    with torch.no_grad():
        w.mul_(scale.to(w.dtype).view(shape))
        if mod.bias is None:
            mod.bias = nn.Parameter(new_bias.to(device=w.device, dtype=w.dtype))
        else:
            mod.bias.copy_(new_bias.to(mod.bias.dtype))


def _targets(
    references: Sequence[nn.Module],
    probes: Sequence[str],
    data: Any,
    run: dict[str, Any],
    weights: Sequence[float] | None,
) -> dict[str, tuple[Tensor, Tensor]]:
    if weights is None:
        weights = [1.0 / len(references)] * len(references)
    if len(weights) != len(references) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(
            f"weights must be {len(references)} non-negative numbers with a positive sum, got {list(weights)}."
        )
    total = float(sum(weights))
    targets: dict[str, tuple[Tensor, Tensor]] = {}
    for r, (ref, w) in enumerate(zip(references, weights, strict=True)):
        moments, _ = _collect(ref, probes, data, run, f"reference model {r}")
        for name, mom in moments.items():
            mean, std = targets.get(name, (0.0, 0.0))
            targets[name] = (mean + mom.mean() * (w / total), std + mom.std() * (w / total))
    return targets


def repair(
    model: nn.Module,
    reference_models: Sequence[nn.Module],
    data: Any,
    probes: Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    input_fn: InputFn | None = None,
    sequential: bool = True,
    eps: float = 1e-8,
) -> nn.Module:
    """REPAIR: a copy of ``model`` whose ``probes`` outputs have the references' interpolated statistics.

    ``probes`` are module names of Linear/Conv modules present in ``model`` and in every reference
    model with the same unit order (references must already be aligned to the merged model, e.g. the
    permuted parents). For each probe and output unit k the target is the weighted average of the
    references' statistics, μ*_k = Σ_r w_r μ_{r,k} and σ*_k = Σ_r w_r σ_{r,k} (uniform weights by
    default), with per-unit mean/std over all samples and positions in eval mode. The probe's weight
    and bias are rescaled so that its output becomes σ*_k/σ_k · (y_k − μ_k) + μ*_k; a module without
    bias gets one. Units with σ_k ≤ eps are only shifted.

    With ``sequential=True`` the probes are fixed one at a time in the order they run, re-measuring the
    merged model after each fix (one data pass per probe), so each probe matches its target exactly even
    when probes feed each other. ``sequential=False`` measures once and fixes all probes together,
    which is exact only for probes that do not feed each other.
    """
    if not probes or isinstance(probes, str):
        raise MergeError("probes must be a non-empty list of module names.")
    if len(set(probes)) != len(probes):
        raise MergeError(f"probes must be distinct module names, got {list(probes)}.")
    if not reference_models or isinstance(reference_models, nn.Module):
        raise MergeError("reference_models must be a non-empty list of models.")
    run = {"num_batches": num_batches, "progress": progress, "input_fn": input_fn}
    targets = _targets(reference_models, probes, data, run, weights)
    new = clone_module(model)
    mods = _probe_modules(new, probes, "the merged model")
    remaining = list(probes)
    while remaining:
        moments, order = _collect(new, remaining, data, run, "the merged model")
        fix = order[:1] if sequential else order
        for name in fix:
            mean_t, std_t = targets[name]
            _rescale(mods[name], moments[name], mean_t, std_t, eps)
        remaining = [p for p in remaining if p not in fix]
    return new
