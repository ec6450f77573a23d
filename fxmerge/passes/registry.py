"""Registered post-passes: corrections that run on the merged model after a merge, named in ``post=[...]``.

A post-pass is a function ``fn(model, ctx, **settings) -> (model, info)`` registered by name::

    @register_post_pass("my_fix")
    def my_fix(model: nn.Module, ctx: PostContext, *, strength: float = 1.0) -> tuple[nn.Module, dict]:
        ...  # return a corrected copy of ``model`` and a JSON-able summary for the merge report

``fxmerge.merge(models, method="zipit", data=data, example_inputs=x, post=["norm_repair"])`` runs the named
passes in order after the merge (after ``repair`` and the BatchNorm reset). An entry is a name or a one-key
mapping ``{name: {setting: value}}``, in Python and in YAML configs alike; names and setting names are checked
when the options are built. :class:`PostContext` gives a pass what the merge knows: the parent models, the
spec and the matching of every merge space, the data, and :meth:`PostContext.merge_units`, which maps
per-unit values of each parent (e.g. activation statistics) into the merged model's units exactly the way
the parents' weights were merged (averages of matched or zipped units), for any method.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "PostContext",
    "parse_post",
    "post_pass",
    "post_pass_names",
    "register_post_pass",
    "run_post_passes",
]

PostPass = Callable[..., tuple[nn.Module, Any]]
_REGISTRY: dict[str, PostPass] = {}


def register_post_pass(name: str, *, replace: bool = False) -> Callable[[PostPass], PostPass]:
    """Function decorator: register a post-pass under ``name`` (a duplicate name is refused unless ``replace``).

    The function takes the merged model and a :class:`PostContext` positionally and its settings as keyword-only
    arguments with defaults; it returns ``(new_model, info)`` and must not modify the model it is given.
    """

    def deco(fn: PostPass) -> PostPass:
        if not replace and name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(
                f"a post-pass named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                "pass replace=True to override it"
            )
        if not callable(fn):
            raise TypeError(f"post-pass {name!r} must be a function fn(model, ctx, **settings)")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
            raise TypeError(f"post-pass {name!r}: the signature is fn(model, ctx, *, setting=default, ...)")
        fn.post_pass_name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = fn
        return fn

    return deco


def post_pass_names() -> tuple[str, ...]:
    """Registered post-pass names, built-ins first."""
    _load_builtins()
    return tuple(_REGISTRY)


def post_pass(name: str) -> PostPass:
    """The registered post-pass ``name`` (a ``ValueError`` naming the closest registered name otherwise)."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown post-pass {name!r}{hint}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def settings_of(name: str) -> dict[str, Any]:
    """A post-pass's settings and their defaults."""
    params = inspect.signature(post_pass(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def parse_post(entries: Sequence[str | Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, settings), ...]`` from ``post=`` entries; a ``ValueError`` for an unknown name or setting."""
    if isinstance(entries, (str, Mapping)):
        raise ValueError("post must be a list of post-pass names or {name: {setting: value}} mappings")
    out = []
    for entry in entries:
        if isinstance(entry, str):
            name, settings = entry, {}
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, settings = next(iter(entry.items()))
            settings = {} if settings is None else settings
            if not isinstance(settings, Mapping):
                raise ValueError(f"post-pass {name!r}: settings must be a mapping, got {settings!r}")
        else:
            raise ValueError(f"a post entry is a name or a one-key mapping {{name: {{settings}}}}, got {entry!r}")
        have = settings_of(name)
        unknown = sorted(set(settings) - set(have))
        if unknown:
            raise ValueError(
                f"post-pass {name!r} has no setting(s) {unknown}; its settings: {', '.join(have) or 'none'}"
            )
        out.append((name, dict(settings)))
    return out


@dataclass
class PostContext:
    """What a post-pass can use: the parents, the merge's spec and matchings, the data and pass options.

    ``spec`` is None for plain averaging (the parents are then taken unit for unit). ``one_to_one`` says
    whether every parent was permuted onto the merged units (align methods), which :meth:`aligned` needs.
    ``spec`` and ``spaces`` describe the merged model; the parents share them unless ``model_specs`` and
    ``model_transforms`` give each parent its own spec and matchings (heterogeneous merges: parents of different
    widths, keyed by their own layouts).
    """

    models: Sequence[nn.Module]
    spec: Any
    spaces: dict
    transforms: dict
    data: Any
    one_to_one: bool
    num_batches: int | None = None
    progress: bool = True
    model_specs: Sequence[Any] | None = None
    model_transforms: Sequence[dict] | None = None
    _aligned: list[nn.Module] | None = None

    @property
    def run(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~fxmerge.passes.bn.run_batches` (and of repair/reset_bn) for a data pass."""
        return {"num_batches": self.num_batches, "progress": self.progress}

    def merge_units(self, values: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-parent per-unit values, merged unit for unit as the parents' weights were.

        ``values[m][name]`` is a vector over the units of axis 0 (the output units) of parameter ``name`` of
        parent ``m``, e.g. the output statistics of a layer with weight ``name``. The result holds, per merged
        unit, what the merge made of the units merged into it: for permutations the average of the matched
        units, for zipping the average of the zipped units (plain averages where axis 0 was not merged).
        """
        from fxmerge.merge.transform import apply_layout

        n = len(self.models)
        specs = self.model_specs or [self.spec] * n
        transforms = self.model_transforms or [self.transforms] * n
        out = {}
        for name in values[0]:
            vals = [v[name].detach().double().flatten() for v in values]
            lays = [sp.axes.get(name) if sp is not None else None for sp in specs]
            if all(lays):
                out[name] = sum(
                    apply_layout(x, 0, lay[0], m, n, tr, True)
                    for m, (x, lay, tr) in enumerate(zip(vals, lays, transforms, strict=True))
                )
            else:
                out[name] = sum(vals) / n
        return out

    def aligned(self) -> list[nn.Module]:
        """The parents permuted onto the merged units (one-to-one merges only)."""
        if not self.one_to_one:
            raise ValueError("aligned parents exist only for one-to-one merges (align methods, average)")
        if self._aligned is None:
            if self.spec is None:
                self._aligned = list(self.models)
            else:
                from fxmerge.merge.result import aligned_models

                self._aligned = aligned_models(self.models, self.spec, self.spaces, self.transforms)
        return self._aligned


def run_post_passes(
    model: nn.Module, ctx: PostContext, entries: Sequence[str | Mapping[str, Any]]
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run ``entries`` in order; the model after the last pass and one report entry per pass."""
    log = []
    for name, settings in parse_post(entries):
        model, info = post_pass(name)(model, ctx, **settings)
        log.append({"name": name, "settings": settings, "info": info})
    return model, log


def _load_builtins() -> None:
    import fxmerge.passes.norm  # noqa: F401  (registers the built-in post-passes)
