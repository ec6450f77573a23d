"""fxmerge.data.digits: split sizes, stratification, normalisation, determinism, task views and loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fxmerge.data import DEFAULT_TASKS, load_digits_split, stratified_indices
from fxmerge.errors import MergeError

COUNTS = np.bincount(load_digits().target)  # per-class totals of the bundled data set


@pytest.fixture(scope="module")
def split():
    return load_digits_split(seed=0)


def test_sizes_shapes_and_dtypes(split) -> None:
    expected_test = sum(round(n * 0.25) for n in COUNTS)  # stratified rounding, class by class
    assert COUNTS.sum() == 1797 and expected_test == 450
    assert split.test_images.shape == (expected_test, 1, 8, 8)
    assert split.train_images.shape == (1797 - expected_test, 1, 8, 8)
    assert split.train_images.dtype == torch.float32 and split.train_labels.dtype == torch.int64
    assert split.tasks == DEFAULT_TASKS == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_is_stratified(fraction: float) -> None:
    data = load_digits_split(seed=3, test_fraction=fraction)
    test_counts = np.bincount(data.test_labels.numpy(), minlength=10)
    train_counts = np.bincount(data.train_labels.numpy(), minlength=10)
    np.testing.assert_array_equal(test_counts, [round(n * fraction) for n in COUNTS])
    np.testing.assert_array_equal(train_counts + test_counts, COUNTS)


def test_indices_partition_the_data_and_images_match_sklearn(split) -> None:
    labels = load_digits().target
    train, test = stratified_indices(labels, 0.25, seed=0)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    np.testing.assert_array_equal(split.test_labels.numpy(), labels[test])
    # Undo the standardisation by hand: pixel / 16 == image * std + mean.
    raw = load_digits().images[train].astype(np.float32) / 16.0
    restored = split.train_images[:, 0].numpy() * split.std + split.mean
    np.testing.assert_allclose(restored, raw, atol=1e-5)
    assert split.mean == pytest.approx(float(raw.mean()), rel=1e-6)


def test_training_pixels_are_standardised(split) -> None:
    assert float(split.train_images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(split.train_images.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_split_is_deterministic_in_seed(split) -> None:
    again, other = load_digits_split(seed=0), load_digits_split(seed=1)
    assert torch.equal(again.train_images, split.train_images) and torch.equal(again.test_labels, split.test_labels)
    assert not torch.equal(other.test_images, split.test_images)
    # Different seed, same class counts.
    assert torch.equal(torch.bincount(other.test_labels), torch.bincount(split.test_labels))


def test_task_views_hold_only_their_classes(split) -> None:
    for index, classes in enumerate(split.tasks):
        for part, labels in (("train", split.train_labels), ("test", split.test_labels)):
            images, task_labels = split.arrays(part, index)
            assert set(task_labels.tolist()) == set(classes)
            assert len(images) == len(task_labels) == int(sum((labels == c).sum() for c in classes))
    custom = load_digits_split(tasks=[(0, 2), (1, 3, 5)])
    assert set(custom.arrays("test", 1)[1].tolist()) == {1, 3, 5}


def test_loader_batches_and_seeded_shuffle(split) -> None:
    batches = list(split.loader("test", 0, batch_size=100))
    assert [len(b[0]) for b in batches] == [100, 100, len(split.arrays("test", 0)[0]) - 200]
    assert torch.equal(torch.cat([b[1] for b in batches]), split.arrays("test", 0)[1])

    def order(seed: int) -> torch.Tensor:
        loader = split.loader("train", None, 64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return torch.cat([labels for _, labels in loader])

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    assert torch.equal(order(5).sort().values, split.train_labels.sort().values)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: load_digits_split(test_fraction=1.0), "test_fraction"),
        (lambda s: load_digits_split(tasks=[(0, 10)]), "distinct digits in 0-9"),
        (lambda s: load_digits_split(tasks=[]), "at least one"),
        (lambda s: s.arrays("val"), "'train' or 'test'"),
        (lambda s: s.arrays("train", 2), r"index in \[0, 2\)"),
        (lambda s: s.loader("train", 0, 64, shuffle=True), "explicit generator"),
        (lambda s: s.loader("train", 0, 0), "batch_size"),
    ],
)
def test_invalid_options_raise_merge_error(split, call, match: str) -> None:
    with pytest.raises(MergeError, match=match):
        call(split)
