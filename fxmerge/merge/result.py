"""What a merge returns: the merged model, its spec and report, and for one-to-one methods the aligned models
and interpolation between them (loss-barrier / mode-connectivity curves in one call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxmerge.clone import clone_module
from fxmerge.errors import MergeError, MergeInputError
from fxmerge.ir.layout import Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.report import SpaceDetail
from fxmerge.merge.spaces import Space
from fxmerge.merge.transform import Transforms, load_merged, perms_from

__all__ = ["Alignment", "MergeResult", "aligned_models"]


def aligned_models(
    models: Sequence[nn.Module], spec: PermutationSpec, spaces: dict[Layout, Space], tr: Transforms
) -> list[nn.Module]:
    """Every model permuted into model 0's basis by a one-to-one solution (exactly function-preserving)."""
    out = []
    for m, model in enumerate(models):
        perms: dict[int, torch.Tensor] = {}
        for key in spaces:
            perms.update(perms_from(spec, key, tr[key], m))
        out.append(spec.apply(model, perms))
    return out


@dataclass
class Alignment:
    """The models of a one-to-one merge, permuted into model 0's basis on demand."""

    models: Sequence[nn.Module]
    spec: PermutationSpec | None
    spaces: dict[Layout, Space]
    transforms: Transforms
    data: Any = None
    max_batches: int | None = None
    _aligned: list[nn.Module] | None = field(default=None, repr=False)

    def aligned(self) -> list[nn.Module]:
        if self._aligned is None:
            if self.spec is None:  # plain averaging: the models are taken as they are
                self._aligned = [clone_module(m) for m in self.models]
            else:
                self._aligned = aligned_models(self.models, self.spec, self.spaces, self.transforms)
        return self._aligned


@dataclass
class MergeResult:
    """A merged model with the spec it was merged on, a report, and (one-to-one methods) the aligned models.

    ``details`` maps each merge space (``report["similarity"]`` keys) to its final similarity matrix and
    matching, for plots (the matrix is kept for spaces of at most 4096 stacked units); ``report`` is plain
    JSON. ``spec`` is None for plain averaging, which needs none.
    """

    model: nn.Module
    spec: PermutationSpec | None
    report: dict[str, Any] = field(default_factory=dict)
    details: dict[str, SpaceDetail] = field(default_factory=dict)
    alignment: Alignment | None = field(default=None, repr=False)

    @property
    def aligned_models(self) -> list[nn.Module]:
        """Every input model permuted into model 0's basis (model 0 itself first); each computes exactly what
        its input model computes. Only for one-to-one methods (align matchers, average)."""
        return list(self._alignment().aligned())

    def interpolate(
        self, t: float | Sequence[float], *, reset_bn: bool = True, data: Any = None
    ) -> nn.Module:
        """The weight interpolation of the aligned models: ``(1 - t) * model 0 + t * model 1`` for two models,
        or ``sum_m t[m] * model m`` for a sequence of N weights summing to 1. BatchNorm statistics are
        re-estimated on ``data`` (default: the merge's data) when ``reset_bn`` and the model has BatchNorm."""
        al = self._alignment()
        weights = _weights(t, len(al.models))
        models = al.aligned()
        states = [m.state_dict() for m in models]
        mixed = {}
        for name, ref in states[0].items():
            if not ref.is_floating_point():
                mixed[name] = ref.clone()
                continue
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for w, st in zip(weights, states, strict=True):
                acc += w * st[name].double()
            mixed[name] = acc.to(ref.dtype)
        out = clone_module(models[0])
        load_merged(out, mixed)
        batches = data if data is not None else al.data
        if reset_bn and batches is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                    for m in out.modules()):  # fmt: skip
            from fxmerge.passes.bn import reset_bn_stats

            out = reset_bn_stats(out, batches, progress=False, num_batches=al.max_batches)
        return out

    def interpolation_curve(
        self,
        evaluate: Callable[[nn.Module], Any],
        ts: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        *,
        reset_bn: bool = True,
        data: Any = None,
    ) -> list[dict[str, Any]]:
        """``[{"t": t, "score": evaluate(interpolate(t))}, ...]``: a loss-barrier / mode-connectivity curve
        between the two aligned models in one call (``evaluate`` returns a float or a dict of metrics)."""
        if len(self._alignment().models) != 2:
            raise MergeInputError(
                "interpolation_curve walks between 2 models; use interpolate(weights) for N > 2"
            )
        return [
            {"t": float(t), "score": evaluate(self.interpolate(t, reset_bn=reset_bn, data=data))} for t in ts
        ]

    def _alignment(self) -> Alignment:
        if self.alignment is None:
            raise MergeError("aligned models exist only for one-to-one merges (average, rebasin, act_align, mudsc "
                             "with matcher='align', without stop_at); zipping merges units within a model")  # fmt: skip
        return self.alignment


def _weights(t: float | Sequence[float], n: int) -> list[float]:
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        if n != 2:
            raise MergeInputError(f"a scalar t interpolates 2 models; pass {n} weights for {n} models")
        if not 0.0 <= float(t) <= 1.0:
            raise MergeInputError(f"t must be in [0, 1], got {t}")
        return [1.0 - float(t), float(t)]
    w = [float(x) for x in t]
    if len(w) != n or abs(sum(w) - 1.0) > 1e-6:
        raise MergeInputError(f"interpolation weights must be {n} numbers summing to 1, got {list(t)}")
    return w
