"""The ``evaluate:`` function of ``digits_mlp.yaml``: test accuracies of a digits embedding model."""

from __future__ import annotations

from functools import cache

from torch import nn

from examples.digits_common import evaluate
from fxmerge.data.digits import DigitsSplit, load_digits_split


@cache
def _split() -> DigitsSplit:
    return load_digits_split(seed=0)


def accuracy(model: nn.Module) -> dict[str, float]:
    """``task_0``, ``task_1`` (each task's classes), ``avg_task`` and ``joint`` (10-way) test accuracy."""
    return evaluate(model, _split())
