"""Identity expansion: the padded twin computes the shallow model's function exactly (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

import fxmerge
from fxmerge.errors import MergeError
from fxmerge.hetero.blocks import find_blocks
from fxmerge.hetero.expand import absent_groups, expand, make_identity, param_map

from .models import MLP, VGG, ResNet, Transformer, seeded, with_identities

IMAGES = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
VECTORS = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randn(6, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

CASES = [  # (class, shallow depth, deep depth, deep slots of the shallow blocks, inputs)
    (ResNet, (2, 2), (3, 4), [0, 1, 3, 5], IMAGES),
    (VGG, (2, 2), (3, 3), [0, 2, 3, 4], IMAGES),
    (MLP, 3, 5, [0, 2, 4], VECTORS),
    (Transformer, 2, 4, [0, 3], TOKENS),
]


def _twin(cls, shallow_depth, deep_depth, slots, x, *, deep=None, width=None):
    kw = {} if width is None else {"width": width}
    shallow = seeded(cls, 0, shallow_depth)
    deep = deep if deep is not None else seeded(cls, 1, deep_depth, **kw)
    spec = fxmerge.infer_groups(deep, x)
    structs = find_blocks(deep, x, spec=spec), find_blocks(shallow, x)
    return shallow, deep, spec, expand(deep, shallow, *structs, spec, slots, example_inputs=x)


@pytest.mark.parametrize(("cls", "sd", "dd", "slots", "x"), CASES, ids=[c[0].__name__ for c in CASES])
def test_twin_computes_the_shallow_function_exactly(cls, sd, dd, slots, x) -> None:
    shallow, deep, _, twin = _twin(cls, sd, dd, slots, x)
    assert twin.max_error <= 1e-12
    torch.testing.assert_close(twin.model(x), shallow(x), rtol=0, atol=1e-12)
    assert twin.padded == tuple(j for j in range(len(find_blocks(deep, x).blocks)) if j not in slots)
    assert sorted(twin.model.state_dict()) == sorted(deep.state_dict())  # the deep model's architecture


@pytest.mark.parametrize(("cls", "sd", "dd", "slots", "x"), CASES, ids=[c[0].__name__ for c in CASES])
def test_twin_of_an_identity_padded_model_is_that_model(cls, sd, dd, slots, x) -> None:
    """A deep model built by hand from the shallow one with identity blocks is reproduced tensor by tensor."""
    shallow = seeded(cls, 0, sd)
    deep = with_identities(shallow, seeded(cls, 1, dd), slots)
    torch.testing.assert_close(deep(x), shallow(x), rtol=0, atol=1e-12)
    _, _, _, twin = _twin(cls, sd, dd, slots, x, deep=deep)
    for name, t in deep.state_dict().items():
        assert torch.allclose(twin.model.state_dict()[name].double(), t.double(), rtol=0, atol=1e-12), name


def test_inputs_untouched_and_absent_groups() -> None:
    _, deep, spec, twin = _twin(ResNet, (2, 2), (3, 3), [0, 1, 3, 4], IMAGES)
    assert twin.padded == (2, 5)
    # the hidden channels of the two zero-branch blocks exist only in the deep model
    hidden = {g.id for g in spec.groups if all(m.param.startswith(("blocks.2.", "blocks.5.")) for m in g.members)}
    assert twin.absent == frozenset(hidden) and len(hidden) == 2
    assert float(deep.blocks[2].bn2.weight.detach().abs().sum()) > 0  # the deep model itself is not modified
    assert twin.model.blocks[2].bn2.weight.abs().sum() == 0


def test_placement_end_also_exact() -> None:
    _, _, _, twin = _twin(ResNet, (2, 2), (3, 3), [0, 2, 3, 5], IMAGES)
    assert twin.padded == (1, 4) and twin.max_error <= 1e-12


def test_depth_and_width_compose() -> None:
    _, deep, _, twin = _twin(ResNet, (2, 2), (3, 3), [0, 1, 3, 4], IMAGES, width=6)
    assert twin.max_error <= 1e-12
    assert twin.model.stem[0].out_channels == 4 and twin.model.blocks[3].conv1.out_channels == 8
    assert twin.model.blocks[2].conv1.in_channels == 4  # identity block at the shallow width
    assert deep.stem[0].out_channels == 6


def test_make_identity_refuses_anchor_blocks() -> None:
    deep = seeded(ResNet, 1, (2, 2))
    structure = find_blocks(deep, IMAGES)
    spec = fxmerge.infer_groups(deep, IMAGES)
    with pytest.raises(MergeError, match="cannot be an identity"):
        make_identity(copy.deepcopy(deep), structure, spec, 2)


def test_incompatible_heads_and_layers_are_named() -> None:
    shallow = seeded(ResNet, 0, (2, 2), out=4)
    deep = seeded(ResNet, 1, (3, 3))
    spec = fxmerge.infer_groups(deep, IMAGES)
    a, b = find_blocks(deep, IMAGES, spec=spec), find_blocks(shallow, IMAGES)
    with pytest.raises(MergeError, match="fixed"):
        expand(deep, shallow, a, b, spec, [0, 1, 3, 4], example_inputs=IMAGES)
    vgg = seeded(VGG, 0, (2, 2))
    with pytest.raises(MergeError, match="incompatible"):
        param_map(a, find_blocks(vgg, IMAGES), [0, 1, 3, 4])
    with pytest.raises(MergeError, match="distinct"):
        param_map(a, b, [0, 0, 3, 4])


def test_absent_groups_only_for_residual_padding() -> None:
    deep = seeded(VGG, 1, (3, 3))
    spec = fxmerge.infer_groups(deep, IMAGES)
    assert absent_groups(spec, find_blocks(deep, IMAGES, spec=spec), [1, 4]) == frozenset()
