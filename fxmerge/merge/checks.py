"""Argument checks every merge entry point shares (same-architecture and depth/width merges)."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from fxmerge.errors import MergeError, MergeInputError
from fxmerge.merge.methods import method_name

__all__ = ["check_models_and_method", "check_tensors", "nonfinite_hint"]


def check_models_and_method(models: Any, method: Any, data: Any) -> None:
    """The checks every merge entry point shares: N >= 2 modules, data where the method needs it."""
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise MergeError("merge needs a list of at least 2 models")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise MergeError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    if getattr(method, "needs_data", False) and data is None:
        raise MergeError(f"method {method_name(method)!r} needs data (any iterable of input batches) for "
                         "activation statistics")  # fmt: skip


@contextlib.contextmanager
def nonfinite_hint():
    """The statistics' NaN error suggests an option of theirs that ``merge`` does not take: say what to fix."""
    try:
        yield
    except MergeError as e:
        if "nonfinite=" not in str(e):
            raise
        raise MergeError("activation features contain NaN or inf: check the data for NaN/inf values and that the "
                         "models produce finite outputs on it") from e  # fmt: skip


def check_tensors(models) -> None:
    """Every model holds data (no meta tensors) in one floating dtype."""
    dtypes = []
    for i, m in enumerate(models):
        tensors = [*m.parameters(), *m.buffers()]
        if any(t.is_meta for t in tensors):
            raise MergeInputError(
                f"models[{i}] has tensors on the meta device (no data): load its weights first"
            )
        dtypes.append(sorted({str(t.dtype) for t in tensors if t.is_floating_point()}))
    if any(d != dtypes[0] for d in dtypes):
        found = ", ".join(f"models[{i}]: {'/'.join(d) or 'none'}" for i, d in enumerate(dtypes))
        raise MergeInputError(f"the models have different floating dtypes ({found}); convert them to one dtype "
                              "first, e.g. model.float()")  # fmt: skip
