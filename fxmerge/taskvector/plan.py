"""Merge planning: which tensors merge, their output shapes under the shape policy, and upfront
validation of every per-tensor weight and density (so bad inputs fail before anything is written).

Shape policies for a tensor whose shapes differ between base and models (typically vocabulary rows):

* ``common`` (default, warns): output is the common leading sub-tensor of the base and all models;
* ``base``: output has the base's shape; a model contributes only where it overlaps the base;
* ``union``: output is the elementwise-largest shape; positions with a base value merge as in
  ``base``; positions without one take the plain mean of the raw values of the models having them
  (never sparsified, weighted or amplified);
* ``error``: any mismatch raises :class:`~fxmerge.errors.TaskVectorError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from fxmerge.errors import TaskVectorError
from fxmerge.taskvector.methods import MergeOptions
from fxmerge.taskvector.params import Param, count_layers
from fxmerge.taskvector.sources import TensorInfo, TensorSource

Region = tuple[int, ...]


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is produced."""

    name: str
    out: TensorInfo
    merge: bool
    base_region: Region
    regions: tuple[Region | None, ...]
    span: tuple[int, int] | None = None  # a piece: this [start, stop) range of the flattened tensor only

    @property
    def uniform(self) -> bool:
        """All present models cover exactly the base region (no padding/cropping logic needed)."""
        return all(r is None or r == self.base_region for r in self.regions)


def split_plan(plan: TensorPlan, limit: int) -> list[TensorPlan]:
    """``plan`` cut into pieces of at most ``limit`` elements of the flattened tensor (for elementwise
    merges of tensors whose inputs all have the output's shape); the plan itself when it is small."""
    n = plan.out.numel
    if n <= limit:
        return [plan]
    pieces = []
    for start in range(0, n, limit):
        stop = min(n, start + limit)
        region = (stop - start,)
        regions = tuple(region if r is not None else None for r in plan.regions)
        pieces.append(replace(plan, base_region=region, regions=regions, span=(start, stop)))
    return pieces


def _min_shape(shapes: list[tuple[int, ...]]) -> Region:
    return tuple(min(dims) for dims in zip(*shapes, strict=True))


def _tensor_plan(name: str, base: TensorInfo, infos: list[TensorInfo | None], opts: MergeOptions,
                 notes: list[str]) -> TensorPlan:
    out_dtype = opts.out_dtype or base.dtype
    excluded = opts.exclude is not None and re.search(opts.exclude, name) is not None
    if not base.dtype.is_floating_point:
        return TensorPlan(name, base, False, base.shape, tuple(None for _ in infos))
    if excluded:
        return TensorPlan(name, TensorInfo(base.shape, out_dtype), False, base.shape, tuple(None for _ in infos))
    present = [i for i in infos if i is not None]
    if not present:
        notes.append(f"{name}: no model has this tensor; copied from the base")
        return TensorPlan(name, TensorInfo(base.shape, out_dtype), False, base.shape, tuple(None for _ in infos))
    if len(present) < len(infos):
        notes.append(f"{name}: missing from {len(infos) - len(present)} model(s); merged from the others")
    if all(i.shape == base.shape for i in present):
        regions = tuple(base.shape if i is not None else None for i in infos)
        return TensorPlan(name, TensorInfo(base.shape, out_dtype), True, base.shape, regions)
    shapes = [base.shape] + [i.shape for i in present]
    if any(len(s) != len(base.shape) for s in shapes):
        raise TaskVectorError(f"tensor {name!r}: models disagree on the number of dimensions {shapes}; they cannot be merged")
    if opts.shape_policy == "error":
        raise TaskVectorError(f"tensor {name!r}: shapes differ {shapes} (shape_policy='error'); "
                              "use shape_policy 'common', 'base' or 'union' to merge anyway")
    notes.append(f"{name}: shapes differ {shapes}; shape_policy={opts.shape_policy!r}")
    if opts.shape_policy == "common":
        common = _min_shape(shapes)
        regions = tuple(common if i is not None else None for i in infos)
        return TensorPlan(name, TensorInfo(common, out_dtype), True, common, regions)
    out_shape = base.shape if opts.shape_policy == "base" else tuple(max(d) for d in zip(*shapes, strict=True))
    regions = tuple(_min_shape([base.shape, i.shape]) if i is not None else None for i in infos)
    return TensorPlan(name, TensorInfo(out_shape, out_dtype), True, base.shape, regions)


def build_plan(base: TensorSource, models: list[TensorSource], opts: MergeOptions) -> tuple[list[TensorPlan], list[str]]:
    """Plan every output tensor (in the base's order) and collect warnings for the user."""
    base_infos = base.infos()
    model_infos = [m.infos() for m in models]
    notes: list[str] = []
    plans = [_tensor_plan(n, i, [mi.get(n) for mi in model_infos], opts, notes) for n, i in base_infos.items()]
    for m, mi in zip(models, model_infos, strict=True):
        extra = [n for n in mi if n not in base_infos]
        if extra:
            notes.append(f"{m.label}: {len(extra)} tensor(s) without a base counterpart ignored (e.g. {extra[0]!r})")
    if not any(p.merge for p in plans):
        raise TaskVectorError("no tensor can be merged: the models share no floating-point tensor names with the base")
    return plans, notes


def resolve_params(plans: list[TensorPlan], weights: list[Param], densities: list[Param],
                   opts: MergeOptions) -> dict[str, tuple[list[float], list[float]]]:
    """Per-tensor (weights, densities) for every merged tensor, validated up front."""
    n_layers = count_layers(p.name for p in plans)
    table: dict[str, tuple[list[float], list[float]]] = {}
    for p in plans:
        if not p.merge:
            continue
        ws = [w.at(p.name, n_layers) for w in weights]
        ds = [d.at(p.name, n_layers) for d in densities]
        for i, (w, d) in enumerate(zip(ws, ds, strict=True)):
            if math.isnan(w):
                raise TaskVectorError(f"{weights[i].field}: no filter entry matches tensor {p.name!r}; add a fallback {{value: ...}}")
            if math.isnan(d):
                raise TaskVectorError(f"{densities[i].field}: no filter entry matches tensor {p.name!r}; add a fallback {{value: ...}}")
            if not 0.0 < d <= 1.0:
                raise TaskVectorError(f"{densities[i].field}: density {d:g} for tensor {p.name!r} is outside (0, 1]")
            if opts.spec.sparsify == "della" and d < 1.0 and not 0.0 < d - opts.epsilon < d + opts.epsilon <= 1.0:
                raise TaskVectorError(f"epsilon: density {d:g} +/- epsilon {opts.epsilon:g} must stay inside (0, 1] "
                                      f"(tensor {p.name!r}); lower epsilon")
        table[p.name] = (ws, ds)
    if opts.scope == "global" and not all(d.is_scalar for d in densities):
        raise TaskVectorError("density: scope 'global' needs one number per model (no gradients or filters)")
    return table


def check_counts(n_models: int, opts: MergeOptions) -> None:
    """Model-count rules of the combine step."""
    if n_models == 0:
        raise TaskVectorError("models: give at least one fine-tuned model")
    if opts.spec.combine == "slerp" and n_models != 1:
        raise TaskVectorError(f"slerp interpolates from the base to exactly one model; got {n_models} models")
    if opts.spec.combine == "model_stock" and n_models < 2:
        raise TaskVectorError(f"model_stock needs at least two fine-tuned models; got {n_models}")
