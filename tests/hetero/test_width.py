"""Elastic width: skeleton resizing, target widths, and zipping a model with its exactly widened copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.errors import MergeError
from fxmerge.hetero import merge_hetero
from fxmerge.hetero.width import check_same_structure, group_sizes, resize_model, target_widths

from .models import MLP, ResNet, seeded

GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 5, dtype=torch.float64, generator=GEN)
DATA = [torch.randn(32, 5, dtype=torch.float64, generator=GEN) for _ in range(4)]
IMAGES = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=GEN)


def widened(model: MLP, seed: int = 9) -> MLP:
    """``model`` at twice the width with every hidden unit duplicated: the same function, exactly."""
    width = model.layers[0].out_features
    wide = seeded(MLP, seed, len(model.layers), 2 * width, model.layers[0].in_features, model.out.out_features)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(model.layers, wide.layers, strict=True)):
            w = a.weight if i == 0 else torch.cat([a.weight, a.weight], 1) / 2
            b.weight.copy_(torch.cat([w, w], 0))
            b.bias.copy_(torch.cat([a.bias, a.bias]))
        wide.out.weight.copy_(torch.cat([model.out.weight, model.out.weight], 1) / 2)
        wide.out.bias.copy_(model.out.bias)
    return wide


def test_resize_model_shapes_attributes_and_copy() -> None:
    model = seeded(ResNet, 0, (1, 1))
    spec = fxmerge.infer_groups(model, IMAGES)
    widths = {g: 2 * k for g, k in group_sizes(spec).items()}
    big = resize_model(model, spec, widths, example_inputs=IMAGES)
    assert big.stem[0].out_channels == 8 and big.stem[1].num_features == 8
    assert big.blocks[1].conv1.in_channels == 8 and big.blocks[1].conv1.out_channels == 16
    assert big.head.in_features == 16 and big.head.out_features == 6
    assert big(IMAGES).shape == (8, 6)
    assert model.stem[0].out_channels == 4 and tuple(model.stem[0].weight.shape) == (4, 1, 3, 3)  # untouched
    torch.testing.assert_close(big.stem[0].weight[:4], model.stem[0].weight)  # old values kept in the corner
    assert float(big.stem[0].weight[4:].detach().abs().sum()) == 0.0
    assert check_same_structure(spec, fxmerge.infer_groups(big, IMAGES), ("a", "b")) is None


def test_target_widths_options_and_errors() -> None:
    sizes = [{0: 4, 1: 8}, {0: 6, 1: 8}]
    assert target_widths(sizes, "max") == {0: 6, 1: 8}
    assert target_widths(sizes, "min") == {0: 4, 1: 8}
    assert target_widths(sizes, 5) == {0: 5, 1: 8}  # an int only moves groups whose sizes differ
    assert target_widths(sizes, {0: 7}) == {0: 7, 1: 8}
    assert target_widths(sizes, "min", absent=[set(), {0}]) == {0: 4, 1: 8}
    for bad, match in [("big", "width must be"), (0, ">= 1"), (True, "width must be"), (11, "exceeds")]:
        with pytest.raises(MergeError, match=match):
            target_widths(sizes, bad)


def test_merging_with_an_exactly_widened_copy_keeps_the_function() -> None:
    narrow = seeded(MLP, 0, 3, 4)
    wide = widened(narrow)
    torch.testing.assert_close(wide(X), narrow(X), rtol=0, atol=1e-12)
    result = merge_hetero([narrow, wide], method="zipit", data=DATA, example_inputs=X, width="max", progress=False)
    assert result.model.layers[1].weight.shape == (8, 8)
    torch.testing.assert_close(result.model(X), narrow(X), rtol=0, atol=1e-10)
    assert result.report["widths"]["g0"] == {"sizes": [4, 8], "target": 8}
    assert result.report["segmentation"] is None and result.report["engine"]["elastic"]


@pytest.mark.parametrize("width", [6, "min", {0: 5, 1: 7, 2: 6}])
def test_target_width_is_honoured(width) -> None:
    narrow = seeded(MLP, 0, 3, 4)
    wide = seeded(MLP, 1, 3, 8)
    result = merge_hetero([wide, narrow], method="zipit", data=DATA, example_inputs=X, width=width, progress=False)
    expected = {6: [6, 6, 6], "min": [4, 4, 4]}.get(width) if not isinstance(width, dict) else [5, 7, 6]
    assert [layer.out_features for layer in result.model.layers] == expected
    assert [layer.in_features for layer in result.model.layers[1:]] == expected[:-1]
    assert result.model.out.in_features == expected[-1]
    assert torch.isfinite(result.model(X)).all()
    assert result.spec.check_model(result.model) is None  # the returned spec describes the merged model


def test_three_models_of_different_widths() -> None:
    models = [seeded(MLP, s, 3, w) for s, w in [(0, 4), (1, 6), (2, 8)]]
    result = merge_hetero(models, method="zipit", data=DATA, example_inputs=X, width="max", progress=False)
    assert result.model.layers[0].out_features == 8
    assert result.report["widths"]["g1"]["sizes"] == [4, 6, 8]


def test_equal_widths_match_the_homogeneous_merge() -> None:
    a, b = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (2, 2))
    data = [torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=GEN) for _ in range(2)]
    het = merge_hetero([a, b], method="act_align", data=data, example_inputs=IMAGES, width="max", progress=False)
    hom = fxmerge.merge([a, b], method="act_align", data=data, example_inputs=IMAGES, progress=False)
    for name, t in hom.model.state_dict().items():
        torch.testing.assert_close(het.model.state_dict()[name], t, rtol=1e-9, atol=1e-12)


def test_width_errors() -> None:
    narrow, wide = seeded(MLP, 0, 3, 4), seeded(MLP, 1, 3, 8)
    with pytest.raises(MergeError, match=r"differ in width.*width='max'"):
        merge_hetero([narrow, wide], method="zipit", data=DATA, example_inputs=X, progress=False)
    with pytest.raises(MergeError, match="elastic zipping"):
        merge_hetero([narrow, wide], method="act_align", data=DATA, example_inputs=X, width="max", progress=False)
    with pytest.raises(MergeError, match=r"width='widest'.*must be 'max', 'min'"):
        merge_hetero([narrow, wide], method="zipit", data=DATA, example_inputs=X, width="widest", progress=False)
    other = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with pytest.raises(MergeError, match=r"incompatible|differ"):
        merge_hetero([narrow, other], method="zipit", data=DATA, example_inputs=X, width="max", progress=False)
