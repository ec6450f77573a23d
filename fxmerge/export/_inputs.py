"""Example inputs: parse the user's convention, find the batch dimension, draw fresh random inputs.

Accepted conventions (the same as :mod:`fxmerge.testing.zoo` uses for Hugging Face models):

* a tensor ``x``, called as ``model(x)``;
* a tuple of tensors ``(x, y)``, called as ``model(x, y)``;
* a tuple whose last element is a dict ``(x, {"mask": m})``, called as ``model(x, mask=m)``;
* a bare dict ``{"input_ids": ids}``, called as ``model(input_ids=ids)``.

Non-tensor values (``None``, bools, numbers, strings) are kept as constants baked into the export.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fxmerge.errors import ExportError

_CONSTANT_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Slot:
    """One argument of the call: a flat tensor input (by index) or a constant baked into the export."""

    tensor_index: int | None
    constant: object = None

    def value(self, flat: Sequence[torch.Tensor]) -> object:
        """The argument's value when the flat tensor inputs are ``flat``."""
        return self.constant if self.tensor_index is None else flat[self.tensor_index]


@dataclass(frozen=True)
class ExampleInputs:
    """Example inputs split into a call template and the flat list of tensors it consumes."""

    args: tuple[Slot, ...]
    kwargs: tuple[tuple[str, Slot], ...]
    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...]

    def rebuild(self, flat: Sequence[torch.Tensor]) -> tuple[tuple[object, ...], dict[str, object]]:
        """Positional and keyword arguments for ``model(*args, **kwargs)`` built from ``flat``."""
        args = tuple(slot.value(flat) for slot in self.args)
        kwargs = {name: slot.value(flat) for name, slot in self.kwargs}
        return args, kwargs

    def batch_size(self) -> int | None:
        """Size of dim 0 of the first tensor that has a dim 0, or None when every tensor is a scalar."""
        for tensor in self.tensors:
            if tensor.dim() >= 1:
                return int(tensor.shape[0])
        return None

    def batch_flags(self) -> tuple[bool, ...]:
        """For each flat tensor: whether its dim 0 is the batch dimension (same size as the batch)."""
        batch = self.batch_size()
        return tuple(t.dim() >= 1 and int(t.shape[0]) == batch for t in self.tensors)


def parse_example_inputs(model: nn.Module, example_inputs: object) -> ExampleInputs:
    """Split ``example_inputs`` (tensor, tuple, tuple ending in a dict, or dict) into an :class:`ExampleInputs`."""
    positional, keywords = _split(example_inputs)
    tensors: list[torch.Tensor] = []
    raw_names: list[str] = []
    param_names = _positional_names(model, len(positional))
    args = tuple(
        _slot(value, f"positional input {i}", tensors, raw_names, param_names[i])
        for i, value in enumerate(positional)
    )
    kwargs = tuple(
        (key, _slot(value, f"keyword input {key!r}", tensors, raw_names, key)) for key, value in keywords
    )
    if not tensors:
        raise ExportError(
            "example_inputs contain no tensor: pass at least one torch.Tensor "
            "(a tensor, a tuple of tensors, or a tuple ending in a dict of keyword tensors)."
        )
    return ExampleInputs(
        args=args, kwargs=kwargs, tensors=tuple(tensors), names=tuple(unique_names(raw_names))
    )


def eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the CPU in eval mode; the caller's model is never touched."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ExportError(
            f"{type(model).__name__} has tensors on the meta device (no data): load its weights before exporting."
        )
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:
        raise ExportError(
            f"could not deep-copy {type(model).__name__} ({type(exc).__name__}: {exc}). fxmerge exports a copy "
            "so that your model is never changed: make the model deep-copyable (e.g. remove open handles or "
            "generators stored on it) and try again."
        ) from exc
    return clone.to("cpu").eval()


def other_batch_size(batch: int) -> int:
    """A batch size different from ``batch`` (and from 1) used for the dynamic-batch check."""
    return batch + 1 if batch >= 2 else 3


def random_inputs(
    inputs: ExampleInputs, batch: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Fresh random tensors like the examples: same dtype and value range, dim 0 resized to ``batch``.

    Floating tensors are drawn uniformly in ``[min, max]`` of the example's finite values, integer and bool
    tensors uniformly among the integers in ``[min, max]`` (token ids stay within the observed range).
    Tensors without a batch dimension keep their shape.
    """
    flags = inputs.batch_flags()
    out = []
    for tensor, is_batched in zip(inputs.tensors, flags, strict=True):
        shape = list(tensor.shape)
        if is_batched and batch is not None:
            shape[0] = batch
        out.append(_random_in_range(tensor, tuple(shape), generator))
    return tuple(out)


def unique_names(names: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    """``names`` with ``_1``, ``_2`` ... appended where a name repeats or is already in ``taken``."""
    used = set(taken)
    result = []
    for name in names:
        candidate, k = name, 1
        while candidate in used:
            candidate, k = f"{name}_{k}", k + 1
        used.add(candidate)
        result.append(candidate)
    return result


def _split(example_inputs: object) -> tuple[tuple[object, ...], tuple[tuple[str, object], ...]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), ()
    if isinstance(example_inputs, Mapping):
        return (), _keyword_items(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        items = tuple(example_inputs)
        if items and isinstance(items[-1], Mapping):
            return items[:-1], _keyword_items(items[-1])
        return items, ()
    raise ExportError(
        f"example_inputs must be a tensor, a tuple of tensors or a tuple ending in a dict of keyword tensors; "
        f"got {type(example_inputs).__name__}."
    )


def _keyword_items(mapping: Mapping) -> tuple[tuple[str, object], ...]:
    for key in mapping:
        if not isinstance(key, str):
            raise ExportError(f"keyword inputs must be named by strings; got key {key!r} in example_inputs.")
    return tuple(mapping.items())


def _slot(value: object, where: str, tensors: list[torch.Tensor], names: list[str], name: str) -> Slot:
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ExportError(f"{where} is a complex tensor; ONNX export needs real-valued inputs.")
        tensors.append(value.detach().to("cpu"))
        names.append(name)
        return Slot(tensor_index=len(tensors) - 1)
    if isinstance(value, _CONSTANT_TYPES):
        return Slot(tensor_index=None, constant=value)
    raise ExportError(
        f"{where} is a {type(value).__name__}; only tensors and constants (None, bool, int, float, str) are "
        "supported. Pass nested containers as separate tensors."
    )


def _positional_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    fixed = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    names = []
    for i in range(count):
        if i < len(fixed):
            names.append(fixed[i])
        elif var is not None:
            names.append(f"{var}_{i - len(fixed)}")
        else:
            names.append(f"input_{i}")
    return names


def _random_in_range(
    example: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    if example.numel() == 0:
        return torch.zeros(shape, dtype=example.dtype)
    if example.is_floating_point():
        finite = example[torch.isfinite(example)].to(torch.float64)
        low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
        uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
        return (low + (high - low) * uniform).to(example.dtype)
    values = example.to(torch.int64)
    low, high = int(values.min()), int(values.max())
    drawn = torch.randint(low, high + 1, shape, generator=generator, dtype=torch.int64)
    return drawn.to(example.dtype)
