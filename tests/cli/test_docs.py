"""The user docs stay true: docs/cli.md is generated from the CLI, and every python snippet of
getting_started.md, methods.md and testing.md runs and prints the text block shown under it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.cli.snippets import BLOCK, ROOT, check_doc


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    text = _gen_cli().render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python docs/gen_cli.py"
    for command in ("inspect", "verify", "merge", "export", "merge-tv"):
        assert f"## `fxmerge {command}`" in text
    assert "### `data.image_folder`" in text and "| `max_batches` |" in text
    assert "## The contract" in text and "| `2` | invalid input" in text and "| `1` | the work failed" in text


@pytest.mark.parametrize("doc", [pytest.param("getting_started.md", marks=pytest.mark.slow), "methods.md", "testing.md"])
def test_doc_snippets_print_what_the_doc_shows(doc: str, tmp_path: Path):
    # a scratch copy of the example configs: snippets write runs/... relative to the working folder
    shutil.copytree(ROOT / "examples" / "configs", tmp_path / "examples" / "configs")
    check_doc(doc, tmp_path)


def test_getting_started_shows_the_example_config_verbatim():
    text = (ROOT / "docs" / "getting_started.md").read_text()
    config = (ROOT / "examples" / "configs" / "digits_mlp.yaml").read_text()
    assert any(kind == "yaml" and body == config for kind, body in BLOCK.findall(text))
