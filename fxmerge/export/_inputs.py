"""Example inputs: parse the user's convention, find the batch dimension, draw fresh random inputs.

Accepted conventions (the same as :mod:`fxmerge.testing.zoo` uses for Hugging Face models):

* a tensor ``x``, called as ``model(x)``;
* a tuple of tensors ``(x, y)``, called as ``model(x, y)``;
* a tuple whose last element is a dict ``(x, {"mask": m})``, called as ``model(x, mask=m)``;
* a bare dict ``{"input_ids": ids}``, called as ``model(input_ids=ids)``.

Non-tensor values (``None``, bools, numbers, strings) are kept as constants baked into the export.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fxmerge.clone import clone_module
from fxmerge.errors import ExportError, ExportInputError, FxmergeError
from fxmerge.outputs import name as option_name

_CONSTANT_TYPES = (type(None), bool, int, float, str)
# input transforms that take a traced graph's other branches: value-dependent control flow usually tests a
# sign, a magnitude or an emptiness, which these flip
_BRANCH_TRANSFORMS = (("sign-flipped", -1.0), ("scaled x10", 10.0), ("scaled x0.1", 0.1), ("all-zero", 0.0))


@dataclass(frozen=True)
class Case:
    """One set of inputs the exported file is checked on."""

    label: str
    tensors: tuple[torch.Tensor, ...]
    batch_size: int | None


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


def parse_example_inputs(model: nn.Module, example_inputs: object, what: str = "example_inputs") -> ExampleInputs:
    """Split ``example_inputs`` (tensor, tuple, tuple ending in a dict, or dict) into an :class:`ExampleInputs`."""
    positional, keywords = _split(example_inputs, what)
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
        raise ExportInputError(
            f"{what} contain no tensor: pass at least one torch.Tensor "
            "(a tensor, a tuple of tensors, or a tuple ending in a dict of keyword tensors)."
        )
    return ExampleInputs(
        args=args, kwargs=kwargs, tensors=tuple(tensors), names=tuple(unique_names(raw_names))
    )


def eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the CPU in eval mode; the caller's model is never touched."""
    if not isinstance(model, nn.Module):
        raise ExportInputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ExportInputError(
            f"{type(model).__name__} has tensors on the meta device (no data): load its weights before exporting."
        )
    try:
        clone = clone_module(model)
    except Exception as exc:
        raise ExportInputError(
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


def _split(example_inputs: object, what: str) -> tuple[tuple[object, ...], tuple[tuple[str, object], ...]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), ()
    if isinstance(example_inputs, Mapping):
        return (), _keyword_items(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        items = tuple(example_inputs)
        if items and isinstance(items[-1], Mapping):
            return items[:-1], _keyword_items(items[-1])
        return items, ()
    raise ExportInputError(
        f"{what} must be a tensor, a tuple of tensors or a tuple ending in a dict of keyword tensors; "
        f"got {type(example_inputs).__name__}."
    )


def _keyword_items(mapping: Mapping) -> tuple[tuple[str, object], ...]:
    for key in mapping:
        if not isinstance(key, str):
            raise ExportInputError(f"keyword inputs must be named by strings; got key {key!r}.")
    return tuple(mapping.items())


def _slot(value: object, where: str, tensors: list[torch.Tensor], names: list[str], name: str) -> Slot:
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ExportInputError(f"{where} is a complex tensor; ONNX export needs real-valued inputs.")
        tensors.append(value.detach().to("cpu"))
        names.append(name)
        return Slot(tensor_index=len(tensors) - 1)
    if isinstance(value, _CONSTANT_TYPES):
        return Slot(tensor_index=None, constant=value)
    raise ExportInputError(
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


def branch_cases(inputs: ExampleInputs, other_batch: int | None) -> list[Case]:
    """The example inputs with every floating tensor sign-flipped, scaled up, scaled down and zeroed (plus the
    sign flip at ``other_batch`` rows): inputs that take a traced graph off the branch the examples took.
    Integer inputs (token ids, indices) are kept; no case is made when no input is floating."""
    if not any(t.is_floating_point() for t in inputs.tensors):
        return []
    batch = inputs.batch_size()
    cases = [Case(f"{label} example inputs", _transform(inputs.tensors, k), batch) for label, k in _BRANCH_TRANSFORMS]
    if other_batch is not None and other_batch != batch:
        resized = resize_batch(inputs, other_batch)
        cases.append(Case("sign-flipped example inputs", _transform(resized, -1.0), other_batch))
    return cases


def _transform(tensors: tuple[torch.Tensor, ...], factor: float) -> tuple[torch.Tensor, ...]:
    return tuple(t * factor if t.is_floating_point() else t for t in tensors)


def resize_batch(inputs: ExampleInputs, batch: int) -> tuple[torch.Tensor, ...]:
    """The example tensors with dim 0 of the batched ones cycled to ``batch`` rows (values kept, rows repeated)."""
    out = []
    for tensor, flag in zip(inputs.tensors, inputs.batch_flags(), strict=True):
        index = torch.arange(batch) % tensor.shape[0] if flag and tensor.shape[0] else None
        out.append(tensor[index] if index is not None else tensor)
    return tuple(out)


def data_cases(model: nn.Module, data: Iterable[object] | None, inputs: ExampleInputs, dynamic_batch: bool,
               limit: int) -> list[Case]:  # fmt: skip
    """Up to ``limit`` batches of the user's ``check_data``, each matched to the example inputs' structure.

    A batch is given like the example inputs (a tensor, a tuple, a tuple ending in a dict of keyword tensors),
    or as a tuple/list whose first item is that (``(inputs, labels)`` from a DataLoader).
    """
    if data is None:
        return []
    what = option_name("check_data")
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise ExportInputError(f"{what} must be an iterable of input batches (a list, a DataLoader); got "
                               f"{type(data).__name__}.")  # fmt: skip
    try:
        batches = list(itertools.islice(iter(data), limit))
    except FxmergeError:
        raise
    except Exception as exc:
        raise ExportInputError(f"iterating {what} raised {type(exc).__name__}: {exc}") from exc
    if not batches:
        raise ExportInputError(f"{what} holds no batch.")
    return [Case(f"{what} batch #{k + 1}", *_match_batch(model, b, inputs, dynamic_batch, f"{what} batch #{k + 1}"))
            for k, b in enumerate(batches)]  # fmt: skip


def _match_batch(model: nn.Module, batch: object, inputs: ExampleInputs, dynamic_batch: bool,
                 where: str) -> tuple[tuple[torch.Tensor, ...], int | None]:  # fmt: skip
    candidates = [batch]
    if isinstance(batch, (tuple, list)) and batch:
        candidates.append(batch[0])
    for candidate in candidates:
        try:
            parsed = parse_example_inputs(model, candidate, where)
        except ExportError:
            continue
        if parsed.args == inputs.args and parsed.kwargs == inputs.kwargs and len(parsed.tensors) == len(inputs.tensors):
            _check_like(parsed.tensors, inputs, dynamic_batch, where)
            return parsed.tensors, parsed.batch_size()
    raise ExportInputError(
        f"{where} does not have the structure of the example inputs ({len(inputs.tensors)} tensor(s) "
        f"{list(inputs.names)}); give batches like the example inputs, or (inputs, labels) pairs."
    )


def _check_like(tensors: tuple[torch.Tensor, ...], inputs: ExampleInputs, dynamic_batch: bool, where: str) -> None:
    flags = inputs.batch_flags()
    for tensor, example, flag, label in zip(tensors, inputs.tensors, flags, inputs.names, strict=True):
        free = 1 if flag and dynamic_batch else 0
        if tensor.dtype != example.dtype or tuple(tensor.shape[free:]) != tuple(example.shape[free:]):
            fixed = "" if free else f" (the batch size is fixed: {option_name('dynamic_batch=False')})"
            raise ExportInputError(
                f"{where}: input {label!r} is {tensor.dtype} {tuple(tensor.shape)} but the example is "
                f"{example.dtype} {tuple(example.shape)}{fixed}."
            )
