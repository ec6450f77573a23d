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
from fxmerge.infer.api import infer_groups
from fxmerge.infer.registry import rule
from fxmerge.ir.report import CoverageReport
from fxmerge.ir.spec import Group, PermutationSpec
from fxmerge.merge import MergeResult, merge
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
    "infer_groups",
    "merge",
    "rule",
    "verify_invariance",
]
