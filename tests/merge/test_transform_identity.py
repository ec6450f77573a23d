"""The transform's identity shortcut gives exactly the values of the general scatter path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxmerge.match import Matching
from fxmerge.merge.transform import _along


def _matching(cols: list[int], n_models: int = 2) -> Matching:
    size = len(cols)
    stacked = np.concatenate([np.arange(size), np.asarray(cols)])
    return Matching.from_columns(stacked, [size] * n_models, size, 0.0, dtype=torch.float64,
                                 device=torch.device("cpu"))  # fmt: skip


@pytest.mark.parametrize("mode", ["merge", "in", "act"])
@pytest.mark.parametrize("unit", [1, 3])
def test_identity_equals_the_scatter_of_a_permutation_that_happens_to_be_identity(mode: str, unit: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4 * unit, 2, generator=gen, dtype=torch.float64)
    ident = _matching([0, 1, 2, 3])
    assert ident.is_identity(1) and ident.is_identity(0)
    swapped = _matching([1, 0, 2, 3])
    assert not swapped.is_identity(1) and swapped.is_permutation(1)
    got = _along(x, 1, ident, 1, mode, unit)
    # the general path on the same data: permute by `swapped`, then undo the permutation by hand
    y = _along(x, 1, swapped, 1, mode, unit)
    blocks = y.reshape(5, 4, unit, 2)[:, [1, 0, 2, 3]].reshape(5, 4 * unit, 2)
    assert torch.equal(got, blocks)
    if mode == "merge":
        assert torch.equal(got, x * 0.5)
    else:
        assert torch.equal(got, x)
