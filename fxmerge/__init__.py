"""fxmerge: a PyTorch FX graph-transformation compiler for training-free model merging."""

from fxmerge.capture.trace import CapturedGraph, capture
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
from fxmerge.export import export_onnx, load_program, load_state, save_program, save_state
from fxmerge.infer.api import infer_groups
from fxmerge.infer.registry import rule
from fxmerge.ir.report import CoverageReport
from fxmerge.ir.spec import Group, PermutationSpec
from fxmerge.merge import MergeResult, merge
from fxmerge.taskvector import merge_task_vectors
from fxmerge.verify import InvarianceReport, verify_invariance

__version__ = "0.1.0"

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
    "UnsupportedOpsError",
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
