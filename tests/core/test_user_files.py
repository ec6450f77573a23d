"""Files written at a path the user names (spec JSON, plots) never replace a file fxmerge did not write."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.errors import OutputPathError
from fxmerge.plots import plot_groups


def _spec():
    return fxmerge.infer_groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))


def test_spec_json_replaces_its_own_file_but_not_a_foreign_one(tmp_path):
    spec = _spec()
    path = tmp_path / "spec.json"
    spec.to_json(path)
    spec.to_json(path)  # rerun: fxmerge's own file is replaced
    assert fxmerge.PermutationSpec.from_json(str(path)).to_json() == spec.to_json()
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    with pytest.raises(OutputPathError, match="was not written by fxmerge"):
        spec.to_json(foreign)
    assert foreign.read_text() == '{"mine": 1}'


def test_plot_replaces_its_own_png_but_not_a_foreign_file(tmp_path):
    spec = _spec()
    png = tmp_path / "groups.png"
    plot_groups(spec, png)
    first = png.stat().st_size
    plot_groups(spec, png)
    assert png.stat().st_size == first
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG not fxmerge's")
    with pytest.raises(OutputPathError, match="was not written by fxmerge"):
        plot_groups(spec, photo)
    assert photo.read_bytes() == b"\x89PNG not fxmerge's"
