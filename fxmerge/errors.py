"""The fxmerge error tree. Every error a user can see derives from :class:`FxmergeError`."""

from __future__ import annotations


class FxmergeError(Exception):
    """Base class of every error fxmerge raises on purpose."""


class CaptureError(FxmergeError):
    """The model could not be captured as a graph by the requested frontend."""


class UnsupportedOpsError(FxmergeError):
    """The graph contains ops without a permutation rule (strict mode)."""

    def __init__(self, message: str, records: list | None = None) -> None:
        super().__init__(message)
        self.records = list(records or [])


class InvarianceError(FxmergeError):
    """Permuting a group changed the model's outputs: the group is not a symmetry."""

    def __init__(self, message: str, group: int | None = None, max_diff: float | None = None) -> None:
        super().__init__(message)
        self.group = group
        self.max_diff = max_diff


class SpecError(FxmergeError):
    """A permutation spec does not fit the model or permutation it is used with."""


class MergeError(FxmergeError):
    """Models, data or options given to a merge are invalid."""


class ExportError(FxmergeError):
    """Export failed, or the exported program disagrees with PyTorch."""

    def __init__(self, message: str, max_abs_diff: float | None = None, max_rel_diff: float | None = None) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.max_rel_diff = max_rel_diff


class ConfigError(FxmergeError):
    """A YAML/py config is invalid; the message names the field."""


class TaskVectorError(FxmergeError):
    """Inputs to a task-vector merge are invalid (missing files, shapes, NaNs, options)."""
