"""State-dict helpers: shared (tied) tensors, strict compatibility checks and re-tying after a load."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from fxmerge.errors import ExportInputError

_MAX_LISTED = 8


def split_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One CPU tensor per distinct view plus ``{alias: canonical}`` for names that are the very same view.

    Tensors that only partly overlap (different views of one storage) are saved as independent copies,
    because safetensors refuses shared memory and the overlap cannot be described by a plain alias.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    canonical: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = view_key(tensor)
        if key is not None and key in canonical:
            aliases[name] = canonical[key]
            continue
        if key is not None:
            canonical[key] = name
        tensors[name] = tensor.detach()
    by_storage: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in tensors.items():
        if tensor.numel():
            by_storage[(tensor.device, tensor.untyped_storage().data_ptr())].append(name)
    overlapping = {name for names in by_storage.values() if len(names) > 1 for name in names}
    out = {
        name: (tensor.clone() if name in overlapping or not tensor.numel() else tensor).to("cpu").contiguous()
        for name, tensor in tensors.items()
    }
    return out, aliases


def view_key(tensor: torch.Tensor) -> tuple | None:
    """Identity of the memory a tensor views (None for empty tensors, which share nothing)."""
    if not tensor.numel():
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise an ExportError (model untouched) unless ``state`` matches ``model``'s keys, shapes and dtypes."""
    expected = model.state_dict()
    cls = type(model).__name__
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ExportInputError(
            f"{source} does not match {cls}: missing keys {_listing(missing)}; unexpected keys "
            f"{_listing(unexpected)}. Load into the architecture the file was saved from."
        )
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise ExportInputError(f"{source} does not match {cls}: shape mismatches {_listing(shapes)}.")
    dtypes = [
        f"{k}: file {state[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if state[k].dtype != v.dtype
    ]
    if dtypes:
        raise ExportInputError(
            f"{source} does not match {cls}: dtype mismatches {_listing(dtypes)}. Convert the model first, "
            "e.g. model.to(torch.float16)."
        )
    _check_model_ties(expected, state, source, cls)


def match_float_dtype(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Convert a freshly built model to the file's floating dtype when the file uses a single one."""
    saved = {t.dtype for t in state.values() if t.is_floating_point()}
    current = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if len(saved) == 1 and current and current != saved:
        return model.to(next(iter(saved)))
    return model


def retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make every alias the same Parameter/buffer object as its canonical tensor, as it was when saved."""
    for alias, canonical in aliases.items():
        try:
            alias_owner, alias_attr = _owner(model, alias)
            canon_owner, canon_attr = _owner(model, canonical)
        except AttributeError:
            continue
        value = getattr(canon_owner, canon_attr)
        if getattr(alias_owner, alias_attr) is value:
            continue
        if alias_attr in alias_owner._parameters and canon_attr in canon_owner._parameters:
            alias_owner._parameters[alias_attr] = value
        elif alias_attr in alias_owner._buffers and canon_attr in canon_owner._buffers:
            alias_owner._buffers[alias_attr] = value


def _check_model_ties(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str, cls: str
) -> None:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in expected.items():
        key = view_key(tensor)
        if key is not None:
            groups[key].append(name)
    for names in groups.values():
        first = names[0]
        differing = [n for n in names[1:] if not torch.equal(state[n], state[first])]
        if differing:
            raise ExportInputError(
                f"{cls} ties {first!r} to {_listing(differing)}, but {source} holds different values for them; "
                "loading would keep only one. Load into a model built without this weight tying."
            )


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    owner = model.get_submodule(prefix) if prefix else model
    if attr not in owner._parameters and attr not in owner._buffers:
        raise AttributeError(name)
    return owner, attr


def _listing(items: list[str]) -> str:
    if not items:
        return "none"
    shown = ", ".join(repr(i) if ":" not in i else i for i in items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
