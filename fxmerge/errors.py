"""The fxmerge error tree. Every error a user can see derives from :class:`FxmergeError`.

Errors about what the user gave (arguments, configs, paths, model and data references and what their code
raises, input files) also derive from :class:`InputError`; the command line exits with status 2 for them and
with status 1 for every other error (the work itself failed: merge, export check, invariance).
"""

from __future__ import annotations


class FxmergeError(Exception):
    """Base class of every error fxmerge raises on purpose."""


class InputError(FxmergeError):
    """What the user gave is invalid: an argument, a config, a path, a reference, an input file."""


class UserCodeError(InputError):
    """Code named by a reference (``package.module:callable``) failed to import, or raised when called."""


class OutputPathError(InputError):
    """An output path is unusable: it overlaps an input, holds files fxmerge did not write, or is not writable."""


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
    """A merge failed, or cannot use the models, data or options it was given."""


class ExportError(FxmergeError):
    """Export failed, or the exported program disagrees with PyTorch."""

    def __init__(self, message: str, max_abs_diff: float | None = None, max_rel_diff: float | None = None) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.max_rel_diff = max_rel_diff


class MergeInputError(MergeError, InputError):
    """The models or options given to a merge are invalid (dtype, device, option type)."""


class ExportInputError(ExportError, InputError):
    """An argument of an export or save function is invalid (tolerance, suffix, inputs)."""


class ExportPathError(ExportInputError, OutputPathError):
    """The output file of an export or save function is unusable (see :class:`OutputPathError`)."""


class ConfigError(InputError):
    """A YAML/py config is invalid; the message names the field."""


class TaskVectorError(InputError):
    """Inputs to a task-vector merge are invalid (missing or corrupt files, shapes, NaNs, options)."""


class TaskVectorPathError(TaskVectorError, OutputPathError):
    """The output folder of a task-vector merge is unusable (see :class:`OutputPathError`)."""
