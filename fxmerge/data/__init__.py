"""Datasets for fxmerge's examples and tests (bundled with their libraries; nothing is downloaded)."""

from fxmerge.data.digits import DEFAULT_TASKS, DigitsSplit, load_digits_split, stratified_indices

__all__ = ["DEFAULT_TASKS", "DigitsSplit", "load_digits_split", "stratified_indices"]
