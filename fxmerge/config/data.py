"""The ``data:`` section: iterables of input batches for activation statistics, BN reset and REPAIR."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from fxmerge.config.refs import call_user, describe, import_callable
from fxmerge.config.schema import DataConfig, DigitsData, ImageFolderData
from fxmerge.errors import ConfigError, FxmergeError, UserCodeError


def build_data(cfg: DataConfig | None) -> Iterable[Any] | None:
    """The batches ``cfg`` describes (``None`` without a ``data:`` section). Each pass re-reads the source."""
    if cfg is None:
        return None
    if cfg.digits is not None:
        return digits_loader(cfg.digits)
    if cfg.image_folder is not None:
        return image_folder_loader(cfg.image_folder)
    assert cfg.callable is not None
    return callable_batches(cfg.callable)


def digits_loader(cfg: DigitsData) -> DataLoader:
    """``(images [B, 1, 8, 8], labels)`` batches of the chosen digits (standardised, see fxmerge.data.digits)."""
    from fxmerge.data.digits import load_digits_split

    split = load_digits_split(seed=cfg.seed, tasks=(tuple(cfg.classes),))
    images, labels = split.arrays(cfg.split, 0)
    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    return DataLoader(TensorDataset(images, labels), batch_size=cfg.batch_size, shuffle=False)


def image_folder_loader(cfg: ImageFolderData) -> DataLoader:
    """``(images [B, 3, size, size], labels)`` batches: resize, center crop, normalise with ``mean``/``std``."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(cfg.size),
        transforms.CenterCrop(cfg.size),
        transforms.ToTensor(),
        transforms.Normalize(cfg.mean, cfg.std),
    ])  # fmt: skip
    try:
        dataset: Any = datasets.ImageFolder(cfg.path, transform=tf)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"data.image_folder.path: {exc}") from exc
    if cfg.limit is not None and cfg.limit < len(dataset):
        idx = torch.linspace(0, len(dataset) - 1, cfg.limit).round().long().unique().tolist()
        dataset = Subset(dataset, idx)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)


class _Reiterable:
    """Iterates a user function's result; a one-shot iterator is replaced by a fresh call on the next pass.
    Whatever the user's code raises (the call, or producing a batch) is a UserCodeError naming ``field``."""

    def __init__(self, fn: Callable[[], Any], ref: str, field: str) -> None:
        self.fn, self.ref, self.field = fn, ref, field
        self._first: Any = self._call()

    def __iter__(self) -> Iterator[Any]:
        data, self._first = (self._first if self._first is not None else self._call()), None
        it = iter(data)
        if it is not data:  # re-iterable (a list, a DataLoader): keep it for the next pass
            self._first = data
        return self._guarded(it)

    def _call(self) -> Any:
        data = call_user(self.fn, self.ref, self.field)
        if isinstance(data, (torch.Tensor, Mapping)):
            return [data]  # a single batch
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise ConfigError(f"{self.field}: {self.ref}() returned a {type(data).__name__}, not an iterable of "
                              "batches")  # fmt: skip
        return data

    def _guarded(self, it: Iterator[Any]) -> Iterator[Any]:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except FxmergeError:
                raise
            except Exception as exc:
                raise UserCodeError(f"{self.field}: iterating {self.ref}() raised {describe(exc)}") from exc
            yield batch


def callable_batches(ref: str, field: str = "data.callable") -> Iterable[Any]:
    """The batches returned by ``ref`` (``package.module:fn``); fn is called again for each pass over a
    one-shot iterator (a generator). Errors name ``field``."""
    try:
        fn = import_callable(ref)
    except ValueError as exc:
        raise UserCodeError(f"{field}: {exc}") from exc
    return _Reiterable(fn, ref, field)
