"""YAML configs in mergekit's shape for task-vector merges, validated with pydantic.

Example::

    merge_method: ties
    base_model: ./base                  # paths are relative to the YAML file
    models:
      - model: ./math
        parameters: {weight: 0.5, density: [1.0, 0.5, 0.2]}       # gradient over layer depth
      - model: ./code
        parameters:
          weight: [{filter: mlp, value: 0.6}, {value: 0.4}]       # first matching filter wins
          density: 0.3
    parameters: {lambda: 1.0, normalize: true}
    dtype: float32
    out_dtype: bfloat16

Top-level extras: ``seed``, ``scope``, ``shape_policy``, ``shard_size``, ``exclude``. FusionBench
aliases are accepted in ``parameters``: ``scaling_factor`` (= ``lambda``) and ``sparsity_ratio``
(= ``1 - density``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fxmerge.errors import ConfigError, TaskVectorError
from fxmerge.taskvector.api import MergeReport, run_merge
from fxmerge.taskvector.methods import PRESETS, SCOPES, SHAPE_POLICIES, build_options, parse_dtype, parse_size
from fxmerge.taskvector.params import Param

PER_MODEL_KEYS = ("weight", "density")
GLOBAL_KEYS = ("lambda", "normalize", "rescale", "consensus", "int8_mask", "gamma", "epsilon", "t", "filter_wise",
               "bands", "band_factors", "shift", "outlier_mult", "block_outlier_mult", "min_density", "target",
               "scaling_factor", "sparsity_ratio", *PER_MODEL_KEYS)


class ModelEntry(BaseModel):
    """One entry of ``models:``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _per_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(value) - set(PER_MODEL_KEYS))
        if bad:
            raise ValueError(f"only {list(PER_MODEL_KEYS)} can be set per model, got {bad}; move other keys to the "
                             "top-level 'parameters'")
        for key, v in value.items():
            _param(key, v)
        return value


def _param(field: str, value: Any) -> Param:
    try:
        return Param.of(field, value)
    except TaskVectorError as exc:
        raise ValueError(str(exc)) from exc


class TaskVectorConfig(BaseModel):
    """A validated ``merge-tv`` config."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    scope: str = "tensor"
    shape_policy: str = "common"
    shard_size: int | str = "2GB"
    exclude: str | None = None
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _file: Path | None = PrivateAttr(default=None)

    @field_validator("merge_method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown method {value!r}; choose one of {sorted(PRESETS)}")
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        try:
            parse_dtype(value)
        except TaskVectorError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from exc
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        if value not in SCOPES:
            raise ValueError(f"{value!r} is not one of {list(SCOPES)}")
        return value

    @field_validator("shape_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in SHAPE_POLICIES:
            raise ValueError(f"{value!r} is not one of {list(SHAPE_POLICIES)}")
        return value

    @field_validator("shard_size")
    @classmethod
    def _shard(cls, value: int | str) -> int | str:
        try:
            parse_size(value)
        except TaskVectorError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from exc
        return value

    @field_validator("parameters")
    @classmethod
    def _globals(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(value) - set(GLOBAL_KEYS))
        if bad:
            raise ValueError(f"unknown key(s) {bad}; known: {sorted(GLOBAL_KEYS)}")
        if "lambda" in value and "scaling_factor" in value:
            raise ValueError("give 'lambda' or its alias 'scaling_factor', not both")
        if "density" in value and "sparsity_ratio" in value:
            raise ValueError("give 'density' or 'sparsity_ratio' (= 1 - density), not both")
        for key in PER_MODEL_KEYS:
            if key in value:
                _param(key, value[key])
        return value

    @model_validator(mode="after")
    def _not_only_base(self) -> TaskVectorConfig:
        if not self.fine_tunes():
            raise ValueError("models: every entry is the base_model; list at least one fine-tuned model")
        return self

    def fine_tunes(self) -> list[ModelEntry]:
        """Model entries other than the base (mergekit lets the base appear in ``models``)."""
        return [m for m in self.models if m.model != self.base_model]

    def resolve(self, path: str) -> Path:
        """A model path, relative paths taken from the config file's directory."""
        p = Path(path)
        return p if p.is_absolute() else self._root / p

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~fxmerge.taskvector.api.run_merge` (everything but ``out``)."""
        g = dict(self.parameters)
        g.pop("int8_mask", None)
        lam = g.pop("lambda", g.pop("scaling_factor", 1.0))
        if "sparsity_ratio" in g:
            g["density"] = 1.0 - float(g.pop("sparsity_ratio"))
        default_w, default_d = g.pop("weight", 1.0), g.pop("density", 1.0)
        entries = self.fine_tunes()
        weights = [_field(e, i, "weight", default_w) for i, e in enumerate(entries)]
        densities = [_field(e, i, "density", default_d) for i, e in enumerate(entries)]
        for key in ("bands", "band_factors"):
            if key in g and isinstance(g[key], list):
                g[key] = tuple(g[key])
        g.update(shape_policy=self.shape_policy, shard_size=self.shard_size, exclude=self.exclude,
                 out_dtype=parse_dtype(self.out_dtype))
        return dict(base=self.resolve(self.base_model), models=[self.resolve(e.model) for e in entries],
                    labels=[f"models[{i}] ({e.model})" for i, e in enumerate(entries)], method=self.merge_method,
                    weights=weights, density=densities, lam=lam, seed=self.seed, scope=self.scope, **g)


def _field(entry: ModelEntry, i: int, key: str, default: Any) -> Param:
    if key in entry.parameters:
        return Param.of(f"models[{i}].parameters.{key}", entry.parameters[key])
    return Param.of(f"parameters.{key}", default)


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_tv_config(data: Mapping[str, Any], root: Path | None = None, source: str = "config") -> TaskVectorConfig:
    """Validate an already-loaded mapping; ``root`` anchors relative model paths."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping with merge_method, base_model and models")
    try:
        cfg = TaskVectorConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_format(exc)}") from exc
    cfg._root = root or Path.cwd()
    return cfg


def load_tv_config(path: str | Path) -> TaskVectorConfig:
    """Read and validate a YAML config; errors are :class:`ConfigError` naming the offending field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    cfg = parse_tv_config(data, p.resolve().parent, str(p))
    cfg._file = p
    return cfg


def merge_from_config(cfg: TaskVectorConfig, out_dir: str | Path | None, *, progress: object = False,
                      overwrite: bool = False) -> tuple[Mapping[str, torch.Tensor], MergeReport]:
    """Run the merge a config describes; option errors are re-raised as :class:`ConfigError`."""
    kwargs = cfg.merge_kwargs()
    method_params = {k: v for k, v in kwargs.items() if k not in _RUN_ARGS}
    try:
        build_options(cfg.merge_method, cfg.scope, kwargs["lam"], cfg.seed, method_params)
    except TaskVectorError as exc:
        raise ConfigError(f"config parameters: {exc}") from exc
    try:
        config_file = [("config", cfg._file)] if cfg._file is not None else []
        return run_merge(out=out_dir, progress=progress, overwrite=overwrite, inputs=config_file, **kwargs)
    except TaskVectorError as exc:
        if _is_parameter_error(str(exc)):
            raise ConfigError(f"config {exc}") from exc
        raise


def _is_parameter_error(message: str) -> bool:
    """Whether a merge error is about a ``parameters:`` value of the config (not about an input file)."""
    return message.startswith("parameters.") or (message.startswith("models[") and ".parameters." in message)


_RUN_ARGS = ("base", "models", "labels", "method", "weights", "density", "lam", "seed", "scope")
