"""Capture a model as an fx graph: ``torch.fx`` symbolic tracing or ``torch.export`` (ATen level).

Both frontends produce a :class:`CapturedGraph`: a ``GraphModule`` plus the mapping from graph values to
the model's own parameter and buffer tensors, so analyses see one IR whichever frontend ran.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module
from torch.fx._pytree import tree_flatten_spec
from torch.fx.proxy import ParameterProxy

from fxmerge.errors import CaptureError
from fxmerge.infer.registry import RULES, RuleTable

Frontend = Literal["auto", "fx", "export"]


@dataclass
class CapturedGraph:
    """A captured graph and how its inputs map onto the model.

    ``state`` maps fully-qualified names to the model's parameters and persistent buffers (tied
    tensors appear under every name). ``bindings`` maps placeholder/get_attr node names to those FQNs;
    ``constants`` holds graph constants (lifted tensors, non-persistent buffers) by node name.
    """

    gm: fx.GraphModule
    frontend: Literal["fx", "export"]
    model_class: str
    state: dict[str, torch.Tensor]
    bindings: dict[str, str] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    user_inputs: list[str] = field(default_factory=list)
    in_spec: Any = None
    fallback_reason: str | None = None

    def flat_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Values of the user-input placeholders for the given call arguments."""
        if self.frontend == "export":
            flat = tree_flatten_spec((args, kwargs), self.in_spec)
            return dict(zip(self.user_inputs, flat, strict=True))
        return _bind_fx_inputs(self.gm, args, kwargs)

    def placeholder_values(self, args: tuple, kwargs: dict) -> list[Any]:
        """Values for every placeholder of ``gm`` in order: user inputs, lifted parameters/buffers, constants."""
        inputs = self.flat_inputs(args, kwargs)
        values = []
        for n in self.gm.graph.nodes:
            if n.op != "placeholder":
                continue
            if n.name in self.bindings:
                values.append(self.state[self.bindings[n.name]])
            elif n.name in self.constants:
                values.append(self.constants[n.name])
            else:
                values.append(inputs[n.name])
        return values


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Normalise example inputs: a tensor, a tuple/list (last item may be a kwargs dict), or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        items = tuple(example_inputs)
        if items and isinstance(items[-1], dict):
            return items[:-1], dict(items[-1])
        return items, {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple/list of inputs (optionally ending with a dict of keyword "
        f"inputs), or a dict of keyword inputs; got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode, restoring the caller's flags afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by every name they are reachable under."""
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b_name, b in mod.named_buffers(recurse=False):
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                state[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return state


class _LeafTracer(fx.Tracer):
    """fx tracer whose leaves are exactly the module classes that have a rule."""

    def __init__(self, rules: RuleTable, stack_traces: bool) -> None:
        super().__init__()
        self.rules = rules
        self.record_stack_traces = stack_traces

        self._attr_names: tuple[dict[int, str], dict[int, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.rules.has_module(type(m))

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._attr_names = None  # names are indexed per traced root
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        """fx's own version finds a parameter's name by scanning ``named_parameters()`` on every attribute
        access, quadratic in model size (a third of the capture time of a 32-layer model); here the names
        are indexed once per trace. Same result: the first name under which the tensor is registered."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._attr_names is None:
            self._attr_names = ({id(p): n for n, p in reversed(list(self.root.named_parameters()))},
                                {id(b): n for n, b in reversed(list(self.root.named_buffers()))})
        params, buffers = self._attr_names
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            factory = (lambda node: ParameterProxy(self, node, name, attr_val)) if self.param_shapes_constant else None
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]


def capture(
    model: nn.Module,
    example_inputs: Any,
    frontend: Frontend = "auto",
    *,
    rules: RuleTable | None = None,
    stack_traces: bool = False,
) -> CapturedGraph:
    """Capture ``model`` as a graph; ``auto`` tries fx symbolic tracing, then ``torch.export``.

    ``stack_traces`` records the user source line of every fx node (a third of fx's tracing time; the
    diagnostics re-capture with it when they need to point at source lines).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", "fx", "export"):
        raise CaptureError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    args, kwargs = split_inputs(example_inputs)
    rules = rules or RULES
    fx_error: Exception | None = None
    if frontend in ("auto", "fx"):
        try:
            return _capture_fx(model, rules, stack_traces)
        except CaptureError as e:
            if frontend == "fx":
                raise
            fx_error = e
    cg = _capture_export(model, args, kwargs)
    cg.fallback_reason = str(fx_error).splitlines()[0] if fx_error else None
    return cg


def _capture_fx(model: nn.Module, rules: RuleTable, stack_traces: bool) -> CapturedGraph:
    name = type(model).__name__
    try:
        with eval_mode(model):
            graph = _LeafTracer(rules, stack_traces).trace(model)
    except Exception as e:
        raise CaptureError(
            f"torch.fx could not trace {name}: {type(e).__name__}: {_first_line(e)}. "
            "Fix: use frontend='export' (torch.export handles data-dependent Python control flow on shapes, "
            "Hugging Face models and most custom code), or make the offending code traceable "
            "(concrete_args, torch.fx.wrap, or register a rule for the module with @fxmerge.rule so it becomes a leaf)."
        ) from e
    # code generation is deferred until the module is called: analysis only walks the graph
    gm = _make_graph_module(model, graph, class_name=f"{name}Graph", graph_module_cls=_LazyGraphModule)
    state = model_state(model)
    bindings = {n.name: str(n.target) for n in graph.nodes if n.op == "get_attr" and str(n.target) in state}
    constants = {}
    for n in graph.nodes:
        if n.op == "get_attr" and n.name not in bindings:
            val = _fetch_attr(gm, str(n.target))
            if isinstance(val, torch.Tensor):
                constants[n.name] = val
    users = [n.name for n in graph.nodes if n.op == "placeholder"]
    return CapturedGraph(gm, "fx", name, state, bindings, constants, users)


def _capture_export(model: nn.Module, args: tuple, kwargs: dict) -> CapturedGraph:
    name = type(model).__name__
    try:
        with eval_mode(model), torch.no_grad():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise CaptureError(
            f"torch.export could not capture {name}: {type(e).__name__}: {_first_line(e)}. "
            "Fix: check that example_inputs match the model's forward (a tuple of positional inputs, optionally "
            "ending with a dict of keyword inputs); for Hugging Face decoders pass use_cache=False; data-dependent "
            "control flow must be rewritten with torch.cond or made shape-only."
        ) from e
    state = model_state(model)
    bindings, constants, users = {}, {}, []
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        arg_name = spec.arg.name
        if kind in ("PARAMETER", "BUFFER") and spec.target in state:
            bindings[arg_name] = spec.target
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            val = ep.constants.get(spec.target, ep.state_dict.get(spec.target))
            if not isinstance(val, torch.Tensor):
                val = _fetch_attr(model, spec.target)
            constants[arg_name] = val
        elif kind == "USER_INPUT":
            users.append(arg_name)
        else:
            raise CaptureError(f"torch.export produced an input of kind {kind} for {name}; fxmerge cannot bind it")
    return CapturedGraph(ep.graph_module, "export", name, state, bindings, constants, users, ep.call_spec.in_spec)


def _bind_fx_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[str, Any] = {}
    positional = list(args)
    for n in placeholders:
        pname = str(n.target).lstrip("*")
        if positional:
            out[n.name] = positional.pop(0)
        elif pname in kwargs:
            out[n.name] = kwargs[pname]
        elif n.args:
            out[n.name] = n.args[0]
        else:
            raise CaptureError(f"no value for input {pname!r}: pass it in example_inputs")
    if positional:
        raise CaptureError(f"{len(positional)} extra positional inputs do not match the model's forward signature")
    return out


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def forward_signature(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)
