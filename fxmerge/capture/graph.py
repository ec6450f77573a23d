"""The captured-graph IR: a ``GraphModule`` plus how its inputs bind to the model, and input helpers.

Both frontends (:mod:`fxmerge.capture.frontends`) produce a :class:`CapturedGraph`, so analyses see one IR
whichever frontend ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx._pytree import tree_flatten_spec

from fxmerge.errors import CaptureError


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
        return bind_fx_inputs(self.gm, args, kwargs)

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


@contextlib.contextmanager
def restored_attributes(model: nn.Module) -> Iterator[None]:
    """Undo what a traced forward assigns to the model: tracing runs the Python ``forward`` on proxies or fake
    tensors, so ``self.cache = ...`` (or ``self.cache[key] = ...``) in a forward would otherwise leave a proxy or
    a fake tensor in the user's model. Every submodule's attributes, and the contents of its dict attributes
    (parameter / buffer / submodule tables and caches alike), are restored to what they were."""
    saved = {m: _attribute_snapshot(m) for m in model.modules()}
    try:
        yield
    finally:
        for m, (attrs, contents) in saved.items():
            current = vars(m)
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key) is not value:
                    current[key] = value
            for table, content in contents:
                if table.keys() != content.keys() or any(table[k] is not v for k, v in content.items()):
                    table.clear()
                    table.update(content)


def _attribute_snapshot(module: nn.Module) -> tuple[dict[str, Any], list[tuple[dict, dict]]]:
    attrs = dict(vars(module))
    return attrs, [(v, dict(v)) for v in attrs.values() if isinstance(v, dict)]


def eager_failure(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why ``model(*args, **kwargs)`` raises when called directly (eval mode, no grad), or None when it runs."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # the model itself does not run on the inputs
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by every name they are reachable under."""
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b_name, b in mod.named_buffers(recurse=False):
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                state[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return state



def bind_fx_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
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


def fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
