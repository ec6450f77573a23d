"""iter_inputs: the three batch forms and the errors."""

from __future__ import annotations

import pytest
import torch

from fxmerge.errors import MergeError
from fxmerge.stats import iter_inputs


def test_three_forms() -> None:
    x, y = torch.ones(2, 3), torch.zeros(2)
    batches = [x, (x, y), [x, y], {"input_ids": x, "mask": y}]
    out = list(iter_inputs(batches))
    assert out[0][0][0] is x and out[0][1] == {}
    assert out[1][0] == (x,) and out[2][0] == (x,)
    assert out[3][0] == () and out[3][1]["input_ids"] is x and out[3][1]["mask"] is y


def test_single_tensor_or_dict_is_one_batch() -> None:
    x = torch.ones(4, 3)
    assert len(list(iter_inputs(x))) == 1
    (only,) = list(iter_inputs({"x": x}))
    assert only[1]["x"] is x


def test_generators_and_loaders() -> None:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(10.0)[:, None]), batch_size=4
    )
    args = [a for a, _ in iter_inputs(loader)]
    assert [a[0].shape[0] for a in args] == [4, 4, 2]
    assert len(list(iter_inputs(torch.ones(2) for _ in range(3)))) == 3


@pytest.mark.parametrize("bad", [[3], [()], [{1: torch.ones(1)}], 5, "abc"])
def test_errors(bad) -> None:
    with pytest.raises(MergeError):
        list(iter_inputs(bad))
