"""Copying user modules without touching them."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def clone_module(model: M) -> M:
    """A deep copy of ``model``.

    Plain ``copy.deepcopy`` refuses modules that hold a tensor computed by autograd as an attribute, such as
    the ``weight`` that ``torch.nn.utils.weight_norm`` recomputes from ``weight_g`` / ``weight_v`` before each
    forward. Such attributes are derived values, so the copy gets them detached; parameters and buffers are
    copied as usual.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
