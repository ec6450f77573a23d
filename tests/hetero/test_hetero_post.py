"""Post-passes (``post=[...]``) on heterogeneous merges: each parent's per-unit statistics are merged through its own
spec and matchings, so an exact merge stays exact and a lossy one is rescaled to its parents' statistics."""

from __future__ import annotations

import pytest
import torch

from fxmerge.errors import MergeError
from fxmerge.hetero import merge_hetero
from fxmerge.passes.norm import module_moments

from .models import MLP, ResNet, seeded
from .test_block_counts import IMAGES, ZIP, GroupsNet, duplicated_groups
from .test_width import DATA, X, widened

POST = ["unit_repair", "norm_repair"]
CONV_X = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _outputs_close(merged: torch.nn.Module, parent: torch.nn.Module, inputs: list[torch.Tensor]) -> None:
    for x in inputs:
        torch.testing.assert_close(merged(x), parent(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("width", ["min", "max"])
def test_post_passes_leave_an_exact_merge_of_different_group_counts_exact(width: str) -> None:
    """GroupNorm(2) vs its copy with every group twice (GroupNorm(4)): the merge computes the parents' function, so
    targets merged through the right matchings equal the merged model's statistics and the passes change nothing;
    a target taken from the wrong units would rescale some channel."""
    small = seeded(GroupsNet, 0)
    big = duplicated_groups(small)
    result = merge_hetero([small, big], data=IMAGES, example_inputs=IMAGES[0], width=width, post=POST, **ZIP)
    _outputs_close(result.model, small, IMAGES)
    post = result.report["engine"]["post"]
    assert [p["name"] for p in post] == POST
    assert set(post[0]["info"]["modules"]) == {"conv1", "conv2"} and set(post[1]["info"]["modules"]) == {"gn1", "gn2"}


def test_post_passes_leave_an_exact_merge_of_different_widths_exact() -> None:
    narrow = seeded(MLP, 0, 3, 4)
    result = merge_hetero([narrow, widened(narrow)], method="zipit", data=DATA, example_inputs=X, width="max",
                          post=["unit_repair"], progress=False)  # fmt: skip
    _outputs_close(result.model, narrow, [X])
    assert result.report["engine"]["post"][0]["info"]["modules"] == ["layers.0", "layers.1", "layers.2"]


def test_norm_repair_rescales_a_lossy_merge_of_different_widths_to_its_targets() -> None:
    """Two unrelated GroupNorm nets, 2 vs 3 channels per group: after norm_repair the merged GroupNorm outputs have
    the statistics of the merge without it, rescaled per channel (mean and std move, nothing else does)."""
    a, b = seeded(GroupsNet, 1, (2, 2), 2), seeded(GroupsNet, 2, (2, 2), 3)
    plain = merge_hetero([a, b], data=IMAGES, example_inputs=IMAGES[0], width="max", **ZIP).model
    fixed = merge_hetero([a, b], data=IMAGES, example_inputs=IMAGES[0], width="max", post=["norm_repair"],
                         **ZIP).model  # fmt: skip
    assert not torch.allclose(plain(IMAGES[0]), fixed(IMAGES[0]))
    run = {"num_batches": None, "progress": False}
    before, _ = module_moments(plain, ["gn1"], IMAGES, run, "plain")
    after, _ = module_moments(fixed, ["gn1"], IMAGES, run, "fixed")
    # gn1 is the first module fixed: its input is unchanged, so its output is an affine map of the plain one per
    # channel, y' = s (y - m) + t, and the per-channel statistics move accordingly
    scale = after["gn1"].std() / before["gn1"].std()
    torch.testing.assert_close(fixed.gn1.weight, plain.gn1.weight * scale.to(plain.gn1.weight), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fixed.conv1.weight, plain.conv1.weight, rtol=0, atol=0)


def test_post_passes_need_data() -> None:
    """Depth merges by averaging along a uniform alignment need no data, but a post-pass does."""
    deep, shallow = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (1, 1))
    with pytest.raises(MergeError, match=r"post-passes .* need data"):
        merge_hetero([deep, shallow], method="average", example_inputs=CONV_X, depth="uniform",
                     post=["norm_repair"], progress=False)  # fmt: skip


def test_post_passes_run_on_a_depth_merge() -> None:
    """Depth merge (the shallow model padded with identity blocks): every BatchNorm and producer layer is rescaled
    to the statistics of its padded parents, and the model still runs."""
    deep, shallow = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (1, 1))
    data = [torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = merge_hetero([deep, shallow], method="zipit", data=data, example_inputs=CONV_X, depth="uniform",
                          post=POST, progress=False)  # fmt: skip
    unit, norm = result.report["engine"]["post"]
    assert "stem.0" in unit["info"]["modules"] and "stem.1" in norm["info"]["modules"]
    assert torch.isfinite(result.model(CONV_X)).all()
