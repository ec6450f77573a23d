"""A flat calling convention for export: tensors in, a tuple of tensors out.

Both exporters and the onnxruntime comparison see the same :class:`FlatModule`, so inputs and outputs are
flattened the same way on both sides: dicts (including Hugging Face ``ModelOutput``) in their item order,
dataclasses in field order, tuples and lists by index; ``None`` and other non-tensor leaves are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from fxmerge.errors import ExportInputError
from fxmerge.export._inputs import ExampleInputs

OutputPath = tuple[str | int, ...]


class FlatModule(nn.Module):
    """Calls ``model`` from flat tensor inputs and returns its tensor outputs as a flat tuple."""

    def __init__(self, model: nn.Module, inputs: ExampleInputs) -> None:
        super().__init__()
        self.model = model
        self.template = inputs

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the wrapped model and flatten its output."""
        args, kwargs = self.template.rebuild(flat)
        return tuple(tensor for _, tensor in flatten_outputs(self.model(*args, **kwargs)))


def flatten_outputs(output: object, prefix: OutputPath = ()) -> list[tuple[OutputPath, torch.Tensor]]:
    """Every tensor inside ``output`` with its path (dict keys, field names, indices), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [(prefix, output)]
    if isinstance(output, Mapping):
        items = [(str(key), value) for key, value in output.items()]
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    elif isinstance(output, tuple) and hasattr(output, "_fields"):
        items = list(zip(output._fields, output, strict=True))
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        return []
    flat: list[tuple[OutputPath, torch.Tensor]] = []
    for key, value in items:
        flat.extend(flatten_outputs(value, (*prefix, key)))
    return flat


def output_name(path: OutputPath) -> str:
    """A readable ONNX output name: ``output`` for a bare tensor, dict keys as-is, ``output_0`` for indices."""
    if not path:
        return "output"
    parts = [str(p) for p in path]
    if isinstance(path[0], int):
        parts[0] = f"output_{path[0]}"
    return ".".join(parts)


def reference_outputs(
    flat_model: FlatModule, tensors: tuple[torch.Tensor, ...]
) -> list[tuple[OutputPath, torch.Tensor]]:
    """The PyTorch outputs (with their paths) of the wrapped model on ``tensors``, computed without grad."""
    args, kwargs = flat_model.template.rebuild(tensors)
    try:
        with torch.no_grad():
            flat = flatten_outputs(flat_model.model(*args, **kwargs))
    except Exception as exc:
        raise ExportInputError(
            f"{type(flat_model.model).__name__} failed on the given inputs ({type(exc).__name__}: {exc}). "
            "Check that example_inputs match the model's forward signature."
        ) from exc
    if not flat:
        raise ExportInputError(
            f"{type(flat_model.model).__name__} returns no tensor, so there is nothing to export."
        )
    return flat
