"""The rule registry: one public decorator maps op targets to permutation rules.

A *target* is anything a graph node can call:

* an ``nn.Module`` subclass (exact class; registering a rule makes instances fx *leaves*),
* a Python callable (``torch.nn.functional.linear``, ``torch.add``, ``operator.add``),
* an ATen overload or overload packet (``torch.ops.aten.linear`` / ``.default``) or its name
  (``"aten.linear"``),
* a Tensor method name (``"Tensor.view"``).

All forms of one op point to one :class:`RuleEntry` whose ``key`` is the canonical name shown in
diagnostics, so the fx and export frontends feed the same rules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

RuleFn = Callable[..., Any]


@dataclass(frozen=True)
class RuleEntry:
    """A registered rule: canonical ``key`` and the function ``fn(ctx, call) -> dims``."""

    key: str
    fn: RuleFn


class RuleTable:
    """Maps canonical targets to rules. ``RULES`` is the default table used by inference."""

    def __init__(self) -> None:
        self._rules: dict[Any, RuleEntry] = {}

    def register(self, targets: Iterable[Any], entry: RuleEntry, *, replace: bool = False) -> None:
        """Map every form of ``targets`` to ``entry``.

        Registering a target that already has a different rule is an error unless ``replace=True``: two
        rules silently fighting over one op (e.g. ``F.batch_norm`` and ``torch.batch_norm``, whose arguments
        come in different orders) is how a rule ends up reading the wrong argument.
        """
        new: dict[Any, RuleEntry] = {}
        for t in targets:
            for c in canonical_targets(t):
                old = self._rules.get(c)
                if old is not None and old.fn is not entry.fn and not replace:
                    raise ValueError(
                        f"{_describe(c)} already has the rule {old.key!r} ({old.fn.__module__}.{old.fn.__qualname__}); "
                        f"pass replace=True to @fxmerge.rule to replace it with {entry.key!r}"
                    )
                new[c] = entry
        self._rules.update(new)

    def lookup_module(self, module: nn.Module) -> RuleEntry | None:
        return self._rules.get(type(module))

    def has_module(self, cls: type) -> bool:
        return cls in self._rules

    def lookup_function(self, target: Any) -> RuleEntry | None:
        entry = _get(self._rules, target)
        if entry is None and isinstance(target, torch._ops.OpOverload):
            entry = _get(self._rules, target.overloadpacket)
        if entry is None and isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
            entry = self._rules.get(("op", packet._qualified_op_name))
        return entry

    def lookup_method(self, name: str) -> RuleEntry | None:
        return self._rules.get(("method", name))

    def copy(self) -> RuleTable:
        t = RuleTable()
        t._rules = dict(self._rules)
        return t


def _describe(target: Any) -> str:
    if isinstance(target, tuple):
        return f"Tensor.{target[1]}" if target[0] == "method" else target[1]
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    mod = getattr(target, "__module__", None)
    return f"{mod}.{name}" if mod and not isinstance(target, torch._ops.OpOverloadPacket) else str(name)


def _get(rules: dict, target: Any) -> RuleEntry | None:
    try:
        return rules.get(target)
    except TypeError:  # unhashable target
        return None


def canonical_targets(t: Any) -> list[Any]:
    """The registry keys a user-facing target stands for."""
    if isinstance(t, str):
        if t.startswith("Tensor."):
            name = t.split(".", 1)[1]
            out: list[Any] = [("method", name)]
            fn = getattr(torch.Tensor, name, None)
            if fn is not None:
                out.append(fn)
            return out
        if "::" in t and not t.startswith("aten::"):  # a torch.library op by name, e.g. "mylib::my_op"
            return [("op", t.split(".", 1)[0])]
        if t.startswith(("aten.", "aten::")):
            name = t.replace("::", ".").split(".", 1)[1]
            packet_name, _, overload = name.partition(".")
            packet = getattr(torch.ops.aten, packet_name, None)
            if packet is None:
                return []
            return [getattr(packet, overload)] if overload else [packet]
        raise ValueError(
            f"rule target {t!r}: strings must look like 'Tensor.view', 'aten.view.default' or 'namespace::op' "
            "(a torch.library op, matched by name without importing its library)"
        )
    return [t]


class _DefaultTable(RuleTable):
    """The global table: the built-in rules are registered the first time the table is used (looked up,
    copied or added to), so what a capture sees never depends on which fxmerge modules were imported first."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module("fxmerge.infer.rules")

    def register(self, targets: Iterable[Any], entry: RuleEntry, *, replace: bool = False) -> None:
        self._load()
        super().register(targets, entry, replace=replace)

    def lookup_module(self, module: nn.Module) -> RuleEntry | None:
        self._load()
        return super().lookup_module(module)

    def has_module(self, cls: type) -> bool:
        self._load()
        return super().has_module(cls)

    def lookup_function(self, target: Any) -> RuleEntry | None:
        self._load()
        return super().lookup_function(target)

    def lookup_method(self, name: str) -> RuleEntry | None:
        self._load()
        return super().lookup_method(name)

    def copy(self) -> RuleTable:
        self._load()
        return super().copy()


RULES: RuleTable = _DefaultTable()


def rule(
    *targets: Any, key: str | None = None, table: RuleTable | None = None, replace: bool = False
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn(ctx, call)`` as the permutation rule of ``targets``.

    The rule receives a :class:`~fxmerge.infer.context.RuleContext` and a
    :class:`~fxmerge.infer.context.Call` and returns the output dims (a tuple of axis terms per tensor
    output, a list of those for tuple outputs, or ``None`` for non-tensor outputs). It must express
    every constraint the op imposes through ``ctx`` (``link``, ``unify``, ``freeze``, ``reshape``, and
    ``mix`` for axes along which values are combined): an axis a rule does not constrain is free, so when in
    doubt freeze it. A target that already has a rule is refused unless ``replace=True``.

    Example::

        @fxmerge.rule(MyScale)                    # a custom leaf module: y = x * self.gain
        def my_scale(ctx, call):
            x, gain = call.arg(0, "input"), call.param("gain")
            return ctx.elementwise(call, [x, gain])
    """

    def deco(fn: RuleFn) -> RuleFn:
        entry = RuleEntry(key or fn.__name__, fn)
        (table or RULES).register([t for t in targets if t is not None], entry, replace=replace)
        return fn

    return deco


def aten_packets(*names: str) -> list[Any]:
    """The ATen overload packets that exist among ``names`` (inplace ``name_`` variants included)."""
    out = []
    for n in names:
        for cand in (n, n + "_"):
            p = getattr(torch.ops.aten, cand, None)
            if p is not None:
                out.append(p)
    return out


def torch_forms(*names: str) -> list[Any]:
    """``torch.X``, ``torch.nn.functional.X``, ``Tensor.X`` (+ in-place) and ``aten.X`` for each name."""
    import torch.nn.functional as F

    out: list[Any] = []
    for n in names:
        for ns in (torch, F, torch.special, torch.linalg):
            fn = getattr(ns, n, None)
            if callable(fn) and not isinstance(fn, type):
                out.append(fn)
        for cand in (n, n + "_"):
            if hasattr(torch.Tensor, cand):
                out.append(f"Tensor.{cand}")
    out.extend(aten_packets(*names))
    return out
