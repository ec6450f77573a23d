"""Small helpers to run a captured graph and read values of chosen nodes (no hand-placed hooks).

The captured graph of :func:`fxmerge.capture` is executed with an fx Interpreter; parameters are read
from the model the graph was captured from, so a graph must be re-captured after the model's tensors
are replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from fxmerge.capture.trace import CapturedGraph
from fxmerge.errors import MergeError

__all__ = ["contains_tensor", "node_params", "node_reads", "run_graph"]


class _Recorder(fx.Interpreter):
    """Interpreter that keeps the outputs of the nodes in ``keep`` (every node when ``keep`` is None). Chosen
    tensors are copied: a later in-place op (``ReLU(inplace=True)`` after a conv) would otherwise turn the recorded
    value into that op's output."""

    def __init__(self, gm: fx.GraphModule, keep: set[str] | None) -> None:
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.keep is None:
            self.values[n.name] = out
        elif n.name in self.keep:
            self.values[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def run_graph(
    cg: CapturedGraph, args: tuple, kwargs: dict, keep: Iterable[str] | None = None
) -> dict[str, Any]:
    """Run the captured graph on ``(args, kwargs)`` under no_grad and return the kept node values.

    Raises:
        MergeError: if the inputs do not fit the model.
    """
    rec = _Recorder(cg.gm, None if keep is None else set(keep))
    try:
        with torch.no_grad():
            rec.run(*cg.placeholder_values(args, kwargs))
    except Exception as e:
        raise MergeError(f"an input batch does not fit the model: {type(e).__name__}: {str(e)[:200]}") from e
    return rec.values


def contains_tensor(value: Any) -> bool:
    """True for a tensor, or a tuple/list holding one (shape arithmetic and sizes are not data)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(contains_tensor(v) for v in value)
    return False


def node_params(cg: CapturedGraph, node: fx.Node) -> list[str]:
    """State names (parameters and persistent buffers) a node reads directly, in state order.

    A ``call_module`` node reads everything under its module; a bound ``get_attr``/placeholder node
    (parameters lifted by ``torch.export``) reads its own tensor.
    """
    if node.op == "call_module":
        prefix = f"{node.target}."
        return [name for name in cg.state if name.startswith(prefix)]
    if node.op in ("get_attr", "placeholder") and node.name in cg.bindings:
        return [cg.bindings[node.name]]
    return []


def node_reads(cg: CapturedGraph, node: fx.Node) -> list[str]:
    """State names a node computes with: its own (:func:`node_params`) plus bound tensor inputs."""
    out = list(node_params(cg, node)) if node.op == "call_module" else []
    for a in node.all_input_nodes:
        if a.op in ("get_attr", "placeholder"):
            out += node_params(cg, a)
    return list(dict.fromkeys(out))
