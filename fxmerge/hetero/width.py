"""Elastic width: group sizes across models, target widths, and a model skeleton rebuilt at new widths.

Each model's spec is inferred separately; groups correspond by id when the specs have the same
structure (:func:`check_same_structure`). A group whose size differs across models is zipped to a
target width (:func:`target_widths`: the largest by default). :func:`resize_model` rebuilds a deep copy
of a model at given group widths by walking the spec's layouts: every parameter/buffer axis that
carries a resized group gets a new tensor, and the size attributes of the owning torch modules are
updated (``in_features``, ``out_channels``, ``num_features``, ``normalized_shape``, ...).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxmerge.capture.trace import eval_mode, split_inputs
from fxmerge.clone import clone_module
from fxmerge.errors import MergeError
from fxmerge.hetero.structured import structured_target, zip_structured
from fxmerge.ir.layout import Cat, G, Layout, LFixed
from fxmerge.ir.spec import PermutationSpec
from fxmerge.stats.batches import iter_inputs

__all__ = [
    "WidthTarget",
    "balance_heads",
    "check_same_structure",
    "group_sizes",
    "layout_signature",
    "resize_model",
    "resized_size",
    "structured_target",
    "target_widths",
    "zip_structured",
]

WidthTarget = str | int | Mapping[int, int]


def group_sizes(spec: PermutationSpec) -> dict[int, int]:
    """Size of every group of ``spec``, by group id."""
    return {g.id: g.size for g in spec.groups}


def layout_signature(lay: Layout) -> tuple:
    """The layout with group sizes left out: equal for the same structure at different widths."""
    if isinstance(lay, LFixed):
        return ("fixed", lay.size)
    if isinstance(lay, G):
        return ("group", lay.gid)
    if isinstance(lay, Cat):
        return ("cat", tuple(layout_signature(p) for p in lay.parts))
    return ("prod", layout_signature(lay.outer), tuple(layout_signature(i) for i in lay.inners))


def check_same_structure(ref: PermutationSpec, other: PermutationSpec, names: tuple[str, str]) -> None:
    """Raise a :class:`MergeError` naming the first difference unless the specs differ only in sizes."""
    if len(ref.groups) != len(other.groups):
        raise MergeError(f"{names[0]} has {len(ref.groups)} permutation groups and {names[1]} has "
                         f"{len(other.groups)}: the models do not have the same structure.")  # fmt: skip
    only = sorted(set(ref.axes) ^ set(other.axes))
    if only:
        raise MergeError(
            f"the models' tensors differ (e.g. {only[:4]}); they do not have the same structure."
        )
    for name, lays in ref.axes.items():
        a = [layout_signature(x) for x in lays]
        b = [layout_signature(x) for x in other.axes[name]]
        if a != b:
            raise MergeError(
                f"{name!r} has layout {ref.layout_str(name)} in {names[0]} but {other.layout_str(name)} in "
                f"{names[1]}: the group structure differs, so the groups cannot be matched across models."
            )


def resized_size(lay: Layout, widths: Mapping[int, int]) -> int:
    """Size of an axis with layout ``lay`` when every group ``g`` has ``widths[g]`` units."""
    if isinstance(lay, LFixed):
        return lay.size
    if isinstance(lay, G):
        return int(widths.get(lay.gid, lay.size))
    if isinstance(lay, Cat):
        return sum(resized_size(p, widths) for p in lay.parts)
    return resized_size(lay.outer, widths) * resized_size(lay.inners[0], widths)


def target_widths(
    sizes: Sequence[Mapping[int, int]], width: WidthTarget, absent: Sequence[set[int]] | None = None
) -> dict[int, int]:
    """Target width of every group from each model's group sizes.

    Args:
        sizes: per model, group id -> size.
        width: ``"max"`` (largest size, the paper's choice), ``"min"``, an int used for every group
            whose sizes differ (groups of equal size keep it), or a mapping group id -> width
            (unlisted groups take the largest size).
        absent: per model, groups the model does not take part in (their size is ignored).

    Raises:
        MergeError: on an unknown ``width`` or a width below 1.
    """
    absent = absent or [set() for _ in sizes]
    if isinstance(width, bool) or not isinstance(width, (str, int, Mapping)):
        raise MergeError(f"width must be 'max', 'min', an int or a dict group id -> int, got {width!r}.")
    if isinstance(width, str) and width not in ("max", "min"):
        raise MergeError(f"width must be 'max', 'min', an int or a dict group id -> int, got {width!r}.")
    out: dict[int, int] = {}
    for gid in sizes[0]:
        present = [s[gid] for m, s in enumerate(sizes) if gid not in absent[m]] or [sizes[0][gid]]
        out[gid] = _target(gid, present, width)
    return out


def _target(gid: int, present: list[int], width: WidthTarget) -> int:
    if isinstance(width, Mapping):
        k = width.get(gid, max(present))
    elif width == "max":
        k = max(present)
    elif width == "min":
        k = min(present)
    else:
        k = width if len(set(present)) > 1 else present[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MergeError(f"the target width of group g{gid} must be an int >= 1, got {k!r}.")
    if k > sum(present):
        raise MergeError(
            f"the target width {k} of group g{gid} exceeds the {sum(present)} units of all models."
        )
    return k


def _resize_tensor(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` with the overlapping corner of ``old`` copied in."""
    new = torch.zeros(shape, dtype=old.dtype, device=old.device)
    corner = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape, strict=True))
    new[corner] = old.detach()[corner]
    return new


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise MergeError(f"cannot resize {attr!r} of {type(module).__name__}: not a parameter or buffer.")


def _fix_known(module: nn.Module) -> bool:
    """Update the size attributes of standard torch modules from their tensors; False if unknown."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd):
        a, b = int(w.shape[0]), int(w.shape[1]) * module.groups
        module.in_channels, module.out_channels = (a, b) if module.transposed else (b, a)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else module.running_mean
        module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = int(w.shape[0])
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(int(s) for s in w.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = int(w.shape[0]), int(w.shape[1])
    else:
        return False
    return True


def _fix_generic(module: nn.Module, changes: dict[int, set[int]], label: str) -> None:
    """Replace int attributes equal to an old size that maps to exactly one new size."""
    mapping = {old: next(iter(new)) for old, new in changes.items() if len(new) == 1 and old not in new}
    fixed = []
    for key, value in list(vars(module).items()):
        if (
            key.startswith("_")
            or isinstance(value, bool)
            or not isinstance(value, int)
            or value not in mapping
        ):
            continue
        setattr(module, key, mapping[value])
        fixed.append(key)
    if fixed:
        warnings.warn(f"resized {label} ({type(module).__name__}): updated attributes {fixed} by value; "
                      "check the model runs as intended.", stacklevel=3)  # fmt: skip


def resize_model(
    model: nn.Module,
    spec: PermutationSpec,
    widths: Mapping[int, int],
    *,
    example_inputs: Any = None,
) -> nn.Module:
    """A deep copy of ``model`` whose groups have ``widths[gid]`` units (unlisted groups keep their size).

    Every tensor of the spec whose shape changes is replaced by zeros of the new shape with the
    overlapping corner of the old values copied in (values are meant to be overwritten, e.g. by a
    merged state dict); tied tensors stay tied. Size attributes of the owning modules are updated.

    Args:
        model: the model (left unchanged).
        spec: its permutation spec.
        widths: group id -> new size.
        example_inputs: when given, the resized model is run once to check it works.

    Raises:
        MergeError: if a tensor of the spec is missing, or the resized model fails on the example inputs
            (e.g. hard-coded sizes in ``forward``, or a structured group whose ties were broken).
    """
    for gid, k in widths.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MergeError(f"widths[{gid}] must be an int >= 1, got {k!r}.")
    new = clone_module(model)
    tensors: dict[str, torch.Tensor] = dict(new.named_parameters(remove_duplicate=False))
    tensors.update(dict(new.named_buffers(remove_duplicate=False)))
    replaced: dict[int, torch.Tensor] = {}
    changes: dict[str, dict[int, set[int]]] = {}
    for name, lays in spec.axes.items():
        old = tensors.get(name)
        if old is None:
            raise MergeError(
                f"the spec lists {name!r} but the model has no such tensor; infer the spec on this model."
            )
        shape = tuple(resized_size(lay, widths) for lay in lays)
        if shape == tuple(old.shape):
            continue
        if id(old) not in replaced:
            t = _resize_tensor(old, shape)
            replaced[id(old)] = (
                nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
            )
        module, attr = _owner(new, name)
        _set_tensor(module, attr, replaced[id(old)])
        per = changes.setdefault(name.rpartition(".")[0], {})
        for a, b in zip(old.shape, shape, strict=True):
            per.setdefault(int(a), set()).add(int(b))
    for mod_name, per in changes.items():
        module = new.get_submodule(mod_name) if mod_name else new
        if not _fix_known(module):
            _fix_generic(module, per, mod_name or "<root>")
    if example_inputs is not None:
        check_runs(new, example_inputs, "the resized model")
    return new


def check_runs(model: nn.Module, example_inputs: Any, label: str) -> Any:
    """Run ``model`` once in eval mode; raise a :class:`MergeError` naming ``label`` if it fails."""
    args, kwargs = split_inputs(example_inputs)
    try:
        with torch.no_grad(), eval_mode(model):
            return model(*args, **kwargs)
    except Exception as e:
        raise MergeError(
            f"{label} does not run on the example inputs: {type(e).__name__}: {str(e)[:300]}. Sizes hard-coded "
            "in forward() or tied sizes (heads, groups) cannot be changed by elastic width merging."
        ) from e


def _head_linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The module's weight-only map (no bias) with ``weight``; None for modules other than Linear / conv."""
    if isinstance(module, nn.Linear):
        return torch.nn.functional.linear(x, weight)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return module._conv_forward(x, weight, None)
    return None


def balance_heads(
    merged: nn.Module,
    parents: Sequence[nn.Module],
    shares: Mapping[str, Sequence[torch.Tensor]],
    data: Any,
    *,
    max_batches: int | None = None,
) -> dict[str, list[float]]:
    """Rescale every model's share of the merged heads so that each model's output survives equally, in place.

    A head weight (no grouped output axis) of the merged model is Σ_m share_m, share_m = (1/N) W_m U_m (its
    model's head reading the merged features). On ``data``, with z the merged head's input, model m's part of
    the merged output is y_m = share_m z and its parent's output (bias left out) is f_m = W_m x_m. The parent
    survives with s_m = <y_m, f_m> / <f_m, f_m> and strength g_m = s_m · rms(f_m). Models of different widths
    differ in both: a wider model's units are zipped less (more of its output survives) and its outputs are
    often larger, so the plain sum lets it dominate the merged output (measured on the digits split: 2x). The
    weight becomes Σ_m (ḡ / g_m) share_m (ḡ: the mean strength), so every model contributes ḡ f_m / rms(f_m).
    Exact copies (equal strengths) are left unchanged. Heads whose module is not a Linear / convolution, or
    where some model's output does not survive (g_m <= 0), are skipped.

    Args:
        merged: the merged model (after any BatchNorm reset); its head weights are overwritten.
        parents: the models merged, with the merged model's module names (deep model and padded twins).
        shares: head weight name -> per model, its share at the merged widths.
        data: batches (as for the merge).
        max_batches: batches used (default: all).

    Returns:
        Head weight name -> the factor ḡ / g_m of every model.
    """
    owners = {}
    for name, parts in shares.items():
        mod_name, _, attr = name.rpartition(".")
        module = merged.get_submodule(mod_name) if mod_name else merged
        if attr == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and len(parts) == len(parents):
            owners[mod_name] = name
    if not owners:
        return {}
    n = len(parents)
    dots = {o: torch.zeros(n, dtype=torch.float64) for o in owners}
    norms = {o: torch.zeros(n, dtype=torch.float64) for o in owners}
    rows = {o: 0 for o in owners}
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key: tuple[int, str]) -> Any:
        def fn(module: nn.Module, args: tuple, out: Any) -> None:
            seen[key] = args[0]
        return fn

    handles = []
    for m, model in enumerate([merged, *parents]):
        for o in owners:
            handles.append(model.get_submodule(o).register_forward_hook(hook((m, o))))
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for model in [merged, *parents]:
                stack.enter_context(eval_mode(model))
            for b, (args, kwargs) in enumerate(iter_inputs(data)):
                if max_batches is not None and b >= max_batches:
                    break
                seen.clear()
                for model in [merged, *parents]:
                    model(*args, **kwargs)
                for o, name in owners.items():
                    z = seen[(0, o)].double()
                    for m, parent in enumerate(parents):
                        mod = parent.get_submodule(o)
                        y = _head_linear(mod, z, shares[name][m].to(z))
                        f = _head_linear(mod, seen[(m + 1, o)].double(), mod.weight.double())
                        dots[o][m] += float((y * f).sum())
                        norms[o][m] += float((f * f).sum())
                    rows[o] += int(z.shape[0])
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list[float]] = {}
    for o, name in owners.items():
        if rows[o] == 0:
            continue
        strength = dots[o] / norms[o].clamp_min(1e-300) * (norms[o] / rows[o]).sqrt()
        if not bool(torch.isfinite(strength).all()) or bool((strength <= 0).any()):
            continue
        factors = strength.mean() / strength
        weight = sum(float(a) * p.double() for a, p in zip(factors, shares[name], strict=True))
        target = merged.get_submodule(o).weight
        with torch.no_grad():
            target.copy_(weight.to(target))
        out[name] = [float(a) for a in factors]
    return out
