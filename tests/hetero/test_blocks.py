"""Block detection on residual, plain and transformer graphs, and the module-name override."""

from __future__ import annotations

import pytest
import torch

from fxmerge.errors import MergeError
from fxmerge.hetero.blocks import find_blocks
from fxmerge.testing.zoo import ResNet20A

from .models import MLP, VGG, ResNet, Transformer, seeded

IMAGES = torch.randn(2, 1, 8, 8, dtype=torch.float64)
TOKENS = torch.randn(2, 4, 5, dtype=torch.float64)


def test_resnet_blocks_stages_stem_head() -> None:
    s = find_blocks(seeded(ResNet, 0, (2, 3)), IMAGES)
    assert [b.name for b in s.blocks] == [f"blocks.{i}" for i in range(5)]
    assert s.stages == (2, 3)
    assert [b.kind for b in s.blocks] == ["residual"] * 5
    assert [b.anchor for b in s.blocks] == [True, False, True, False, False]  # first, then projection shortcut
    assert [b.identity for b in s.blocks] == [True, True, False, True, True]
    assert s.stem == ("stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.1.running_mean", "stem.1.running_var",
                      "stem.1.num_batches_tracked")  # fmt: skip
    assert s.head == ("head.weight", "head.bias")
    assert s.blocks[2].modules == ("blocks.2.conv1", "blocks.2.bn1", "blocks.2.conv2", "blocks.2.bn2",
                                   "blocks.2.shortcut.0", "blocks.2.shortcut.1")  # fmt: skip
    gm_nodes = {n.name: n for n in s.graph.gm.graph.nodes}
    for b in s.blocks:  # the output is the post-add activation, the branch operand ends in bn2
        assert gm_nodes[b.output].op == "call_function" and "relu" in str(gm_nodes[b.output].target)
        assert len(b.branches) == (1 if b.identity else 0)
        assert s.shapes[b.output] == ((4, 8, 8) if b.stage == 0 else (8, 4, 4))


def test_resnet_with_parameter_free_shortcut() -> None:
    s = find_blocks(ResNet20A().eval(), torch.randn(2, 3, 16, 16))
    assert s.stages == (3, 3, 3)
    assert [b.index for b in s.blocks if b.anchor] == [0, 3, 6]


def test_plain_vgg_layers_and_pool_starts_a_stage() -> None:
    model = seeded(VGG, 0, (2, 3))
    s = find_blocks(model, IMAGES)
    assert [b.kind for b in s.blocks] == ["layer"] * 5
    assert s.stages == (2, 3)
    assert s.stem == () and s.head == ("head.weight", "head.bias")
    conv_bn = [(f"features.{i}", f"features.{i + 1}") for i in (0, 3, 7, 10, 13)]
    assert [b.modules for b in s.blocks] == conv_bn
    first_of_stage_1 = {n: s.graph.gm.graph.find_nodes(op="call_module", target="features.6") for n in [0]}[0]
    assert first_of_stage_1[0].name in s.blocks[2].nodes  # the max-pool opens the next stage's first layer
    assert s.blocks[2].input == s.blocks[1].output


def test_mlp_layers() -> None:
    s = find_blocks(seeded(MLP, 0, 4, 8), torch.randn(3, 5, dtype=torch.float64))
    assert [b.name for b in s.blocks] == [f"layers.{i}" for i in range(4)]
    assert s.stages == (4,)  # only the first (5 -> 8) changes the shape, and it is the first block anyway
    assert s.head == ("out.weight", "out.bias")


def test_transformer_attention_and_mlp_form_one_block() -> None:
    s = find_blocks(seeded(Transformer, 0, 3), TOKENS)
    assert [b.name for b in s.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.kind for b in s.blocks] == ["residual"] * 3
    assert s.stages == (3,)
    assert s.stem == ("embed.weight", "embed.bias", "pos")
    assert s.head == ("norm.weight", "norm.bias", "head.weight", "head.bias")  # the final norm is not in a block
    assert all(len(b.branches) == 2 for b in s.blocks)


def test_export_frontend_gives_the_same_structure() -> None:
    fx_s = find_blocks(seeded(ResNet, 0, (2, 2)), IMAGES)
    ex_s = find_blocks(seeded(ResNet, 0, (2, 2)), IMAGES, frontend="export")
    assert ex_s.stages == fx_s.stages
    def used(names: tuple[str, ...]) -> set[str]:  # export does not read the unused BN step counters
        return {n for n in names if not n.endswith("num_batches_tracked")}

    assert [used(b.params) for b in ex_s.blocks] == [used(b.params) for b in fx_s.blocks]
    assert used(ex_s.stem) == used(fx_s.stem) and ex_s.head == fx_s.head


def test_override_groups_blocks_by_module_name() -> None:
    model = seeded(ResNet, 0, (2, 2))
    s = find_blocks(model, IMAGES, blocks=[["blocks.0", "blocks.1"], "blocks.2", "blocks.3"])
    assert [b.modules[0] for b in s.blocks] == ["blocks.0.conv1", "blocks.2.conv1", "blocks.3.conv1"]
    assert len(s.blocks[0].modules) == 8 and s.stages == (1, 2)


def test_override_errors() -> None:
    model = seeded(ResNet, 0, (2, 2))
    with pytest.raises(MergeError, match="no graph node uses"):
        find_blocks(model, IMAGES, blocks=["blocks.0", "nothing.here"])
    with pytest.raises(MergeError, match="graph order"):
        find_blocks(model, IMAGES, blocks=["blocks.1", "blocks.0"])
    with pytest.raises(MergeError, match="belong to none"):
        find_blocks(model, IMAGES, blocks=["blocks.0", "blocks.2"])
    with pytest.raises(MergeError, match="non-empty list"):
        find_blocks(model, IMAGES, blocks=[])


def test_model_is_left_unchanged() -> None:
    model = seeded(ResNet, 0, (2, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_blocks(model, IMAGES)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
