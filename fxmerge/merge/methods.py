"""Merge methods as registered, frozen settings objects.

A method is a small frozen dataclass that carries its own settings, says whether it needs data
(``needs_data``: activation statistics are computed for it) and solves one :class:`~fxmerge.merge.problem.Problem`
into a :class:`~fxmerge.merge.problem.Solution`. Methods are registered by name, the way rules are::

    @register_method("my_align")
    @dataclass(frozen=True)
    class MyAlign:
        needs_data: ClassVar[bool] = True
        def solve(self, problem: Problem) -> Solution:
            return problem.activation_first(MatchOptions("align"))

``fxmerge.merge(models, method="mudsc", alpha=0.3)`` resolves the name through the registry with those
settings; ``fxmerge.merge(models, method=MuDSC(alpha=0.3))`` passes the object itself. Built-ins are
pydantic dataclasses: their settings are validated (types and ranges) on construction, in Python and YAML alike.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from fxmerge.errors import MergeInputError
from fxmerge.merge.engine import MatchOptions
from fxmerge.merge.options import HeteroOptions, MergeOptions
from fxmerge.merge.problem import Problem, Solution
from fxmerge.merge.select import DEFAULT_GRID

__all__ = [
    "ActAlign",
    "Average",
    "Method",
    "MuDSC",
    "Rebasin",
    "WZip",
    "ZipIt",
    "method_names",
    "register_method",
    "resolve",
    "resolve_method",
    "settings_of",
]

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Sweeps = Annotated[int, Field(ge=1)]
_STRICT = ConfigDict(extra="forbid")


@runtime_checkable
class Method(Protocol):
    """What the engine needs from a method: ``needs_data`` and ``solve``. ``one_to_one``: whether the
    solution is a permutation per model (aligned models, interpolation and REPAIR need it)."""

    needs_data: ClassVar[bool]

    def solve(self, problem: Problem) -> Solution: ...


_REGISTRY: dict[str, type] = {}


def register_method(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: register a method class under ``name`` (a duplicate name is refused unless ``replace``)."""

    def deco(cls: type) -> type:
        if not replace and name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                             "pass replace=True to override it")  # fmt: skip
        if not callable(getattr(cls, "solve", None)) or not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__qualname__}: a method is a dataclass with a solve(problem) method")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return deco


def method_names() -> tuple[str, ...]:
    """Registered method names, built-ins first."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MergeInputError(f"unknown method {name!r}{hint}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def settings_of(cls_or_obj: Any) -> dict[str, Any]:
    """A method's settings and their defaults (``dataclasses.MISSING`` for required ones)."""
    out = {}
    for f in dataclasses.fields(cls_or_obj):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING
    return out


def aliases_of(cls: type) -> dict[str, str]:
    """Other names a method accepts for its settings (the flat option names of YAML configs and the CLI)."""
    return dict(getattr(cls, "aliases", {}))


def resolve_method(method: Any, **settings: Any) -> Any:
    """A method object from a registered name and settings, or the given object (no settings then).

    Raises :class:`~fxmerge.errors.MergeInputError` naming an unknown method, a setting the method does not
    have (and the methods that have it), or an invalid value.
    """
    if not isinstance(method, str):
        if not (dataclasses.is_dataclass(method) and callable(getattr(method, "solve", None))):
            raise MergeInputError(f"method must be a name ({', '.join(_REGISTRY)}) or a method object, got "
                                  f"{type(method).__name__}")  # fmt: skip
        if settings:
            raise MergeInputError(f"settings {sorted(settings)} were given next to a method object; put them in "
                                  f"the object, e.g. {type(method).__name__}(...)")  # fmt: skip
        return method
    cls = method_class(method)
    return build_method(cls, settings, method)


def build_method(cls: type, settings: dict[str, Any], name: str) -> Any:
    fields = settings_of(cls)
    alias = aliases_of(cls)
    kwargs: dict[str, Any] = {}
    for key, value in settings.items():
        target = alias.get(key, key)
        if target not in fields:
            owners = [n for n, c in _REGISTRY.items() if key in settings_of(c) or key in aliases_of(c)]
            where = f"; it is a setting of {', '.join(owners)}" if owners else ""
            have = ", ".join(fields) or "none"
            raise MergeInputError(f"unknown merge option {key!r}: method {name!r} has no such setting{where} "
                                  f"({name}'s settings: {have}; merge options: {', '.join(_OPTION_FIELDS)}; "
                                  f"depth/width options: {', '.join(_HETERO_FIELDS)})")  # fmt: skip
        kwargs[target] = value
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise MergeInputError(f"method {name!r}: {describe_validation(e)}") from None


def describe_validation(e: ValidationError) -> str:
    """One line per problem: ``alpha=1.5: Input should be less than or equal to 1``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg")).removeprefix("Value error, ")
        parts.append(f"{loc}={err.get('input')!r}: {msg}" if loc else msg)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- built-ins


@register_method("average")
@dataclass(frozen=True, config=_STRICT)
class Average:
    """Plain weight averaging (no matching, no statistics, no spec needed)."""

    needs_data: ClassVar[bool] = False
    needs_spec: ClassVar[bool] = False
    one_to_one: ClassVar[bool] = True

    def solve(self, problem: Problem) -> Solution:
        return Solution(dict(problem.init))


@register_method("rebasin")
@dataclass(frozen=True, config=_STRICT)
class Rebasin:
    """Git Re-Basin weight matching: coordinate descent on the weights' inner products, in random order,
    until a full sweep changes no permutation (or ``max_sweeps``).

    ``start="forward"`` (default) begins with one greedy sweep in data-flow order in which each space reads only
    the neighbours already matched in that sweep (a better start and far fewer hard assignment problems; see
    docs/methods.md); ``start="identity"`` is the paper's start: random order from identity permutations."""

    max_sweeps: Sweeps = 30
    start: Literal["forward", "identity"] = "forward"
    needs_data: ClassVar[bool] = False
    one_to_one: ClassVar[bool] = True

    def solve(self, problem: Problem) -> Solution:
        opts = MatchOptions("align")
        sol = problem.descend(opts, kind="dot", max_sweeps=self.max_sweeps, forward=self.start == "forward")
        ws = problem.weights("dot", cross_only=True)  # report inner products as cosines (same matching)
        sol.sims = {k: ws.cosine(k, s) for k, s in sol.sims.items()}
        return sol


@register_method("act_align")
@dataclass(frozen=True, config=_STRICT)
class ActAlign:
    """Activation alignment: Hungarian matching of activation correlations, one pass."""

    needs_data: ClassVar[bool] = True
    one_to_one: ClassVar[bool] = True

    def solve(self, problem: Problem) -> Solution:
        return problem.activation_first(MatchOptions("align"))


@register_method("zipit")
@dataclass(frozen=True, config=_STRICT)
class ZipIt:
    """ZipIt: greedy zipping on activation correlations, within models as well as across them. ``alpha``
    decays a merged unit's further matches, ``beta`` is the within-model merge budget. Merges models of
    different widths (elastic)."""

    alpha: Unit = 0.5
    beta: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    needs_data: ClassVar[bool] = True
    one_to_one: ClassVar[bool] = False
    aliases: ClassVar[dict[str, str]] = {"zip_alpha": "alpha", "zip_beta": "beta"}

    def solve(self, problem: Problem) -> Solution:
        return problem.activation_first(MatchOptions("zip", zip_alpha=self.alpha, zip_beta=self.beta))


@register_method("wzip")
@dataclass(frozen=True, config=_STRICT)
class WZip:
    """Zipping on weight correlations (no data), by coordinate descent over the spaces; ``start`` as for
    :class:`Rebasin`."""

    alpha: Unit = 0.5
    beta: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    max_sweeps: Sweeps = 30
    start: Literal["forward", "identity"] = "forward"
    needs_data: ClassVar[bool] = False
    one_to_one: ClassVar[bool] = False
    aliases: ClassVar[dict[str, str]] = {"zip_alpha": "alpha", "zip_beta": "beta"}

    def solve(self, problem: Problem) -> Solution:
        opts = MatchOptions("zip", zip_alpha=self.alpha, zip_beta=self.beta)
        return problem.descend(opts, kind="corr", max_sweeps=self.max_sweeps, patience=2,
                               forward=self.start == "forward")  # fmt: skip


@register_method("mudsc")
@dataclass(frozen=True, config=_STRICT)
class MuDSC:
    """MuDSC (dual-space): ``alpha * S_weight + (1 - alpha) * S_activation``, solved by coordinate descent in
    random order from the activation matching, stopping at a fixed point or after ``patience`` sweeps without
    improvement. ``matcher="zip"`` is the paper's headline MuDSC-Zip; ``"align"`` is MuDSC-Align.

    ``alpha="auto"`` merges once per value of ``alpha_grid`` (the activation statistics are computed once) and
    keeps the merge that ``score(model) -> float`` rates highest (higher is better; Python API only), or without
    ``score`` the one whose outputs agree best with the parents' (a label-free proxy, see
    :mod:`fxmerge.merge.select`). The choice and every grid point's score are in ``result.report["alpha_selection"]``.
    """

    alpha: float | Literal["auto"] = 0.25
    matcher: Literal["align", "zip"] = "zip"
    max_sweeps: Sweeps = 30
    patience: Sweeps = 5
    zip_alpha: Unit = 0.5
    zip_beta: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    score: Callable | None = None
    alpha_grid: list[float] = DEFAULT_GRID  # type: ignore[assignment]  # stored as a tuple (hashable)
    needs_data: ClassVar[bool] = True

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        if isinstance(value, str) and value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Input should be a valid number in [0, 1] or 'auto', got {value!r}")
        if not 0.0 <= value <= 1.0:  # NaN included
            bound = ("a finite number" if value != value else
                     "less than or equal to 1" if value > 0.5 else "greater than or equal to 0")  # fmt: skip
            raise ValueError(f"Input should be {bound} (alpha is a number in [0, 1] or 'auto'), got {value!r}")
        return float(value)

    @field_validator("score", mode="before")
    @classmethod
    def _score(cls, value: Any) -> Any:
        if value is not None and not callable(value):
            raise ValueError(f"score must be a Python callable model -> float (higher is better), got "
                             f"{type(value).__name__} {value!r:.60}; a callable can only be passed from Python "
                             "(fxmerge.merge(..., score=fn)), not from a YAML config or the command line; leave "
                             "it out to select alpha='auto' with the label-free proxy")  # fmt: skip
        return value

    @field_validator("alpha_grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        items = list(value) if isinstance(value, (list, tuple)) else None
        if not items or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0
                            for a in items):  # fmt: skip
            raise ValueError(f"alpha_grid must be a non-empty list of numbers in [0, 1], got {value!r}")
        return [float(a) for a in items]

    @field_validator("alpha_grid", mode="after")
    @classmethod
    def _frozen_grid(cls, value: list[float]) -> tuple[float, ...]:
        return tuple(value)  # hashable, like every other setting

    @model_validator(mode="after")
    def _score_needs_auto(self) -> MuDSC:
        if self.score is not None and self.alpha != "auto":
            raise ValueError(f"score is used only to select alpha='auto'; alpha is {self.alpha}")
        return self

    @property
    def one_to_one(self) -> bool:
        return self.matcher == "align"

    def candidates(self) -> list[MuDSC]:
        """For ``alpha="auto"``: one method per grid value (what a one-alpha merge would use); else ``[]``."""
        if self.alpha != "auto":
            return []
        return [dataclasses.replace(self, alpha=a, score=None) for a in self.alpha_grid]

    def solve(self, problem: Problem) -> Solution:
        if self.alpha == "auto":
            raise MergeInputError("MuDSC(alpha='auto') is resolved by fxmerge.merge (one merge per alpha of "
                                  "alpha_grid, the best kept); solve() needs a number")  # fmt: skip
        opts = MatchOptions(self.matcher, zip_alpha=self.zip_alpha, zip_beta=self.zip_beta)
        start = problem.activation_first(opts)
        return problem.descend(opts, kind="corr", alpha=self.alpha, init=start.transforms,
                               max_sweeps=self.max_sweeps, patience=self.patience)  # fmt: skip


def method_name(method: Any) -> str:
    """The registered name of a method object (its class name if it was never registered)."""
    return str(getattr(type(method), "name", type(method).__name__))


def method_settings(method: Any) -> dict[str, Any]:
    """A method object's settings as plain values (for reports)."""
    return {f.name: _plain(getattr(method, f.name)) for f in dataclasses.fields(method)}


def _plain(value: Any) -> Any:
    """A setting as plain JSON: callables by name, tuples as lists."""
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


_OPTION_FIELDS = set(MergeOptions.model_fields)
_HETERO_FIELDS = set(HeteroOptions.model_fields)


def resolve(
    method: Any, settings: dict[str, Any], options: MergeOptions | None, hetero: HeteroOptions | None
) -> tuple[Any, MergeOptions, HeteroOptions]:
    """Split flat keywords into the method's settings, :class:`MergeOptions` and :class:`HeteroOptions`."""
    own = {k: v for k, v in settings.items() if k in _OPTION_FIELDS}
    het = {k: v for k, v in settings.items() if k in _HETERO_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in own and k not in het}
    if own and options is not None:
        raise MergeInputError(f"{sorted(own)} given both as keywords and in options=; use one")
    if het and hetero is not None:
        raise MergeInputError(f"{sorted(het)} given both as keywords and in hetero=; use one")
    meth = resolve_method(method, **rest)
    try:
        opts = options if options is not None else MergeOptions(**own)
        hopt = hetero if hetero is not None else HeteroOptions(**het)
    except ValidationError as e:
        raise MergeInputError(f"merge options: {describe_validation(e)}") from None
    return meth, opts, hopt
