"""Plots: the matching drawn on the similarity heatmaps, group/coverage and metric charts, valid PNG files."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch

import fxmerge
from fxmerge.errors import MergeError
from fxmerge.plots import (
    cross_block,
    frozen_reasons,
    plot_groups,
    plot_metrics,
    plot_similarity,
    write_merge_plots,
)
from tests.cli.conftest import parents
from tests.cli.tiny_models import IN_DIM, batches, make_mlp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def _merge(models, method: str):
    x = (torch.randn(2, IN_DIM),)
    return fxmerge.merge(models, method=method, data=batches(), example_inputs=x, progress=False)


def test_alignment_of_a_permuted_copy_puts_every_pair_on_the_diagonal():
    result = _merge(list(parents()), "rebasin")
    for detail in result.details.values():
        cb = cross_block(detail)
        assert cb.pairs == [(i, i) for i in range(detail.size)]
        np.testing.assert_allclose(np.diag(cb.after), 1.0, atol=1e-6)
        assert np.diag(cb.before).mean() < 0.9  # the copy was permuted: the identity pairs differ
        assert sorted(cb.column_order.tolist()) == list(range(detail.size))
        assert detail.after >= detail.before


def test_zip_of_three_models_marks_pairs_of_the_same_merged_unit():
    torch.manual_seed(5)
    result = _merge([make_mlp() for _ in range(3)], "zipit")
    detail = result.details["g0"]
    for a, b in [(0, 1), (0, 2), (2, 1)]:
        cb = cross_block(detail, a, b)
        ua, ub = detail.matching.assignment(a), detail.matching.assignment(b)[cb.column_order]
        assert cb.pairs == [(r, c) for r in range(len(ua)) for c in range(len(ub)) if ua[r] == ub[c] and ua[r] >= 0]
        np.testing.assert_array_equal(cb.after, cb.before[:, cb.column_order])
    with pytest.raises(MergeError, match="two different indices"):
        cross_block(detail, 1, 1)


def test_plot_files_are_pngs(tmp_path):
    result = _merge(list(parents()), "act_align")
    image = _png(plot_similarity(result.details["g1"], tmp_path / "deep" / "sim.png", title="t"))
    assert image.shape[1] > image.shape[0] > 200
    _png(plot_groups(result.spec, tmp_path / "groups.png"))
    metrics = {"average": {"acc": 0.4, "loss": 1.2}, "mudsc": {"acc": 0.8}}
    _png(plot_metrics(metrics, tmp_path / "metrics.png", title="accuracy across methods"))
    paths = write_merge_plots(result, tmp_path / "all", metrics=metrics, max_heatmaps=1)
    assert [p.name for p in paths] == ["groups.png", "similarity_summary.png", "similarity_g0.png", "metrics.png"]
    for p in paths:
        _png(p)
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_coverage_reasons_and_bad_metrics():
    spec = fxmerge.infer_groups(make_mlp(), (torch.randn(2, IN_DIM),))
    reasons = frozen_reasons(spec)
    assert sum(reasons.values()) == len(spec.coverage.frozen) == 3
    assert set(reasons) == {"model input", "model output"}
    with pytest.raises(MergeError, match="at least one entry"):
        plot_metrics({}, "unused.png")
    with pytest.raises(MergeError, match="no entry has any metric"):
        plot_metrics({"a": {}}, "unused.png")
