"""Normalising user data into model call arguments."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from fxmerge.errors import MergeError

__all__ = ["MAX_ROWS", "batch_inputs", "feature_rows", "iter_inputs", "model_device", "to_device"]


def batch_inputs(batch: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for ``model(*args, **kwargs)`` from one batch.

    A tensor is the input; a tuple/list holds the input first (e.g. ``(images, labels)``, the rest is
    ignored); a dict (string keys) holds keyword inputs (e.g. ``{"input_ids": …, "attention_mask": …}``).
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise MergeError(
                "a data batch is an empty tuple/list; a tuple/list batch must hold the input first."
            )
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        if not all(isinstance(k, str) for k in batch):
            raise MergeError(
                f"a dict batch must have string keys (keyword inputs), got keys {list(batch)!r}."
            )
        return (), dict(batch)
    raise MergeError(
        f"cannot use a batch of type {type(batch).__name__} as model input; give a tensor, a tuple/list whose "
        "first item is the input, or a dict of keyword inputs (or pass input_fn to convert batches)."
    )


def iter_inputs(data: Any) -> Iterator[tuple[tuple, dict]]:
    """Yield (args, kwargs) for every batch of ``data``.

    ``data`` is an iterable of batches (a DataLoader, a list of tensors, …), each in one of the forms
    accepted by :func:`batch_inputs`. A single tensor or a single dict is treated as one batch.
    Raises :class:`~fxmerge.errors.MergeError` for anything else.
    """
    if isinstance(data, (Tensor, Mapping)):
        yield batch_inputs(data)
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise MergeError(
            f"data must be an iterable of batches (e.g. a DataLoader or a list of tensors), got {type(data).__name__}."
        )
    for batch in data:
        yield batch_inputs(batch)


MAX_ROWS = 8192  # samples per activation and batch fed to the statistics (random subset beyond)


def feature_rows(t: torch.Tensor, axes: tuple, gen: torch.Generator, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """``t`` as a [samples, units] matrix: ``axes`` (jointly) are the units, every other axis a sample (batch,
    tokens, pixels); at most ``max_rows`` samples, drawn with ``gen``. float64 stays float64, every other dtype
    becomes float32 (the statistics are accumulated in the models' precision)."""
    units = 1
    for a in axes:
        units *= t.shape[a]
    f = t.detach().movedim(tuple(axes), tuple(range(t.ndim - len(axes), t.ndim))).reshape(-1, units)
    if f.shape[0] > max_rows:
        f = f[torch.randperm(f.shape[0], generator=gen)[:max_rows].to(f.device)]
    return f.to(torch.float64 if f.dtype == torch.float64 else torch.float32)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter, else first buffer (CPU for a model without tensors)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
