"""docs/normalisation.md: every python snippet runs and prints the text block shown under it."""

from __future__ import annotations

from pathlib import Path

from tests.cli.snippets import check_doc


def test_normalisation_doc_snippets(tmp_path: Path) -> None:
    check_doc("normalisation.md", tmp_path)
