"""Per-tensor parameter values in mergekit's shape: scalars, layer gradients and name filters.

A value is one of

* a number: used for every tensor;
* a list of numbers (a *gradient*): piecewise-linearly interpolated at ``t = layer / (n_layers - 1)``,
  where ``layer`` is the first all-digit component of the dotted tensor name (``blocks.3.fc.weight`` ->
  3) and tensors without one (embeddings, final norm, head) use ``t = 0``;
* a list of ``{"filter": str | None, "value": number | gradient}``: the first entry whose filter is a
  substring of the tensor name wins; a filter of ``None``, ``""`` or ``"*"`` matches everything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fxmerge.errors import TaskVectorError

ParamValue = float | int | Sequence[float] | Sequence[Mapping[str, object]]


def layer_index(name: str) -> int | None:
    """The first all-digit dotted component of ``name``, or ``None``."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def count_layers(names: Iterable[str]) -> int:
    """Number of numbered blocks: one more than the largest :func:`layer_index` (0 when none)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_position(name: str, n_layers: int) -> float:
    """``t`` in [0, 1] for gradients: ``layer / (n_layers - 1)``; 0 for unnumbered tensors."""
    idx = layer_index(name)
    if idx is None or n_layers <= 1:
        return 0.0
    return idx / (n_layers - 1)


def _interp(values: Sequence[float], t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    pos = t * (len(values) - 1)
    lo = min(math.floor(pos), len(values) - 2)
    frac = pos - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class Param:
    """A validated parameter value; :meth:`at` resolves it for one tensor."""

    field: str
    value: object

    @classmethod
    def of(cls, field: str, value: object) -> Param:
        """Validate ``value`` (number, gradient or filter list); errors name ``field``."""
        _check(field, value, allow_filters=True)
        return cls(field, value)

    @property
    def is_scalar(self) -> bool:
        """True when the value is one number for every tensor."""
        return _is_number(self.value)

    def at(self, name: str, n_layers: int) -> float:
        """The value for tensor ``name`` (``None`` when a filter list matches nothing)."""
        return _resolve(self.value, name, layer_position(name, n_layers))

    def matches(self, name: str) -> bool:
        """False only for a filter list with no entry matching ``name``."""
        if isinstance(self.value, list | tuple) and self.value and isinstance(self.value[0], Mapping):
            return any(_filter_hits(e.get("filter"), name) for e in self.value)
        return True


def _check(field: str, value: object, allow_filters: bool) -> None:
    if _is_number(value):
        if not math.isfinite(float(value)):
            raise TaskVectorError(f"{field}: value {value} is not finite")
        return
    if isinstance(value, list | tuple) and value:
        if all(_is_number(v) for v in value):
            if not all(math.isfinite(float(v)) for v in value):
                raise TaskVectorError(f"{field}: gradient {list(value)} contains a non-finite number")
            return
        if allow_filters and all(isinstance(v, Mapping) for v in value):
            for i, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if "value" not in entry or extra:
                    raise TaskVectorError(f"{field}[{i}]: a filter entry needs 'value' and optionally 'filter', got keys {sorted(entry)}")
                filt = entry.get("filter")
                if filt is not None and not isinstance(filt, str):
                    raise TaskVectorError(f"{field}[{i}].filter: must be a string or null, got {filt!r}")
                _check(f"{field}[{i}].value", entry["value"], allow_filters=False)
            return
    raise TaskVectorError(
        f"{field}: expected a number, a list of numbers (layer gradient) or a list of {{filter, value}} entries, got {value!r}"
    )


def _filter_hits(filt: object, name: str) -> bool:
    return filt is None or filt in ("", "*") or (isinstance(filt, str) and filt in name)


def _resolve(value: object, name: str, t: float) -> float:
    if _is_number(value):
        return float(value)
    assert isinstance(value, list | tuple)
    if isinstance(value[0], Mapping):
        for entry in value:
            if _filter_hits(entry.get("filter"), name):
                return _resolve(entry["value"], name, t)
        return math.nan
    return _interp(value, t)


def per_model(field: str, value: object, n_models: int, default: float) -> list[Param]:
    """Expand the API's ``weights``/``density`` argument: ``None``, a scalar, or one value per model."""
    if value is None:
        return [Param.of(f"{field}[{i}]", default) for i in range(n_models)]
    if isinstance(value, Param):
        return [value] * n_models
    if _is_number(value):
        return [Param.of(field, value)] * n_models
    if isinstance(value, list | tuple):
        if len(value) != n_models:
            raise TaskVectorError(f"{field}: got {len(value)} values for {n_models} models; pass a scalar or one value per model")
        return [v if isinstance(v, Param) else Param.of(f"{field}[{i}]", v) for i, v in enumerate(value)]
    raise TaskVectorError(f"{field}: expected a number or a list with one value per model, got {type(value).__name__}")
