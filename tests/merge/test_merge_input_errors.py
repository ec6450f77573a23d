"""``fxmerge.merge`` names what is wrong with the models and options it is given, before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.errors import InputError, MergeError, MergeInputError


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


X = (torch.randn(4, 6, generator=torch.Generator().manual_seed(0)),)
DATA = [torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


def test_alpha_must_be_a_number():
    with pytest.raises(MergeInputError, match=r"alpha='high': Input should be a valid number"):
        fxmerge.merge([_mlp(0), _mlp(1)], method="mudsc", data=DATA, example_inputs=X, alpha="high", progress=False)


def test_a_model_without_data_is_named():
    with torch.device("meta"):
        ghost = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(MergeInputError, match=r"models\[1\] has tensors on the meta device"):
        fxmerge.merge([_mlp(0), ghost], method="average", example_inputs=X, progress=False)


def test_models_of_different_dtypes_are_named_under_mudsc():
    half = _mlp(1).half()
    with pytest.raises(MergeInputError) as info:
        fxmerge.merge([_mlp(0), half], method="mudsc", data=DATA, example_inputs=X, progress=False)
    assert "models[0]: torch.float32, models[1]: torch.float16" in str(info.value) and "model.float()" in str(info.value)
    assert isinstance(info.value, InputError) and isinstance(info.value, MergeError)


def test_nan_in_the_data_gets_a_hint_merge_can_follow():
    bad = [d.clone() for d in DATA]
    bad[0][2, 3] = float("nan")
    with pytest.raises(MergeError) as info:
        fxmerge.merge([_mlp(0), _mlp(1)], method="act_align", data=bad, example_inputs=X, progress=False)
    message = str(info.value)
    assert "NaN or inf" in message and "check the data" in message and "nonfinite" not in message
    with pytest.raises(MergeError, match="unknown merge option"):  # the old hint's option really is unknown
        fxmerge.merge([_mlp(0), _mlp(1)], method="act_align", data=bad, example_inputs=X, nonfinite="zero")
