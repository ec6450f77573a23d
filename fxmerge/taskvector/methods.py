"""Method presets and the validated option set of one task-vector merge.

Every method is the same engine with different defaults::

    delta_t = model_t - base                (float32)
    s_t     = sparsify(delta_t; density_t, scope)      [+ rescale]
    merged  = combine({s_t}, weights; consensus, normalize)
    out     = base + lam * merged           (cast to out_dtype)

``method_params`` may override any preset default (``consensus``, ``normalize``, ``rescale``) and
set method knobs (``gamma``, ``epsilon``, ``t``, DPPA's ``bands``/``band_factors``/``shift``/...) and
engine knobs (``out_dtype``, ``shape_policy``, ``shard_size``, ``overwrite``, ``progress``, ``exclude``,
``threads``: torch intra-op threads while merging, default 1 because the streamed element-wise work is
memory-bound and OpenMP barriers stall badly on small or busy machines; restored afterwards;
``piece_size``: elements per piece when an elementwise merge (no sparsification, linear combine) streams a
large tensor in pieces, default 2**20 so the pieces of every input stay in the CPU cache).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from fxmerge.errors import TaskVectorError


@dataclass(frozen=True)
class MethodSpec:
    """Preset: sparsifier, sign consensus, normalisation, rescale and combine rule."""

    sparsify: str | None
    consensus: str | None
    normalize: bool
    rescale: str
    combine: str = "linear"


PRESETS: dict[str, MethodSpec] = {
    "task_arithmetic": MethodSpec(None, None, False, "none"),
    "ties": MethodSpec("magnitude", "sum", True, "none"),
    "dare_linear": MethodSpec("random", None, False, "inverse"),
    "dare_ties": MethodSpec("random", "sum", False, "inverse"),
    "della": MethodSpec("della", "sum", True, "inverse"),
    "della_linear": MethodSpec("della", None, False, "inverse"),
    "breadcrumbs": MethodSpec("breadcrumbs", None, False, "none"),
    "breadcrumbs_ties": MethodSpec("breadcrumbs", "sum", False, "none"),
    "model_stock": MethodSpec(None, None, False, "none", combine="model_stock"),
    "slerp": MethodSpec(None, None, False, "none", combine="slerp"),
    "dppa": MethodSpec("dppa", None, False, "none"),
}
SCOPES = ("global", "tensor", "row", "layer_adaptive")
SHAPE_POLICIES = ("common", "base", "union", "error")
RESCALES = ("none", "inverse", "l1")
DEFAULT_TARGET = r"\.\d+\..*weight$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DppaOptions:
    """DPPA knobs (see docs/taskvector.md): band edges as fractions of the density, factors, DP shift."""

    bands: tuple[float, ...] = (0.5, 1.0)
    band_factors: tuple[float, ...] = (1.8, 1.0)
    shift: float = 0.08
    outlier_mult: float = 5.0
    block_outlier_mult: float = 3.0
    min_density: float = 1e-3
    target: str = DEFAULT_TARGET


@dataclass(frozen=True)
class MergeOptions:
    """Everything the engine needs besides the inputs and the per-model weights/densities."""

    method: str
    spec: MethodSpec
    scope: str = "tensor"
    lam: float = 1.0
    seed: int = 0
    gamma: float = 0.01
    epsilon: float = 0.15
    t: float = 0.5
    filter_wise: bool = False
    dppa: DppaOptions = field(default_factory=DppaOptions)
    out_dtype: torch.dtype | None = None
    shape_policy: str = "common"
    shard_size: int = 2 * 1024**3
    overwrite: bool = False
    exclude: str | None = None
    progress: bool | Callable[[int, int], None] = False
    threads: int = 1
    piece_size: int = 1 << 20


def parse_size(value: object, field_name: str = "shard_size") -> int:
    """Bytes from an int or a string like ``"500MB"``, ``"2GB"``, ``"1.5G"`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise TaskVectorError(f"{field_name}: expected a positive byte count or a size like '2GB', got {value!r}")
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise TaskVectorError(f"{field_name}: must be positive, got {value!r}")
    return size


def parse_dtype(value: object, field_name: str = "out_dtype") -> torch.dtype | None:
    """A floating torch dtype from a dtype or a name (``"bfloat16"``, ``"bf16"``, ``"float16"``, ...)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64, "fp64": torch.float64}
    key = str(value).removeprefix("torch.").lower()
    if key not in names:
        raise TaskVectorError(f"{field_name}: unknown dtype {value!r}; use one of {sorted(set(names))}")
    return names[key]


def _num(params: dict, key: str, default: float, lo: float, hi: float, open_lo: bool = False) -> float:
    value = params.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TaskVectorError(f"{key}: expected a number, got {value!r}")
    if value < lo or value > hi or (open_lo and value == lo):
        bracket = "(" if open_lo else "["
        raise TaskVectorError(f"{key}: {value} is outside {bracket}{lo}, {hi}]")
    return float(value)


def _choice(params: dict, key: str, default: object, allowed: tuple) -> object:
    value = params.pop(key, default)
    if value not in allowed:
        raise TaskVectorError(f"{key}: {value!r} is not one of {list(allowed)}")
    return value


def _float_tuple(params: dict, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    value = params.pop(key, default)
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, int | float) for v in value):
        raise TaskVectorError(f"{key}: expected a non-empty list of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _dppa_options(params: dict) -> DppaOptions:
    d = DppaOptions()
    bands = _float_tuple(params, "bands", d.bands)
    factors = _float_tuple(params, "band_factors", d.band_factors)
    if len(bands) != len(factors):
        raise TaskVectorError(f"band_factors: {len(factors)} factors for {len(bands)} bands; give one factor per band")
    if any(b <= 0 or b > 1 for b in bands) or list(bands) != sorted(set(bands)) or bands[-1] != 1.0:
        raise TaskVectorError(f"bands: {bands} must be strictly increasing fractions of the density in (0, 1], ending at 1.0")
    target = params.pop("target", d.target)
    try:
        re.compile(target)
    except (re.error, TypeError) as exc:
        raise TaskVectorError(f"target: {target!r} is not a valid regular expression ({exc})") from exc
    return DppaOptions(
        bands=bands, band_factors=factors,
        shift=_num(params, "shift", d.shift, 0.0, 1.0),
        outlier_mult=_num(params, "outlier_mult", d.outlier_mult, 0.0, 1e6, open_lo=True),
        block_outlier_mult=_num(params, "block_outlier_mult", d.block_outlier_mult, 0.0, 1e6, open_lo=True),
        min_density=_num(params, "min_density", d.min_density, 0.0, 1.0, open_lo=True),
        target=target,
    )


def build_options(method: str, scope: str, lam: float, seed: int, method_params: dict) -> MergeOptions:
    """Validate the method name and every option; unknown keys are an error naming the known ones."""
    if method not in PRESETS:
        raise TaskVectorError(f"unknown method {method!r}; choose one of {sorted(PRESETS)}")
    if scope not in SCOPES:
        raise TaskVectorError(f"scope: {scope!r} is not one of {list(SCOPES)}")
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam):
        raise TaskVectorError(f"lam: expected a finite number, got {lam!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskVectorError(f"seed: expected an integer, got {seed!r}")
    params = dict(method_params)
    spec = PRESETS[method]
    spec = replace(
        spec,
        consensus=_choice(params, "consensus", spec.consensus, (None, "sum", "count")),
        normalize=bool(_choice(params, "normalize", spec.normalize, (True, False))),
        rescale=str(_choice(params, "rescale", spec.rescale, RESCALES)),
    )
    if method == "dppa":
        scope = "layer_adaptive"
    progress = params.pop("progress", False)
    if not (isinstance(progress, bool) or callable(progress)):
        raise TaskVectorError(f"progress: expected a bool or a callable(done, total), got {progress!r}")
    exclude = params.pop("exclude", None)
    if exclude is not None:
        try:
            re.compile(exclude)
        except (re.error, TypeError) as exc:
            raise TaskVectorError(f"exclude: {exclude!r} is not a valid regular expression ({exc})") from exc
    opts = MergeOptions(
        method=method, spec=spec, scope=scope, lam=float(lam), seed=seed,
        gamma=_num(params, "gamma", 0.01, 0.0, 1.0),
        epsilon=_num(params, "epsilon", 0.15, 0.0, 1.0),
        t=_num(params, "t", 0.5, 0.0, 1.0),
        filter_wise=bool(_choice(params, "filter_wise", False, (True, False))),
        dppa=_dppa_options(params),
        out_dtype=parse_dtype(params.pop("out_dtype", None)),
        shape_policy=str(_choice(params, "shape_policy", "common", SHAPE_POLICIES)),
        shard_size=parse_size(params.pop("shard_size", 2 * 1024**3)),
        overwrite=bool(_choice(params, "overwrite", False, (True, False))),
        exclude=exclude,
        progress=progress,
        threads=int(_num(params, "threads", 1, 1, 1024)),
        piece_size=int(_num(params, "piece_size", 1 << 20, 1, 1 << 40)),
    )
    if params:
        known = ["consensus", "normalize", "rescale", "gamma", "epsilon", "t", "filter_wise", "bands", "band_factors",
                 "shift", "outlier_mult", "block_outlier_mult", "min_density", "target", "out_dtype", "shape_policy",
                 "shard_size", "overwrite", "exclude", "progress", "threads", "piece_size"]
        raise TaskVectorError(f"unknown option(s) {sorted(params)} for method {method!r}; known options: {known}")
    _check_scope(opts)
    return opts


def _check_scope(opts: MergeOptions) -> None:
    sp = opts.spec.sparsify
    if opts.scope == "global" and sp not in (None, "magnitude", "random"):
        raise TaskVectorError(f"scope 'global' supports magnitude (ties) and random (dare) sparsification, not {sp!r}")
    if opts.scope == "layer_adaptive" and sp not in ("magnitude", "dppa"):
        raise TaskVectorError(f"scope 'layer_adaptive' (DPPA's DP densities) needs magnitude sparsification, not {sp!r}")
    if opts.scope == "row" and sp == "breadcrumbs":
        raise TaskVectorError("scope 'row' is not supported by breadcrumbs; use scope 'tensor'")
