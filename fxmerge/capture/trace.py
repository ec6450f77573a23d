"""Capture a model as an fx graph: ``torch.fx`` symbolic tracing or ``torch.export`` (ATen level).

Both frontends produce a :class:`CapturedGraph`: a ``GraphModule`` plus the mapping from graph values to
the model's own parameter and buffer tensors, so analyses see one IR whichever frontend ran.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import operator
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module
from torch.fx._pytree import tree_flatten_spec
from torch.fx.proxy import ParameterProxy

from fxmerge.errors import CaptureError, FxmergeError
from fxmerge.infer.registry import RULES, RuleTable

Frontend = Literal["auto", "fx", "export"]
T = TypeVar("T")

# Keyword inputs that capture passes when the model's forward takes them and the caller did not set them:
# they switch off outputs that are state for a later call rather than part of the function (KV caches).
CAPTURE_KWARGS: dict[str, Any] = {"use_cache": False}


@dataclass
class CapturedGraph:
    """A captured graph and how its inputs map onto the model.

    ``state`` maps fully-qualified names to the model's parameters and persistent buffers (tied
    tensors appear under every name). ``bindings`` maps placeholder/get_attr node names to those FQNs;
    ``constants`` holds graph constants (lifted tensors, non-persistent buffers) by node name.

    ``frontend`` is the frontend that produced ``gm``. Under ``"auto"``, ``fallback_reason`` says why fx was
    not used (a tracing error, calls fx cannot see into, or a graph that fails on the example inputs) and
    ``rejected`` maps every frontend tried and not used to why. ``call_kwargs`` are keyword inputs capture
    added to the call (:data:`CAPTURE_KWARGS`, e.g. ``use_cache=False``); the graph is specialised to them and
    :meth:`flat_inputs` supplies them.
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
    rejected: dict[str, str] = field(default_factory=dict)
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def flat_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Values of the user-input placeholders for the given call arguments."""
        kwargs = {**self.call_kwargs, **kwargs}
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

    ``auto`` uses ``torch.export`` when fx fails in any way, and when the fx graph calls Python functions or
    modules that have no rule (``torch.fx.wrap``-ed helpers: fx cannot see into them, export can); if export
    fails there too, the fx graph is kept. The result says which frontend ran and why
    (``frontend``, ``fallback_reason``, ``rejected``). When both fail, the error names both failures.
    :func:`capture_and_run` also falls back when the fx graph fails to run on the example inputs.

    ``stack_traces`` records the user source line of every fx node (a third of fx's tracing time; the
    diagnostics re-capture with it when they need to point at source lines).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", "fx", "export"):
        raise CaptureError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    args, kwargs = split_inputs(example_inputs)
    if rules is None:
        from fxmerge.infer import rules as _builtin_rules  # noqa: F401  (leaves and opaque calls need the rules)

        rules = RULES
    extra = capture_kwargs(model, args, kwargs)
    if frontend == "export":
        return _capture_export(model, args, kwargs, extra)
    if frontend == "fx":
        return _capture_fx(model, rules, stack_traces, extra)
    try:
        cg = _capture_fx(model, rules, stack_traces, extra)
    except Exception as e:  # any fx failure is a reason to try export
        return _fall_back(model, args, kwargs, extra, _fx_failure(model, e), fx_error=e)
    opaque = opaque_calls(cg.gm, rules)
    if not opaque:
        return cg
    reason = (f"the fx graph calls {len(opaque)} function(s)/module(s) it cannot see into and that have no rule: "
              f"{', '.join(opaque[:4])}{' ...' if len(opaque) > 4 else ''}")  # fmt: skip
    try:
        return _fall_back(model, args, kwargs, extra, reason)
    except CaptureError as e:  # export cannot do better: keep the fx graph (its opaque calls become barriers)
        cg.rejected["export"] = _first_line(e)
        return cg


def capture_and_run(
    model: nn.Module,
    example_inputs: Any,
    frontend: Frontend,
    run: Callable[[CapturedGraph], T],
    *,
    rules: RuleTable | None = None,
    stack_traces: bool = False,
) -> tuple[CapturedGraph, T]:
    """:func:`capture`, then ``run(cg)`` (a pass that executes the graph on the example inputs).

    Under ``auto`` an fx graph that fails to run falls back to ``torch.export``. Errors other than
    :class:`~fxmerge.FxmergeError` become a :class:`~fxmerge.CaptureError` that says whether the model itself
    runs on the inputs (then the captured graph is at fault, not ``example_inputs``).
    """
    cg = capture(model, example_inputs, frontend, rules=rules, stack_traces=stack_traces)
    try:
        return cg, _run_checked(model, example_inputs, cg, run)
    except CaptureError as e:
        if frontend != "auto" or cg.frontend != "fx":
            raise
        fx_error: Exception = e
    args, kwargs = split_inputs(example_inputs)
    ecg = _fall_back(model, args, kwargs, cg.call_kwargs, _first_line(fx_error), fx_error=fx_error)
    return ecg, _run_checked(model, example_inputs, ecg, run)


def _run_checked(model: nn.Module, example_inputs: Any, cg: CapturedGraph, run: Callable[[CapturedGraph], T]) -> T:
    try:
        return run(cg)
    except FxmergeError:
        raise
    except Exception as e:
        what = f"running the {cg.frontend} graph of {cg.model_class} on example_inputs failed: {type(e).__name__}: "
        what += _first_line(e)
        args, kwargs = split_inputs(example_inputs)
        if cg.frontend == "export" or _model_runs(model, args, kwargs):
            fix = ("The model itself runs on these inputs, so the captured graph is at fault"
                   + (": use frontend='export'." if cg.frontend == "fx" else "."))  # fmt: skip
        else:
            fix = ("The model itself fails on them too: pass example_inputs that its forward accepts (a tensor, a "
                   "tuple of positional inputs optionally ending with a dict of keyword inputs, or a dict).")  # fmt: skip
        raise CaptureError(f"{what}. {fix}") from e


def _model_runs(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # the model itself does not run on the inputs
        return False
    return True


def _fall_back(
    model: nn.Module, args: tuple, kwargs: dict, extra: dict[str, Any], reason: str, *, fx_error: Exception | None = None
) -> CapturedGraph:  # fmt: skip
    """Capture with ``torch.export`` after fx was rejected for ``reason``."""
    try:
        cg = _capture_export(model, args, kwargs, extra)
    except CaptureError as e:
        if fx_error is None:
            raise
        raise CaptureError(
            f"neither frontend could capture {type(model).__name__}\n  fx: {fx_error}\n  export: {e}"
        ) from e
    cg.fallback_reason = reason
    cg.rejected["fx"] = reason
    return cg


def _fx_failure(model: nn.Module, e: Exception) -> str:
    if isinstance(e, CaptureError):
        return _first_line(e)
    return f"torch.fx capture of {type(model).__name__} failed: {type(e).__name__}: {_first_line(e)}"


def capture_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The :data:`CAPTURE_KWARGS` that ``model.forward`` takes by name and the call does not set."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {}
    for name, value in CAPTURE_KWARGS.items():
        index = next((i for i, p in enumerate(params) if p.name == name and p.kind in named), None)
        if index is None or name in kwargs:
            continue
        if params[index].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and index < len(args):
            continue
        out[name] = value
    return out


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


def _capture_fx(model: nn.Module, rules: RuleTable, stack_traces: bool, extra: dict[str, Any]) -> CapturedGraph:
    name = type(model).__name__
    try:
        with eval_mode(model):
            graph = _LeafTracer(rules, stack_traces).trace(model, concrete_args=dict(extra) or None)
    except Exception as e:
        raise CaptureError(
            f"torch.fx could not trace {name}: {type(e).__name__}: {_first_line(e)}. "
            "Fix: use frontend='export' (torch.export handles data-dependent Python control flow on shapes, "
            "Hugging Face models and most custom code), or make the offending code traceable "
            "(concrete_args, torch.fx.wrap, or register a rule for the module with @fxmerge.rule so it becomes a leaf)."
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
            val = _fetch_attr(gm, str(n.target))
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


def _capture_export(model: nn.Module, args: tuple, kwargs: dict, extra: dict[str, Any]) -> CapturedGraph:
    name = type(model).__name__
    try:
        with eval_mode(model), torch.no_grad():
            ep = torch.export.export(model, args, {**kwargs, **extra}, strict=False)
    except Exception as e:
        raise CaptureError(
            f"torch.export could not capture {name}: {type(e).__name__}: {_first_line(e)}. "
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
                val = _fetch_attr(model, spec.target)
            constants[arg_name] = val
        elif kind == "USER_INPUT":
            users.append(arg_name)
        else:
            raise CaptureError(f"torch.export produced an input of kind {kind} for {name}; fxmerge cannot bind it")
    return CapturedGraph(ep.graph_module, "export", name, state, bindings, constants, users, ep.call_spec.in_spec,
                         call_kwargs=dict(extra))  # fmt: skip


def _bind_fx_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    named = {str(n.target) for n in placeholders}
    out: dict[str, Any] = {}
    positional = list(args)
    for n in placeholders:
        pname = str(n.target).lstrip("*")
        if str(n.target).startswith("**"):  # forward(..., **kwargs): the keyword inputs no parameter takes
            out[n.name] = {k: v for k, v in kwargs.items() if k not in named}
        elif str(n.target).startswith("*"):  # forward(..., *args): the remaining positional inputs
            out[n.name], positional = tuple(positional), []
        elif positional:
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
