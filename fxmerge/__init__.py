"""fxmerge: a PyTorch FX graph-transformation compiler for training-free model merging.

The public names below are imported on first use, so ``import fxmerge.taskvector`` (or the ``merge-tv``
command) does not pay for the graph stack (torchvision/timm rules, ONNX exporter) it never touches.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from fxmerge.errors import (
    CaptureError,
    ConfigError,
    ExportError,
    FxmergeError,
    InvarianceError,
    MergeError,
    SpecError,
    TaskVectorError,
    UnsupportedOpsError,
)

__version__ = "0.1.0"

_LAZY = {
    "CapturedGraph": "fxmerge.capture.trace",
    "capture": "fxmerge.capture.trace",
    "export_onnx": "fxmerge.export",
    "load_program": "fxmerge.export",
    "load_state": "fxmerge.export",
    "save_program": "fxmerge.export",
    "save_state": "fxmerge.export",
    "infer_groups": "fxmerge.infer.api",
    "rule": "fxmerge.infer.registry",
    "CoverageReport": "fxmerge.ir.report",
    "Group": "fxmerge.ir.spec",
    "PermutationSpec": "fxmerge.ir.spec",
    "MergeResult": "fxmerge.merge",
    "merge": "fxmerge.merge",
    "merge_task_vectors": "fxmerge.taskvector",
    "InvarianceReport": "fxmerge.verify",
    "UnsoundGroupWarning": "fxmerge.gate",
    "VerificationRecord": "fxmerge.gate",
    "verify_invariance": "fxmerge.verify",
}

if TYPE_CHECKING:
    from fxmerge.capture.trace import CapturedGraph, capture
    from fxmerge.export import export_onnx, load_program, load_state, save_program, save_state
    from fxmerge.gate import UnsoundGroupWarning, VerificationRecord
    from fxmerge.infer.api import infer_groups
    from fxmerge.infer.registry import rule
    from fxmerge.ir.report import CoverageReport
    from fxmerge.ir.spec import Group, PermutationSpec
    from fxmerge.merge import MergeResult, merge
    from fxmerge.taskvector import merge_task_vectors
    from fxmerge.verify import InvarianceReport, verify_invariance


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """``fxmerge.merge`` and ``fxmerge.capture`` are both subpackages and public functions: when the import
    system binds the subpackage on the parent, keep the function name free for the lazy function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "CaptureError",
    "CapturedGraph",
    "ConfigError",
    "CoverageReport",
    "ExportError",
    "FxmergeError",
    "Group",
    "InvarianceError",
    "InvarianceReport",
    "MergeError",
    "MergeResult",
    "PermutationSpec",
    "SpecError",
    "TaskVectorError",
    "UnsoundGroupWarning",
    "UnsupportedOpsError",
    "VerificationRecord",
    "capture",
    "export_onnx",
    "infer_groups",
    "load_program",
    "load_state",
    "merge",
    "merge_task_vectors",
    "rule",
    "save_program",
    "save_state",
    "verify_invariance",
]
