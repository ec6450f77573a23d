"""Invalid configs: the message names the YAML field, the exit status is 2, and nothing is created."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from fxmerge.cli import main
from fxmerge.config import load_merge_config, parse_merge_config, run_merge_config
from fxmerge.errors import ConfigError
from tests.cli.conftest import MLP, assert_rejected, base_config, write_yaml


def test_unknown_method_lists_the_valid_ones(tmp_path, checkpoints):
    assert_rejected(tmp_path, base_config(method="zipt"), "method: unknown method 'zipt'",
                     "average, rebasin, act_align, zipit, wzip, mudsc", "did you mean 'zipit'")


def test_missing_checkpoint_names_the_entry_and_the_file(tmp_path, checkpoints):
    cfg = base_config()
    cfg["models"][1]["checkpoint"] = "missing.pt"
    assert_rejected(tmp_path, cfg, "models[1].checkpoint: file not found:", str(tmp_path / "missing.pt"))


def test_missing_model_module_and_bad_reference(tmp_path, checkpoints):
    cfg = base_config()
    cfg["models"][0]["model"] = "no_such_pkg.models:build"
    cfg["models"][1]["model"] = "resnet18"
    assert_rejected(tmp_path, cfg, "models[0].model: cannot import module 'no_such_pkg.models'",
                     "models[1].model: 'resnet18' must look like torchvision:NAME")


def test_torchvision_typo_suggests_names(tmp_path, checkpoints):
    cfg = base_config()
    cfg["models"][0]["model"] = "torchvision:resnet19"
    assert_rejected(tmp_path, cfg, "models[0].model: torchvision has no model 'resnet19'", "resnet18")


@pytest.mark.parametrize(("options", "fragment"), [
    ({"alpha": "high"}, "options.alpha: Input should be a valid number"),
    ({"alpha": 1.5}, "options.alpha: Input should be less than or equal to 1"),
    ({"max_batches": 0}, "options.max_batches: Input should be greater than or equal to 1"),
    ({"matcher": "hungarian"}, "options.matcher: Input should be 'align' or 'zip'"),
    ({"seed": [1]}, "options.seed: Input should be a valid integer"),
])  # fmt: skip
def test_wrong_types_name_the_option(tmp_path, checkpoints, options, fragment):
    assert_rejected(tmp_path, base_config(method="mudsc", options=options), fragment)


def test_an_option_of_another_method_is_named_with_its_owners(tmp_path, checkpoints):
    assert_rejected(tmp_path, base_config(options={"alpha": 0.3}),  # act_align has no alpha
                    "options.alpha: not a setting of method 'act_align'; it is a setting of zipit, wzip, mudsc")


def test_unknown_keys_list_the_allowed_ones(tmp_path, checkpoints):
    cfg = base_config(optoins={"alpha": 0.2})
    cfg["models"][0]["chekpoint"] = "a.pt"
    cfg["outputs"] = {"onnx_file": True}
    output = assert_rejected(tmp_path, cfg, "optoins: unknown key 'optoins'", "did you mean 'options'",
                              "models[0].chekpoint: unknown key", "allowed: model, checkpoint, input_shape",
                              "outputs.onnx_file: unknown key")
    assert output.count("unknown key") == 3 and output.count("\n") == 1  # every problem at once, on one line


def test_data_section_shape_and_cross_field_rules(tmp_path, checkpoints):
    both = base_config(data={"callable": "tests.cli.tiny_models:batches", "digits": {"classes": [1, 2]}})
    assert_rejected(tmp_path, both, "data: give exactly one of digits, image_folder, callable")
    bad_digits = base_config(data={"digits": {"classes": [3, 3, 12], "batch_size": "big"}})
    assert_rejected(tmp_path, bad_digits, "data.digits.classes: must be distinct digits in 0-9",
                     "data.digits.batch_size: Input should be a valid integer")
    assert_rejected(tmp_path, base_config(method="zipit", data=None), "data: method 'zipit' needs data")
    repair = base_config(method="zipit", options={"repair": True})
    assert_rejected(tmp_path, repair, "options.repair: needs a one-to-one matching")
    folder = base_config(data={"image_folder": {"path": "no_images"}})
    assert_rejected(tmp_path, folder, "data.image_folder.path: folder not found")
    evaluate = base_config(evaluate="tests.cli.tiny_models:nothing_here")
    assert_rejected(tmp_path, evaluate, "evaluate: module 'tests.cli.tiny_models' has no attribute 'nothing_here'")


def test_too_few_models_missing_fields_and_bad_yaml(tmp_path, checkpoints):
    assert_rejected(tmp_path, {"models": [{"model": MLP}]}, "models: List should have at least 2 items",
                     "method: required field is missing")
    assert_rejected(tmp_path, "- just\n- a list\n", "the top level must be a mapping")
    assert_rejected(tmp_path, "models: [\n", "is not valid YAML")
    assert_rejected(tmp_path, base_config(input_shape="2,x"), "input_shape: '2,x' is not a list of integers")
    assert_rejected(tmp_path, base_config(outputs={"checkpoint": False, "report": False, "plots": False}),
                     "outputs: every output is switched off")


def test_checkpoint_that_does_not_fit_fails_before_writing(tmp_path, checkpoints):
    torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    cfg = base_config()
    cfg["models"][1]["checkpoint"] = "wrong.pt"
    assert_rejected(tmp_path, cfg, "models[1].checkpoint:", "does not match Sequential", "missing keys")


def test_non_empty_out_is_kept_without_overwrite(tmp_path, checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["merge", str(write_yaml(tmp_path, base_config())), "--out", str(out)])
    assert result.exit_code == 2 and "exists and is not empty; pass --overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_json_failure_is_one_document_on_stdout(tmp_path, checkpoints):
    runner = CliRunner()
    result = runner.invoke(main, ["--json", "merge", str(write_yaml(tmp_path, base_config(method="x"))), "--out",
                                  str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2
    import json

    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error_type"] == "ConfigError" and "method: unknown method" in doc["error"]


def test_python_api_raises_config_error_naming_the_field(tmp_path, checkpoints):
    with pytest.raises(ConfigError, match=r"models\[1\]\.checkpoint: file not found"):
        parse_merge_config({**base_config(), "models": [{"model": MLP}, {"model": MLP, "checkpoint": "x.pt"}]},
                           root=tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match="cannot read config"):
        load_merge_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="method: unknown method"):
        run_merge_config({**base_config(), "method": "nope"}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
