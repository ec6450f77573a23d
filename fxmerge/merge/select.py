"""Choosing MuDSC's balance ``alpha`` by merging once per grid value and keeping the best-scoring merge.

``MuDSC(alpha="auto")`` merges the models once per value of ``alpha_grid`` (default ``0, 0.25, 0.5, 0.75, 1``)
and keeps the merge whose score is highest:

- with ``score=callable(model) -> float`` (Python API only), the user's score of the merged model, e.g. its
  accuracy on a held-out validation split (higher is better);
- without one, the label-free proxy :class:`OutputAgreement`: how closely the merged model's outputs on the
  merge ``data`` follow the parents' (the cosine of each sample's output with the mean of the parents'
  L2-normalised outputs, averaged over samples).

The activation statistics are computed once, before the grid (:func:`fxmerge.merge.api.merge`); every grid
point builds only a new :class:`~fxmerge.merge.problem.Problem` (with the seeded generator a one-alpha merge
would get), so the chosen merge is exactly ``merge(method=MuDSC(alpha=<chosen>))``. The grid's endpoints are
the single-space matchings (``alpha=0``: activations only, ``alpha=1``: weights only), so on the selection
score ``auto`` is never below either of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.capture.trace import eval_mode
from fxmerge.clone import clone_module
from fxmerge.errors import MergeInputError
from fxmerge.stats.batches import iter_inputs, model_device, to_device

__all__ = ["DEFAULT_GRID", "PROXY_BATCHES", "OutputAgreement", "choose", "model_outputs"]

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
PROXY_BATCHES = 32  # batches of the merge data the proxy reads (max_batches, when set, is used instead)


def _flat(out: Any, batch: int) -> torch.Tensor:
    """Every tensor leaf of a model output with the batch size as its first axis, as ``[batch, features]``."""
    leaves: list[torch.Tensor] = []

    def visit(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if o.ndim >= 1 and o.shape[0] == batch and o.is_floating_point():
                leaves.append(o.detach().reshape(batch, -1).double())
        elif isinstance(o, (tuple, list)):
            for x in o:
                visit(x)
        elif isinstance(o, dict) or callable(getattr(o, "values", None)):  # dicts, ModelOutput-like mappings
            for x in o.values():
                visit(x)

    visit(out)
    if not leaves:
        raise MergeInputError("the label-free alpha proxy found no floating-point output with the batch size "
                              "as its first axis; pass score=callable(model) -> float instead")  # fmt: skip
    return torch.cat(leaves, dim=1).cpu()


def _batch_size(args: tuple, kwargs: dict) -> int:
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor) and t.ndim >= 1:
            return int(t.shape[0])
    raise MergeInputError("the label-free alpha proxy could not find a batch tensor in the data")


@torch.no_grad()
def model_outputs(model: nn.Module, data: Any, max_batches: int | None) -> list[torch.Tensor]:
    """The model's outputs (eval mode) on the first ``max_batches`` batches of ``data``, each ``[batch, features]``."""
    device = model_device(model)
    outs = []
    with eval_mode(model):
        for i, (args, kwargs) in enumerate(iter_inputs(data)):
            if max_batches is not None and i >= max_batches:
                break
            b = _batch_size(args, kwargs)
            outs.append(_flat(model(*to_device(args, device), **to_device(kwargs, device)), b))
    if not outs:
        raise MergeInputError("the label-free alpha proxy got no data batches")
    return outs


class OutputAgreement:
    """Label-free score of a merged model: the mean over samples of ``cos(f(x), mean_i normalize(f_i(x)))``,
    where ``f`` is the merged model's output and ``f_i`` parent ``i``'s (all floating outputs of a sample,
    flattened). In [-1, 1]; 1 when the merged model's outputs point where the parents' normalised outputs
    point on average (what their ensemble predicts from, for cosine/argmax heads). The parents' outputs are
    computed once."""

    def __init__(self, models: Sequence[nn.Module], data: Any, max_batches: int | None = None) -> None:
        self.data = data
        self.max_batches = PROXY_BATCHES if max_batches is None else max_batches
        per_model = [model_outputs(m, data, self.max_batches) for m in models]
        self.targets = [
            torch.stack([F.normalize(outs[b], dim=1) for outs in per_model]).mean(0)
            for b in range(len(per_model[0]))
        ]

    def __call__(self, model: nn.Module) -> float:
        outs = model_outputs(model, self.data, self.max_batches)
        if len(outs) != len(self.targets) or any(o.shape != t.shape for o, t in zip(outs, self.targets, strict=False)):
            raise MergeInputError("the merged model's outputs do not have the parents' shapes; pass "
                                  "score=callable(model) -> float to select alpha")  # fmt: skip
        total = sum(float(F.cosine_similarity(o, t, dim=1).sum()) for o, t in zip(outs, self.targets, strict=False))
        return total / sum(int(t.shape[0]) for t in self.targets)


@dataclass
class Selection:
    """The grid, each alpha's score, the chosen alpha and what scored it."""

    grid: list[float]
    scores: list[float]
    chosen: float
    criterion: str

    def to_obj(self) -> dict[str, Any]:
        return {"grid": self.grid, "scores": self.scores, "chosen": self.chosen, "criterion": self.criterion}


def _checked(value: Any, alpha: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise MergeInputError(f"score(model) must return a float (higher is better); at alpha={alpha} it "
                              f"returned {type(value).__name__} {value!r:.80}") from None  # fmt: skip
    if not math.isfinite(out):
        raise MergeInputError(f"score(model) returned a non-finite value ({out}) at alpha={alpha}; it must "
                              "return a finite float (higher is better)")  # fmt: skip
    return out


def choose(
    grid: Sequence[float],
    build: Callable[[float], Any],
    model_of: Callable[[Any], nn.Module],
    score: Callable[[nn.Module], Any] | None,
    proxy: Callable[[], Callable[[nn.Module], float]],
) -> tuple[Any, Selection]:
    """Build the merge at every ``alpha`` of ``grid`` (``build(alpha)``), score its model (``model_of``) with
    ``score`` or, when None, the proxy made by ``proxy()``, and return the best build and the selection.

    The user's score gets a copy of the merged model (it may change it freely). Ties go to the alpha closest
    to 0.5 (the paper's default balance), then the smaller one."""
    fn = score if score is not None else proxy()
    criterion = f"score: {getattr(score, '__qualname__', repr(score))}" if score is not None else (
        "proxy: output agreement with the parents (label-free)")  # fmt: skip
    best, best_key, scores = None, None, []
    for alpha in grid:
        built = build(alpha)
        model = model_of(built)
        value = _checked(fn(clone_module(model) if score is not None else model), alpha)
        scores.append(value)
        key = (value, -abs(alpha - 0.5), -alpha)
        if best_key is None or key > best_key:
            best, best_key = built, key
    assert best_key is not None
    chosen = next(a for a, v in zip(grid, scores, strict=True) if (v, -abs(a - 0.5), -a) == best_key)
    return best, Selection([float(a) for a in grid], scores, float(chosen), criterion)
