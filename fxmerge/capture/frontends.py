"""The two capture frontends: ``torch.fx`` symbolic tracing (leaves: the modules that have a rule) and
``torch.export`` (ATen level). Each returns a :class:`~fxmerge.capture.graph.CapturedGraph`."""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import operator
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module
from torch.fx.proxy import ParameterProxy

from fxmerge.capture.graph import (
    CapturedGraph,
    eager_failure,
    eval_mode,
    fetch_attr,
    first_line,
    model_state,
    restored_attributes,
)
from fxmerge.errors import CaptureError
from fxmerge.infer.registry import RuleTable


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


def opaque_calls(gm: fx.GraphModule, rules: RuleTable) -> list[str]:
    """Calls in an fx graph that fx kept opaque and no rule covers: Python functions (``torch.fx.wrap``-ed
    helpers, autowrapped functions) and leaf modules. ``torch.export`` traces into both."""
    out: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, types.FunctionType):
            if rules.lookup_function(n.target) is None:
                out[f"{n.target.__module__}.{n.target.__qualname__}"] = None
        elif n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if rules.lookup_module(mod) is None:
                out[f"{type(mod).__module__}.{type(mod).__qualname__}"] = None
    return list(out)


def capture_fx(model: nn.Module, rules: RuleTable, stack_traces: bool, extra: dict[str, Any]) -> CapturedGraph:
    name = type(model).__name__
    with restored_attributes(model):  # the tracer adds its constants (_tensor_constant0) to the model: the
        try:  # graph module copies them before the model's attributes are restored
            with eval_mode(model):
                graph = _LeafTracer(rules, stack_traces).trace(model, concrete_args=dict(extra) or None)
        except Exception as e:
            raise CaptureError(
                f"torch.fx could not trace {name}: {type(e).__name__}: {first_line(e)}. "
                "Fix: use frontend='export' (torch.export handles data-dependent Python control flow on shapes, "
                "Hugging Face models and most custom code), or make the offending code traceable (concrete_args, "
                "torch.fx.wrap, or register a rule for the module with @fxmerge.rule so it becomes a leaf)."
            ) from e
        _name_concrete_placeholders(graph, extra)
        _structseq_fields_to_items(graph)
        # code generation is deferred until the module is called: analysis only walks the graph
        gm = _make_graph_module(model, graph, class_name=f"{name}Graph", graph_module_cls=_LazyGraphModule)
    state = model_state(model)
    bindings = {n.name: str(n.target) for n in graph.nodes if n.op == "get_attr" and str(n.target) in state}
    constants = {}
    for n in graph.nodes:
        if n.op == "get_attr" and n.name not in bindings:
            val = fetch_attr(gm, str(n.target))
            if isinstance(val, torch.Tensor):
                constants[n.name] = val
    users = [n.name for n in graph.nodes if n.op == "placeholder"]
    return CapturedGraph(gm, "fx", name, state, bindings, constants, users, call_kwargs=dict(extra))


def _name_concrete_placeholders(graph: fx.Graph, extra: dict[str, Any]) -> None:
    """fx names the placeholder of a concrete argument ``<name>_1`` (and guards its value): give it back its
    keyword so the graph binds like the model, defaulting to the value it was specialised to."""
    for n in graph.nodes:
        if n.op == "placeholder" and isinstance(n.target, str) and n.target.endswith("_1"):
            kw = n.target[:-2]
            if kw in extra:
                n.target = kw
                n.args = (extra[kw],)


def _structseq_fields_to_items(graph: fx.Graph) -> None:
    """``x.max(dim).values`` traces to ``getattr(max_1, "values")``; the result is a ``torch.return_types``
    named tuple. Rewrite the field access to the index access ``max_1[0]`` (what ``torch.export`` produces),
    so rules see one tuple-element access whichever frontend ran."""
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not builtins.getattr or len(n.args) != 2:
            continue
        obj, attr = n.args
        if not isinstance(obj, fx.Node) or not isinstance(attr, str):
            continue
        fields = _structseq_fields(obj)
        if attr in fields:
            n.target = operator.getitem
            n.args = (obj, fields.index(attr))


def _structseq_fields(node: fx.Node) -> tuple[str, ...]:
    """Field names of the ``torch.return_types`` named tuple ``node`` returns (empty when it returns none)."""
    if node.op == "call_method":
        op = str(node.target)
    elif node.op == "call_function":
        op = getattr(node.target, "__name__", "")
    else:
        return ()
    rt = getattr(torch.return_types, op, None)
    if not isinstance(rt, type) or rt not in torch.return_types.all_return_types:
        return ()
    return tuple(getattr(rt, "__match_args__", ()))


class ModelRejectsInputs(CaptureError):
    """The model itself raises on the example inputs: no frontend is at fault, so none is tried next."""


# torch's own loggers that print warnings and graph dumps while export fails; fxmerge reports the failure itself
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor", "torch.export")


@contextlib.contextmanager
def _quiet_failed_export() -> Iterator[None]:
    """While ``torch.export`` runs, silence its loggers and hold back what it prints to stderr (a failing export
    prints its partial graph there): the held text is replayed when export succeeds (warnings stay visible) and
    dropped when it fails (the CaptureError then says what went wrong)."""
    loggers = [logging.getLogger(n) for n in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    sys.stderr.write(held.getvalue())  # only reached on success


def capture_export(model: nn.Module, args: tuple, kwargs: dict, extra: dict[str, Any]) -> CapturedGraph:
    name = type(model).__name__
    try:
        with eval_mode(model), restored_attributes(model), torch.no_grad(), _quiet_failed_export():
            ep = torch.export.export(model, args, {**kwargs, **extra}, strict=False)
    except Exception as e:
        eager = eager_failure(model, args, kwargs)
        if eager is not None:
            raise ModelRejectsInputs(
                f"{name} fails on example_inputs when called directly, before any capture: {eager}. Fix: pass "
                "example_inputs that its forward accepts (a tensor, a tuple of positional inputs optionally ending "
                "with a dict of keyword inputs, or a dict), and check the model's configuration; fxmerge captures "
                "the model as it runs on them."
            ) from e
        raise CaptureError(
            f"torch.export could not capture {name}: {type(e).__name__}: {first_line(e)}. "
            "Fix: check that example_inputs match the model's forward (a tuple of positional inputs, optionally "
            "ending with a dict of keyword inputs); outputs must be tensors or containers of them (switch off "
            "caches and other state outputs with the model's keyword inputs); data-dependent control flow must be "
            "rewritten with torch.cond or made shape-only."
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
                val = fetch_attr(model, spec.target)
            constants[arg_name] = val
        elif kind == "USER_INPUT":
            users.append(arg_name)
        else:
            raise CaptureError(f"torch.export produced an input of kind {kind} for {name}; fxmerge cannot bind it")
    return CapturedGraph(ep.graph_module, "export", name, state, bindings, constants, users, ep.call_spec.in_spec,
                         call_kwargs=dict(extra))  # fmt: skip
