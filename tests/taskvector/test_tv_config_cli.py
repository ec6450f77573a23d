"""YAML config validation, per-layer gradients and name filters, and the ``merge-tv`` click command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from tv_refs import make_models

from fxmerge.cli import main
from fxmerge.errors import ConfigError
from fxmerge.taskvector import load_tv_config, merge_from_config, merge_task_vectors
from fxmerge.taskvector.params import Param, layer_position


def _files(tmp_path: Path, n: int = 2) -> tuple[dict, list[dict]]:
    base, models = make_models(n_models=n, seed=30)
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, m in enumerate(models):
        save_file(m, str(tmp_path / f"m{i}.safetensors"))
    return base, models


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return p


def test_gradient_and_filter_resolution() -> None:
    assert layer_position("blocks.1.fc.weight", 3) == 0.5 and layer_position("emb.weight", 3) == 0.0
    grad = Param.of("density", [1.0, 0.5, 0.2])
    assert grad.at("blocks.0.fc.weight", 3) == 1.0
    assert grad.at("blocks.1.fc.weight", 3) == pytest.approx(0.5)
    assert grad.at("blocks.2.x", 5) == pytest.approx(0.5)  # t = 0.5 of 5 layers
    assert grad.at("blocks.3.x", 5) == pytest.approx(0.35)  # t = 0.75 -> halfway between 0.5 and 0.2
    filt = Param.of("weight", [{"filter": "proj", "value": 0.6}, {"filter": "*", "value": [0.0, 1.0]}])
    assert filt.at("blocks.1.proj.weight", 2) == 0.6
    assert filt.at("blocks.1.fc.weight", 2) == 1.0


def test_config_merge_equals_api_with_gradients_and_filters(tmp_path: Path) -> None:
    base, models = _files(tmp_path)
    cfg = load_tv_config(_write(tmp_path, """
merge_method: ties
base_model: base.safetensors
models:
  - model: base.safetensors
  - model: m0.safetensors
    parameters: {weight: 0.7, density: [0.9, 0.3]}
  - model: m1.safetensors
    parameters:
      weight: [{filter: proj, value: 2.0}, {value: 0.5}]
parameters: {lambda: 1.3, density: 0.6}
out_dtype: bfloat16
"""))
    state, report = merge_from_config(cfg, tmp_path / "out")
    expected = merge_task_vectors(base, models, method="ties", lam=1.3, out_dtype="bfloat16",
                                  weights=[0.7, [{"filter": "proj", "value": 2.0}, {"value": 0.5}]],
                                  density=[[0.9, 0.3], 0.6])
    assert report.n_models == 2 and report.out_dir == str(tmp_path / "out")
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


def test_fusionbench_aliases(tmp_path: Path) -> None:
    base, models = _files(tmp_path)
    cfg = load_tv_config(_write(tmp_path, """
merge_method: dare_linear
base_model: base.safetensors
models: [{model: m0.safetensors}, {model: m1.safetensors}]
parameters: {scaling_factor: 0.3, sparsity_ratio: 0.75}
seed: 5
"""))
    state, _ = merge_from_config(cfg, None)
    expected = merge_task_vectors(base, models, method="dare_linear", lam=0.3, density=0.25, seed=5)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("text", "field"), [
    ("merge_method: tiez\nbase_model: b\nmodels: [{model: m}]\n", "merge_method: unknown method 'tiez'"),
    ("merge_method: ties\nmodels: [{model: m}]\n", "base_model: Field required"),
    ("merge_method: ties\nbase_model: b\nmodels: []\n", "models: List should have at least 1 item"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m, parameters: {gamma: 0.1}}]\n",
     "models[0].parameters: only ['weight', 'density'] can be set per model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m, parameters: {density: abc}}]\n", "models[0].parameters"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m}]\nparameters: {lamda: 1}\n", "parameters: unknown key(s) ['lamda']"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m}]\nout_dtype: float8\n", "out_dtype: unknown dtype"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m}]\ntokenizer_source: union\n", "tokenizer_source: Extra inputs"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: b}]\n", "every entry is the base_model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m}]\nshard_size: lots\n", "shard_size"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("merge_method: [unclosed\n", "not valid YAML"),
])
def test_config_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_tv_config(_write(tmp_path, text))
    assert field in str(info.value)


def test_config_value_errors_are_config_errors(tmp_path: Path) -> None:
    _files(tmp_path)
    cfg = load_tv_config(_write(tmp_path, """
merge_method: ties
base_model: base.safetensors
models: [{model: m0.safetensors, parameters: {density: 1.5}}]
"""))
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.density: density 1\.5 .* outside \(0, 1\]"):
        merge_from_config(cfg, tmp_path / "out")
    cfg2 = load_tv_config(_write(tmp_path, """
merge_method: ties
base_model: base.safetensors
models: [{model: m0.safetensors}]
parameters: {consensus: majority}
"""))
    with pytest.raises(ConfigError, match="consensus: 'majority' is not one of"):
        merge_from_config(cfg2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _cli(*args: str):
    return CliRunner().invoke(main, ["merge-tv", *args])


def test_cli_json_quiet_and_progress(tmp_path: Path) -> None:
    _files(tmp_path)
    cfg = _write(tmp_path, "merge_method: dppa\nbase_model: base.safetensors\n"
                           "models: [{model: m0.safetensors}, {model: m1.safetensors}]\nparameters: {density: 0.3}\n")
    res = _cli(str(cfg), str(tmp_path / "o1"), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["ok"] is True and summary["method"] == "dppa" and summary["n_models"] == 2
    assert summary["shards"] == ["model.safetensors"]
    res = _cli(str(cfg), str(tmp_path / "o2"), "--quiet")
    assert res.exit_code == 0 and res.stdout == ""
    res = _cli(str(cfg), str(tmp_path / "o3"))
    assert res.exit_code == 0 and "merged 2 model(s) with dppa" in res.stdout
    assert "merge-tv" in res.stderr  # the tqdm bar
    res = _cli(str(cfg), str(tmp_path / "o3"))
    assert res.exit_code == 2 and "not empty; pass --overwrite" in res.stderr and "overwrite=True" not in res.stderr
    res = _cli(str(cfg), str(tmp_path / "o3"), "--overwrite", "--seed", "4", "-q")
    assert res.exit_code == 0


def test_cli_reports_bad_config(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "merge_method: ties\nbase_model: nowhere.safetensors\nmodels: [{model: m.safetensors}]\n")
    res = _cli(str(cfg), str(tmp_path / "out"))
    assert res.exit_code == 2 and "does not exist" in res.stderr  # a missing input: bad input, exit 2
    res = _cli(str(tmp_path / "missing.yaml"), str(tmp_path / "out"))
    assert res.exit_code == 2 and "error: cannot read config" in res.stderr  # a config problem: exit 2, like merge
    res = _cli(str(cfg), str(tmp_path / "out"), "--json")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and "does not exist" in doc["error"] and doc["error_type"] == "TaskVectorError"
    assert not (tmp_path / "out").exists()
