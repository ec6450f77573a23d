"""Run a captured graph on example inputs and let every node's rule emit constraints.

The interpreter executes each node for real (so rules see concrete shapes and arguments), pairs every
tensor with its axis terms, and dispatches to the rule registered for the node's target. Nodes without a
rule are recorded and become barriers: all their tensor inputs are frozen and their outputs are fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from fxmerge.capture.trace import CapturedGraph, eval_mode
from fxmerge.infer.context import TV, Call, RuleContext
from fxmerge.infer.registry import RULES, RuleEntry, RuleTable
from fxmerge.ir.dims import Dims
from fxmerge.ir.solver import Solver

META_DIMS = "fxmerge.dims"


@dataclass
class UnsupportedOp:
    """One node without a permutation rule."""

    target: str
    op: str
    node: str
    module_path: str
    source: str
    shapes: list[tuple[int, ...]]
    params: list[str] = field(default_factory=list)


class GraphInterpreter:
    """Executes a :class:`CapturedGraph` node by node and collects permutation constraints."""

    def __init__(self, cg: CapturedGraph, rules: RuleTable | None = None, *, free_outputs: bool = False) -> None:
        self.cg = cg
        self.rules = rules or RULES
        self.free_outputs = free_outputs
        self.solver = Solver()
        self.ctx = RuleContext(self.solver, {id(t) for t in cg.state.values()})
        self.param_dims: dict[int, Dims] = {}
        self.names_of: dict[int, list[str]] = {}
        for name, t in cg.state.items():
            self.names_of.setdefault(id(t), []).append(name)
        self.used: set[int] = set()
        self.unsupported: list[UnsupportedOp] = []
        self.output_dims: list[Dims] = []
        self.output_floats: list[bool] = []
        self.group_atoms: dict[int, int] = {}  # group id of the last built spec -> solver atom class

    # ------------------------------------------------------------------ params
    def dims_of_state(self, t: torch.Tensor) -> Dims:
        """Axis terms of a parameter/buffer; shared by every use and every alias (weight tying)."""
        key = id(t)
        if key not in self.param_dims:
            name = self.names_of.get(key, ["?"])[0]
            self.param_dims[key] = tuple(self.solver.atom(int(n), f"{name}[{i}]") for i, n in enumerate(t.shape))
        self.used.add(key)
        return self.param_dims[key]

    def wrap_state(self, t: torch.Tensor) -> TV:
        return TV(t, self.dims_of_state(t))

    # --------------------------------------------------------------------- run
    def run(self, inputs: dict[str, Any]) -> None:
        graph = self.cg.gm.graph
        last_use = _last_uses(graph)
        env: dict[fx.Node, Any] = {}
        with eval_mode(self.cg.gm), torch.no_grad():
            for node in graph.nodes:
                self.ctx.why = _site(node)
                env[node] = self._step(node, env, inputs)
                node.meta[META_DIMS] = _dims_tree(env[node])
                for dead in last_use.get(node, ()):
                    env.pop(dead, None)

    def _step(self, node: fx.Node, env: dict, inputs: dict[str, Any]) -> Any:
        if node.op == "placeholder":
            return self._placeholder(node, inputs)
        if node.op == "get_attr":
            return self._get_attr(node)
        if node.op == "output":
            self._output(fx.node.map_aggregate(node.args[0], lambda n: env[n] if isinstance(n, fx.Node) else n))
            return None
        args = fx.node.map_aggregate(node.args, lambda n: env[n] if isinstance(n, fx.Node) else n)
        kwargs = fx.node.map_aggregate(node.kwargs, lambda n: env[n] if isinstance(n, fx.Node) else n)
        return self._call(node, args, kwargs)

    def _placeholder(self, node: fx.Node, inputs: dict[str, Any]) -> Any:
        if node.name in self.cg.bindings:
            return self.wrap_state(self.cg.state[self.cg.bindings[node.name]])
        if node.name in self.cg.constants:
            c = self.cg.constants[node.name]
            return TV(c, self.ctx.fixed(c.shape, "graph constant"))
        value = inputs[node.name]
        return _wrap_fixed(self.ctx, value, "model input (inputs are frozen)")

    def _get_attr(self, node: fx.Node) -> Any:
        if node.name in self.cg.bindings:
            return self.wrap_state(self.cg.state[self.cg.bindings[node.name]])
        val = self.cg.constants.get(node.name)
        if val is None:
            val = self.cg.gm
            for part in str(node.target).split("."):
                val = getattr(val, part)
        return _wrap_fixed(self.ctx, val, "graph constant")

    def _output(self, value: Any) -> None:
        for tv in _flat(value):
            self.output_dims.append(tv.dims)
            self.output_floats.append(tv.value.is_floating_point())
            if not self.free_outputs:
                self.ctx.freeze(tv, "model output (outputs are frozen; pass free_outputs=True to free them)")

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        module = self.cg.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        entry = self._lookup(node, module)
        raw_args = fx.node.map_aggregate(args, _unwrap)
        raw_kwargs = fx.node.map_aggregate(kwargs, _unwrap)
        out = _execute(node, module, raw_args, raw_kwargs)
        if entry is None:
            return self._barrier(node, module, args, kwargs, out)
        params = self._module_params(module) if module is not None else {}
        call = Call(entry.key, node, tuple(args), dict(kwargs), out, module, params)
        dims = entry.fn(self.ctx, call)
        if _hidden_tensors(out):
            # tensors inside a dict or an object: no dims can follow them, so whatever they were computed from
            # is frozen (reading them later gives fixed axes)
            for tv in [*_flat((args, kwargs)), *params.values()]:
                self.ctx.freeze(tv, f"result of {entry.key} holds tensors in a {type(out).__name__}")
            return out
        return _wrap_checked(out, dims, entry.key, node)

    def _lookup(self, node: fx.Node, module: nn.Module | None) -> RuleEntry | None:
        if module is not None:
            return self.rules.lookup_module(module)
        if node.op == "call_method":
            return self.rules.lookup_method(str(node.target))
        return self.rules.lookup_function(node.target)

    def _module_params(self, module: nn.Module) -> dict[str, TV]:
        out: dict[str, TV] = {}
        for name, p in module.named_parameters():
            out[name] = self.wrap_state(p)
        for mod_name, mod in module.named_modules():
            for b_name, b in mod.named_buffers(recurse=False):
                full = f"{mod_name}.{b_name}" if mod_name else b_name
                persistent = b_name not in mod._non_persistent_buffers_set
                out[full] = self.wrap_state(b) if persistent else TV(b, self.ctx.fixed(b.shape))
        return out

    def _barrier(self, node: fx.Node, module, args, kwargs, out) -> Any:
        tvs = _flat((args, kwargs))
        params: list[str] = []
        if module is not None:
            tvs.extend(self._module_params(module).values())
        for tv in tvs:
            self.ctx.freeze(tv, f"input of unsupported op {_target_name(node)}")
            params.extend(self.names_of.get(id(tv.value), []))
        self.unsupported.append(
            UnsupportedOp(
                target=_target_name(node),
                op=node.op,
                node=node.name,
                module_path=_module_path(node),
                source=_source_line(node),
                shapes=[tuple(t.shape) for t in tvs],
                params=sorted(set(params)),
            )
        )
        return _wrap_fixed(self.ctx, out, f"output of unsupported op {_target_name(node)}")


def _execute(node: fx.Node, module, args, kwargs) -> Any:
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)
    return node.target(*args, **kwargs)


def _hidden_tensors(v: Any) -> bool:
    """True if ``v`` holds tensors somewhere other than as a tensor or in (nested) lists/tuples."""
    if isinstance(v, torch.Tensor) or v is None:
        return False
    if isinstance(v, (list, tuple)):
        return any(_hidden_tensors(x) for x in v)
    if isinstance(v, (int, float, bool, str, torch.dtype, torch.device, torch.Size, slice, type(Ellipsis))):
        return False
    return any(isinstance(t, torch.Tensor) for t in tree_leaves(v)) or any(
        isinstance(x, torch.Tensor) for x in getattr(v, "__dict__", {}).values()
    )


def _unwrap(v: Any) -> Any:
    return v.value if isinstance(v, TV) else v


def _flat(v: Any) -> list[TV]:
    if isinstance(v, TV):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _flat(x)]
    return []


def _wrap_fixed(ctx: RuleContext, value: Any, why: str = "") -> Any:
    if isinstance(value, torch.Tensor):
        return TV(value, ctx.fixed(value.shape, why))
    if isinstance(value, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in value):
        items = [_wrap_fixed(ctx, x, why) for x in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _wrap_checked(out: Any, dims: Any, key: str, node: fx.Node) -> Any:
    if isinstance(out, torch.Tensor):
        if dims is None or len(dims) != out.ndim or any(d.size != n for d, n in zip(dims, out.shape, strict=True)):
            raise AssertionError(
                f"rule {key!r} returned dims {dims} for a result of shape {tuple(out.shape)} at node {node.name}"
            )
        return TV(out, tuple(dims))
    if isinstance(out, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in out):
        if dims is None or len(dims) != len(out):
            raise AssertionError(f"rule {key!r} returned {dims!r} for a {len(out)}-tuple result at {node.name}")
        items = [_wrap_checked(o, d, key, node) for o, d in zip(out, dims, strict=True)]
        return items if isinstance(out, list) else tuple(items)
    return out


def _dims_tree(v: Any) -> Any:
    if isinstance(v, TV):
        return v.dims
    if isinstance(v, (list, tuple)):
        return [_dims_tree(x) for x in v]
    return None


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            last[inp] = node
    out: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last.items():
        out.setdefault(user, []).append(value)
    return out


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(str(t)) if node.graph.owning_module else None
        return type(mod).__module__ + "." + type(mod).__qualname__ if mod is not None else str(t)
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return f"{mod}.{name}" if mod else name


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return ""


def _source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or node.stack_trace or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = [i for i, ln in enumerate(lines) if ln.startswith("File ") and "/torch/" not in ln]
    if not frames:
        return ""
    i = frames[-1]
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
    return f"{lines[i]}: {code}" if code else lines[i]


def _site(node: fx.Node) -> str:
    path = _module_path(node)
    return f"{node.name} ({_target_name(node)}{', ' + path if path else ''})"
