"""Real data for the merge examples: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

Nothing is downloaded: the images ship with scikit-learn. :func:`load_digits_split` gives a stratified
train/test split, images as float32 ``[N, 1, 8, 8]`` standardised with the TRAIN mean/std, and the disjoint
tasks the merge examples train one model each on (by default digits 0-4 and 5-9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fxmerge.errors import MergeError

NUM_CLASSES = 10
DEFAULT_TASKS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train/test split of the digits, plus the class subsets ("tasks") models are trained on.

    ``*_images`` are float32 ``[N, 1, 8, 8]``, ``*_labels`` int64 ``[N]`` with the original digit (0-9).
    ``mean``/``std`` are the training-pixel statistics used to standardise both parts.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    tasks: tuple[tuple[int, ...], ...]
    mean: float
    std: float

    def arrays(self, split: str = "train", task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of ``split`` ("train" or "test"), restricted to task ``task`` (``None``: all)."""
        if split not in ("train", "test"):
            raise MergeError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = (
            (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        )
        if task is None:
            return images, labels
        if not 0 <= task < len(self.tasks):
            raise MergeError(f"task must be None or an index in [0, {len(self.tasks)}), got {task!r}")
        keep = torch.isin(labels, torch.tensor(self.tasks[task]))
        return images[keep], labels[keep]

    def loader(
        self,
        split: str = "train",
        task: int | None = None,
        batch_size: int = 64,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        """A ``DataLoader`` of ``(image, label)`` batches; shuffling draws its order from ``generator``.

        Shuffling requires an explicit ``generator`` so that runs are reproducible without global RNG state.
        """
        if batch_size < 1:
            raise MergeError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle and generator is None:
            raise MergeError("shuffle=True needs an explicit generator=torch.Generator().manual_seed(...)")
        images, labels = self.arrays(split, task)
        return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, generator=generator)


def _check_tasks(tasks: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    checked = tuple(tuple(int(c) for c in task) for task in tasks)
    if not checked:
        raise MergeError("tasks must list at least one class subset, e.g. ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))")
    for task in checked:
        if not task or len(set(task)) != len(task) or not all(0 <= c < NUM_CLASSES for c in task):
            raise MergeError(f"each task must be a non-empty list of distinct digits in 0-9, got {task!r}")
    return checked


def stratified_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (train, test) index arrays with ``round(n_c * test_fraction)`` test items
    per class ``c``; both arrays are sorted. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_split(
    *, seed: int = 0, test_fraction: float = 0.25, tasks: Sequence[Sequence[int]] = DEFAULT_TASKS
) -> DigitsSplit:
    """Load the digits and split them stratified by class into train/test, deterministically in ``seed``.

    Pixels (0-16) are scaled to [0, 1] and standardised with the training mean/std. ``tasks`` are the class
    subsets the merge examples train separate models on (default: 0-4 and 5-9).
    """
    if not 0.0 < test_fraction < 1.0:
        raise MergeError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_indices(labels, test_fraction, seed)
    mean, std = float(pixels[train_idx].mean()), float(pixels[train_idx].std())

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy((pixels[idx] - mean) / std).unsqueeze(1).contiguous()
        return images, torch.from_numpy(labels[idx])

    (train_x, train_y), (test_x, test_y) = tensors(train_idx), tensors(test_idx)
    return DigitsSplit(train_x, train_y, test_x, test_y, _check_tasks(tasks), mean, std)
