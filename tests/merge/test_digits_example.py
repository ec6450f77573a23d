"""``examples/digits_merge.py`` and ``examples/demo.py`` in tiny configurations (width 4-8, 1 epoch).

The models are barely trained, so only the plumbing is checked: every row of the tables is present, every
accuracy is a finite fraction, the output files are written, and the exported ONNX file agrees with PyTorch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_fractions(scores: dict[str, dict[str, float]]) -> None:
    for row, metrics in scores.items():
        for metric, value in metrics.items():
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (row, metric, value)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, str]:
    dm = load_example("digits_merge")
    out = tmp_path_factory.mktemp("digits_merge")
    argv = [
        "--kinds",
        "mlp",
        "resnet_bn",
        "resnet_gn",
        "vit",
        "--width",
        "4",
        "--seeds",
        "3",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    assert dm.main(argv) == 0
    return dm, out, " ".join(argv)


def test_digits_merge_writes_every_row_for_every_kind(digits_run: tuple[ModuleType, Path, str]) -> None:
    dm, out, _ = digits_run
    raw = json.loads((out / "results" / "digits_merge.json").read_text())
    assert sorted(raw) == sorted(["mlp", "resnet_bn", "resnet_gn", "vit"])
    for runs in raw.values():
        assert [r["seed"] for r in runs] == [3]
        for r in runs:
            assert list(r["scores"]) == list(dm.ROWS)
            assert_fractions(r["scores"])
            assert set(r["merge_s"]) == {label for label, _, _ in dm.METHODS}


def test_digits_merge_markdown_and_plot(digits_run: tuple[ModuleType, Path, str]) -> None:
    dm, out, argv = digits_run
    text = (out / "results" / "digits_merge.md").read_text()
    assert argv in text
    assert text.count("| MuDSC zip | ") == 4 and text.count("| ensemble | ") == 4
    for row in dm.ROWS:
        assert f"| {row} | " in text
    png = (out / "img" / "digits_merge.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def fake_run(dm: ModuleType, seed: int, joint: float) -> object:
    scores = {row: {"task_0": 0.5, "task_1": 0.25, "joint": joint, "avg_task": 0.375} for row in dm.ROWS}
    return dm.KindRun("mlp", 4, seed, scores, 1.0, {})


def test_digits_merge_tables_single_and_several_seeds() -> None:
    dm = load_example("digits_merge")
    one = dm.format_table("title", dm.summarize([fake_run(dm, 0, 0.125)]), 1)
    assert one.splitlines()[0] == "title"
    assert all(row in one for row in dm.ROWS) and "±" not in one
    assert "50.0" in one and "25.0" in one and "12.5" in one
    summary = dm.summarize([fake_run(dm, 0, 0.1), fake_run(dm, 1, 0.3)])
    mean, std = summary["MuDSC zip"]["joint"]
    assert mean == pytest.approx(20.0) and std == pytest.approx(math.sqrt(200.0))  # sample std of 10, 30
    two = dm.markdown_table(summary, 2)
    assert "| MuDSC zip | 50.0 ± 0.0 | 25.0 ± 0.0 | 20.0 ± 14.1 |" in two


def test_demo_trains_merges_exports_and_verifies(tmp_path: Path) -> None:
    demo = load_example("demo")
    lines: list[str] = []
    result = demo.run_demo(tmp_path, kind="mlp", width=8, epochs=1, progress=False, log=lines.append)
    assert list(result.scores) == [
        "model A",
        "model B",
        "ensemble (2x compute)",
        "weight average",
        "MuDSC merge (zip)",
    ]
    assert_fractions(result.scores)
    assert result.onnx["max_abs_diff"] <= result.onnx["atol"]
    assert Path(result.onnx["path"]) == tmp_path / "merged.onnx" and (tmp_path / "merged.onnx").is_file()
    # the ONNX file classifies the 450 test images like PyTorch (one flip allowed for float round-off)
    assert abs(result.onnx["joint_accuracy"] - result.scores["MuDSC merge (zip)"]["joint"]) <= 1 / 450 + 1e-9
    assert any(line.startswith("[4/4]") for line in lines)
    table = demo.format_table(result.scores)
    assert all(row in table for row in result.scores)
    paths = demo.save(result, tmp_path, "python examples/demo.py --tiny")
    saved = json.loads(paths[0].read_text())
    assert saved["scores"] == result.scores and saved["merge"]["method"] == "mudsc"
    assert "| MuDSC merge (zip) |" in paths[1].read_text()


def test_digits_merge_rows_option_rejects_an_unknown_row(tmp_path: Path) -> None:
    dm = load_example("digits_merge")
    with pytest.raises(SystemExit, match=r"unknown row\(s\) \['nope'\]"):
        dm.main(["--kinds", "mlp", "--seeds", "0", "--rows", "Git Re-Basin", "nope", "--out", str(tmp_path)])
    assert not (tmp_path / "results").exists()  # refused before any training or output
