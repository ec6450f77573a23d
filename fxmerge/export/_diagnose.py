"""Turning torch exporter failures into a message that names the blocking op, its module and a fix."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from fxmerge.outputs import name

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"Exporting the operator '([\w:.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"\b(aten_\w+) with\b"),
)
_USER_CODE = re.compile(
    r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)'
)
_MAX_SUMMARY = 400


def clean(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def summary(exc: BaseException) -> str:
    """One line describing ``exc``: the exporter's own exception summary when it has one."""
    text = clean(str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in text:
        after = text.split("## Exception summary", 1)[1].splitlines()
        first = next((line.strip() for line in after if line.strip().startswith("<class")), None)
        if first:
            return _shorten(re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", first))
    return _shorten(f"{type(exc).__name__}: {lines[0] if lines else ''}")


def blocking_op(texts: Sequence[str]) -> str | None:
    """The ATen/custom op an exporter error blames, normalised to ``namespace.op`` (e.g. ``aten.kthvalue``)."""
    for pattern in _OP_PATTERNS:
        for text in texts:
            match = pattern.search(clean(text))
            if match:
                return normalize_op(match.group(1))
    return None


def normalize_op(name: str) -> str:
    """``aten::foo``, ``aten.foo.default``, ``aten_foo`` -> ``aten.foo``."""
    name = name.replace("::", ".")
    if name.startswith("aten_") and "." not in name:
        name = "aten." + name[len("aten_") :]
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else name


def user_code(texts: Sequence[str]) -> str | None:
    """``file:line in function: code`` of the user line torch.export blamed, when it says."""
    for text in texts:
        match = _USER_CODE.search(clean(text))
        if match:
            path, line, func, code = match.groups()
            return f"{path}:{line} in {func}: {code.strip()}"
    return None


def locate_op(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], op: str, prefix: str = "model"
) -> list[str]:
    """Submodules (``path (Class)``) whose forward calls ``op``, found by capturing ``module`` with torch.export.

    ``prefix`` is the attribute under which the user's model sits inside ``module``; it is stripped from paths.
    Returns an empty list when the capture itself fails.
    """
    try:
        program = torch.export.export(module, inputs, strict=False)
    except Exception:
        return []
    found = _modules_calling(program.graph, op, prefix)
    if not found:
        try:
            found = _modules_calling(program.run_decompositions().graph, op, prefix)
        except Exception:
            return []
    return found[:5]


def hint_for(texts: Sequence[str], op: str | None) -> str:
    """A fix suggestion matched to the kind of failure."""
    joined = clean("\n".join(texts))
    if "data-dependent" in joined or "DataDependent" in joined:
        return (
            "the model branches on tensor values (data-dependent control flow); rewrite the branch with "
            "torch.where / torch.cond, or make it depend on shapes only."
        )
    if "Constraints violated" in joined or "specializ" in joined:
        return (
            f"the model fixes the batch size; pass {name('dynamic_batch=False')} or remove the batch-size dependence."
        )
    if op is not None:
        return (
            f"replace {op} in that module with ops that ONNX supports, try another opset ({name('opset')}), or keep "
            "the model in PyTorch form with fxmerge.export.save_program / save_state."
        )
    return (
        "see the exporter summaries above; fxmerge.export.save_state keeps the weights in PyTorch form whatever "
        "the exporters support."
    )


def _modules_calling(graph: torch.fx.Graph, op: str, prefix: str) -> list[str]:
    key = _op_key(op)
    found: list[str] = []
    for node in graph.nodes:
        if node.op != "call_function" or _op_key(normalize_op(str(node.target))) != key:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path, cls = list(stack.values())[-1]
        entry = f"{_strip_prefix(path, prefix)!r} ({_class_name(cls)})"
        if entry not in found:
            found.append(entry)
    return found


def _op_key(name: str) -> str:
    return name.split(".")[-1].lstrip("_")


def _strip_prefix(path: str, prefix: str) -> str:
    if path == prefix:
        return "<root>"
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else path


def _class_name(cls: object) -> str:
    if isinstance(cls, type):
        return cls.__qualname__
    return str(cls).rsplit(".", 1)[-1]


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_SUMMARY else text[: _MAX_SUMMARY - 3] + "..."
