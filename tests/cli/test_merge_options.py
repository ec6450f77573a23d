"""Depth-heterogeneous merges from a config, hetero option checks, and the global --quiet flag."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import fxmerge
from fxmerge.cli import main
from tests.cli.conftest import assert_rejected, base_config, write_yaml

SHALLOW, DEEP = "tests.cli.tiny_models:make_shallow", "tests.cli.tiny_models:make_deep"


def test_depth_merge_rebuilds_the_deep_architecture_and_draws_the_cka(tmp_path):
    cfg = base_config(models=[{"model": SHALLOW}, {"model": DEEP}], method="zipit", options={"depth": "lma"},
                      outputs={"plots": True})  # fmt: skip
    path = write_yaml(tmp_path, cfg)
    result = CliRunner().invoke(main, ["-q", "merge", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # -q before the command silences the summary too
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["depth"] == "lma" and report["cka_plot"] == "plots/cka.png"
    assert "plots/cka.png" in report["files"]["plots"] and (tmp_path / "o" / "plots" / "cka.png").is_file()
    sidecar = json.loads((tmp_path / "o" / "model.safetensors.json").read_text())
    assert sidecar["constructor_kwargs"]["ref"] == DEEP  # the parent whose architecture the merge kept
    model = fxmerge.load_state(tmp_path / "o" / "model.safetensors")
    assert len(model.blocks) == 3 and model(torch.randn(2, 6)).shape == (2, 3)


def test_hetero_only_options_need_depth_or_width(tmp_path, checkpoints):
    assert_rejected(tmp_path, base_config(options={"where": "end"}), "options.where: applies only to depth/width")
    assert_rejected(tmp_path, base_config(options={"width": "wide"}), "options.width: must be 'max', 'min'")
    assert_rejected(tmp_path, base_config(options={"depth": "deep"}),
                     "options.depth: Input should be 'lma', 'sma' or 'uniform'")
    assert_rejected(tmp_path, base_config(options={"depth": "lma", "stop_at": "x"}),
                     "options.stop_at: partial zipping cannot be combined with depth/width")
