"""The data: section and model loading of a config: digits, ImageFolder, callables, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fxmerge.config import parse_merge_config
from fxmerge.config.data import build_data
from fxmerge.config.refs import load_checkpoint
from fxmerge.errors import ConfigError
from tests.cli.conftest import MLP, base_config, parents
from tests.cli.tiny_models import make_mlp


def _data(tmp_path, data: dict):
    return build_data(parse_merge_config(base_config(data=data), root=tmp_path).data)


def test_digits_batches_hold_only_the_chosen_classes(tmp_path, checkpoints):
    loader = _data(tmp_path, {"digits": {"classes": [3, 7], "split": "test", "batch_size": 10, "limit": 25}})
    batches = list(loader)
    assert [len(x) for x, _ in batches] == [10, 10, 5]
    assert batches[0][0].shape[1:] == (1, 8, 8)
    assert set(torch.cat([y for _, y in batches]).tolist()) <= {3, 7}


def test_image_folder_resizes_crops_and_spreads_the_limit(tmp_path, checkpoints):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    loader = _data(tmp_path, {"image_folder": {"path": "imgs", "size": 16, "batch_size": 4, "limit": 4}})
    (x, y), *rest = list(loader)
    assert x.shape == (4, 3, 16, 16) and not rest
    assert set(y.tolist()) == {0, 1}  # the limit is spread over the folder, not the first class only


def test_callable_generators_are_called_again_for_each_pass(tmp_path, checkpoints):
    data = _data(tmp_path, {"callable": "tests.cli.tiny_models:batch_generator"})
    first, second = list(data), list(data)
    assert len(first) == len(second) == 4
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_checkpoints_load_and_mismatches_name_the_field(tmp_path):
    a, _ = parents()
    torch.save({"model": a.state_dict()}, tmp_path / "wrapped.pt")
    model = load_checkpoint(make_mlp(), tmp_path / "wrapped.pt", "models[0].checkpoint")
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), a(x))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"models\[0\]\.checkpoint: .* does not hold a state dict"):
        load_checkpoint(make_mlp(), tmp_path / "list.pt", "models[0].checkpoint")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot be read with torch.load"):
        load_checkpoint(make_mlp(), tmp_path / "junk.pt", "models[0].checkpoint")


def test_relative_paths_resolve_against_the_config_folder(tmp_path, checkpoints):
    cfg = parse_merge_config(base_config(), root=tmp_path)
    assert cfg.models[0].checkpoint == str(tmp_path / "a.pt")
    assert cfg.root == tmp_path
    assert cfg.shape_of(1) == [2, 6]
    assert parse_merge_config(base_config(input_shape="2x6"), root=tmp_path).input_shape == [2, 6]
    assert parse_merge_config({**base_config(), "models": [{"model": MLP, "input_shape": [3, 6]}, {"model": MLP}]},
                              root=tmp_path).shape_of(0) == [3, 6]  # fmt: skip
