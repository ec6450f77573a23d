"""Partial zipping: merge the graph up to a cut, keep every model's own layers after it (a multi-head model).

The captured graph is split at the first node of ``stop_at`` (a module path or a node name). Nodes before the
cut run once with the merged parameters (the *trunk*); nodes after it are copied once per model and run with
that model's original parameters (its *tail*). Each value that crosses the cut is mapped from the merged units
back into model ``m``'s units with the matching's unmerge matrix ``U_m`` along every grouped axis, so model
``m``'s tail sees what it would see if the trunk were its own. The result returns a tuple of N outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxmerge.capture.trace import CapturedGraph, split_inputs
from fxmerge.clone import clone_module
from fxmerge.errors import MergeError
from fxmerge.ir.layout import Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.transform import Transforms, apply_layout


def unmerge_axes(x: torch.Tensor, mat: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``mat @ x`` along the (jointly flattened) ``axes`` of ``x``."""
    rest = [a for a in range(x.dim()) if a not in axes]
    y = x.permute(*rest, *axes)
    lead = y.shape[: len(rest)]
    sizes = y.shape[len(rest) :]
    y = (y.reshape(*lead, -1) @ mat.T.to(y.dtype)).reshape(*lead, *sizes)
    inverse = [0] * x.dim()
    for i, a in enumerate([*rest, *axes]):
        inverse[a] = i
    return y.permute(*inverse)


torch.fx.wrap("unmerge_axes")


def cut_index(gm: fx.GraphModule, stop_at: str) -> int:
    """Index of the first node that belongs to ``stop_at`` (module path prefix or node name)."""
    nodes = list(gm.graph.nodes)
    first = next((i for i, n in enumerate(nodes) if n.op != "placeholder"), len(nodes))
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            continue
        owners = [str(n.target)] if n.op in ("call_module", "get_attr") else []
        owners += [
            str(v[0] if isinstance(v, tuple) else v) for v in n.meta.get("nn_module_stack", {}).values()
        ]
        if n.name == stop_at or any(o == stop_at or o.startswith(stop_at + ".") for o in owners):
            return max(i, first)
    modules = sorted({str(n.target).rsplit(".", 1)[0] for n in nodes if n.op == "call_module"})[:8]
    raise MergeError(
        f"stop_at={stop_at!r} names no module or node of the graph; module paths include {modules}"
    )


class _Builder:
    def __init__(self, cg: CapturedGraph, root: nn.Module, layouts: dict[str, list[tuple[tuple, Layout]]]):
        self.cg = cg
        self.root = root
        self.layouts = layouts
        self.graph = fx.Graph()
        self.trunk: dict[fx.Node, fx.Node] = {}
        self.count = 0

    def copy(self, node: fx.Node, env: dict[fx.Node, fx.Node], mapper: Any, prefix: str) -> fx.Node:
        new = self.graph.node_copy(node, mapper)
        if node.op in ("call_module", "get_attr"):
            new.target = f"{prefix}.{node.target}"
        env[node] = new
        return new

    def crossing(self, node: fx.Node, m: int, n: int, tr: Transforms, dtype: torch.dtype) -> fx.Node:
        if node.op == "get_attr":
            return self.graph.get_attr(f"tails.{m}.{node.target}")
        value = self.trunk[node]
        for axes, lay in self.layouts.get(node.name, []):
            eye = torch.eye(lay.size, dtype=torch.float64)
            mat = apply_layout(eye, 0, lay, m, n, tr, False, mode="act")
            if torch.equal(mat, eye):
                continue
            name = f"u{self.count}"
            self.count += 1
            self.root.unmerge.register_buffer(name, mat.to(dtype))
            buf = self.graph.get_attr(f"unmerge.{name}")
            value = self.graph.call_function(unmerge_axes, (value, buf, tuple(axes)))
        return value


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return isinstance(value, torch.Tensor)


def _check_crossing_values(cg: CapturedGraph, crossing: set[str], example_inputs: Any) -> None:
    args, kwargs = split_inputs(example_inputs)
    values: dict[str, Any] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in crossing:
                values[n.name] = out
            return out

    with torch.no_grad():
        _Rec(cg.gm).run(*cg.flat_inputs(args, kwargs).values())
    bad = [k for k, v in values.items() if not isinstance(v, torch.Tensor) and _holds_tensor(v)]
    if bad:
        raise MergeError(
            f"cannot cut the graph there: values {bad[:4]} crossing the cut are containers of tensors; choose a stop_at "
            "module whose inputs are plain tensors (e.g. a whole block rather than a layer inside it)"
        )


def build_multihead(
    cg: CapturedGraph,
    spec: PermutationSpec,
    merged: nn.Module,
    models: list[nn.Module],
    tr: Transforms,
    stop_at: str,
    example_inputs: Any,
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The multi-head model: merged trunk up to ``stop_at``, each model's own tail after it."""
    if cg.frontend != "fx":
        raise MergeError(
            "partial zipping (stop_at=...) needs a model that torch.fx can trace (frontend='fx')"
        )
    nodes = list(cg.gm.graph.nodes)
    cut = cut_index(cg.gm, stop_at)
    prefix, suffix = nodes[:cut], [x for x in nodes[cut:] if x.op != "output"]
    in_prefix = set(prefix)
    crossing = {a.name for s in suffix for a in s.all_input_nodes if a in in_prefix and a.op != "get_attr"}
    crossing |= {a.name for a in nodes[-1].all_input_nodes if a in in_prefix and a.op != "get_attr"}
    _check_crossing_values(cg, crossing - {p.name for p in prefix if p.op == "placeholder"}, example_inputs)
    root = nn.Module()
    root.trunk = merged
    root.tails = nn.ModuleList([clone_module(m) for m in models])
    root.unmerge = nn.Module()
    layouts: dict[str, list[tuple[tuple, Layout]]] = {}
    for node, axes, lay in spec.layout_probes:
        layouts.setdefault(node, []).append((tuple(axes), lay))
    b = _Builder(cg, root, layouts)
    for node in prefix:
        b.copy(node, b.trunk, lambda a: b.trunk[a], "trunk")
    dtype = next((p.dtype for p in merged.parameters() if p.is_floating_point()), torch.float32)
    outputs = []
    for m in range(len(models)):
        env: dict[fx.Node, fx.Node] = {}

        def mapper(a: fx.Node, m: int = m, env: dict = env) -> fx.Node:
            if a not in env:
                env[a] = b.crossing(a, m, len(models), tr, dtype)
            return env[a]

        for node in suffix:
            b.copy(node, env, mapper, f"tails.{m}")
        outputs.append(fx.map_arg(nodes[-1].args[0], mapper))
    b.graph.output(tuple(outputs))
    gm = fx.GraphModule(root, b.graph, class_name="MultiHeadMerged")
    info = {
        "stop_at": stop_at,
        "trunk_nodes": len(prefix),
        "tail_nodes": len(suffix),
        "crossing": sorted(crossing),
    }
    return gm, info
