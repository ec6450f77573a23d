"""Export and saving of (merged) models.

* :func:`export_onnx`: ONNX file verified in onnxruntime against PyTorch (:class:`ExportReport`);
* :func:`save_program` / :func:`load_program`: a runnable ``torch.export`` program (``.pt2``);
* :func:`save_state` / :func:`load_state`: safetensors weights plus a JSON sidecar naming the constructor.

Every writer stages its output next to the target and moves it into place only when complete, and works on
a copy of the model (or only reads it), so the caller's model and any existing file survive a failure.
"""

from fxmerge.export._compare import CheckResult
from fxmerge.export._onnx import ExportReport, export_onnx
from fxmerge.export._program import ProgramModule, load_program, save_program
from fxmerge.export._state import load_state, save_state, sidecar_path

__all__ = [
    "CheckResult",
    "ExportReport",
    "ProgramModule",
    "export_onnx",
    "load_program",
    "load_state",
    "save_program",
    "save_state",
    "sidecar_path",
]
