"""The YAML schema of ``fxmerge merge``, validated with pydantic.

Every error names the YAML field it is about (``models[1].checkpoint: file not found: ...``). Paths are taken
relative to the YAML file's folder (or the current folder for a config given as a dict). Validation checks
everything that can be checked without building a model: types, ranges, unknown keys, that files and folders
exist and that ``pkg.module:callable`` references import.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fxmerge.config.refs import check_callable, check_model_ref, resolve_path
from fxmerge.errors import ConfigError
from fxmerge.merge.api import METHODS, NEEDS_DATA

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HETERO_ONLY = ("where", "blocks", "cka_batches")
_SHAPE_TEXT = re.compile(r"\s*\d+(\s*[,x]\s*\d+)*\s*")


def _root_of(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("root") or Path.cwd())


def _shape(value: Any) -> Any:
    """``"1,3,64,64"`` or ``"1x3x64x64"`` -> ``[1, 3, 64, 64]``; other values are left to pydantic."""
    if isinstance(value, str):
        if not _SHAPE_TEXT.fullmatch(value):
            raise ValueError(f"{value!r} is not a list of integers such as [1, 3, 64, 64] or '1,3,64,64'")
        return [int(p) for p in re.split(r"[,x]", value.replace(" ", ""))]
    return value


def _check_shape(value: list[int] | None) -> list[int] | None:
    if value is not None and (not value or any(d < 1 for d in value)):
        raise ValueError(f"every dimension must be >= 1, got {value}")
    return value


Shape = Annotated[list[int] | None, BeforeValidator(_shape), AfterValidator(_check_shape)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One entry of ``models:``: a model reference, optional weights and example-input shape."""

    model: str = Field(description="torchvision:NAME, timm:NAME, hf:CONFIG_DIR or package.module:callable")
    checkpoint: str | None = Field(None, description="state dict to load: .pt/.pth/.bin (torch.save) or .safetensors")
    input_shape: Shape = Field(None, description="example input shape, e.g. [1, 3, 224, 224]")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str, info: ValidationInfo) -> str:
        return check_model_ref(value, _root_of(info))

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = resolve_path(value, _root_of(info))
        if not path.is_file():
            raise ValueError(f"file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"{path.name} should end in {', '.join(CHECKPOINT_SUFFIXES)}")
        return str(path)


class MergeOptions(_Strict):
    """``options:``, the keyword arguments of ``fxmerge.merge`` (see docs/methods.md)."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="mudsc: weight share of the weight vs activation similarity")
    matcher: Literal["align", "zip"] = Field("align", description="mudsc: one-to-one alignment or zipping")
    seed: int = Field(0, description="seed of the random sweep order and sampling")
    reset_bn: bool = Field(True, description="re-estimate BatchNorm statistics on the data after merging")
    repair: bool = Field(False, description="REPAIR: rescale producer layers to the parents' statistics (needs data)")
    stop_at: str | None = Field(None, description="partial zipping: merge up to this module, keep N tails after it")
    depth: Literal["lma", "sma", "uniform"] | None = Field(None, description="merge models of different depth")
    width: str | int | dict[int, int] | None = Field(
        None, description="merge models of different width: 'max', 'min', a width, or {group id: width}")
    where: Literal["start", "end"] = Field("start", description="depth: a shallow block goes to its segment's start/end")
    blocks: list[list[str | list[str]] | None] | None = Field(
        None, description="depth: per model, its block module names (default: found automatically)")
    cka_batches: int | None = Field(None, ge=1, description="depth: batches used for the CKA alignment")
    zip_alpha: float = Field(0.5, ge=0.0, le=1.0, description="ZipIt: decay of a merged unit's further matches")
    zip_beta: float = Field(1.0, ge=0.0, description="ZipIt: budget of within-model merges")
    max_batches: int | None = Field(None, ge=1, description="use at most this many data batches per pass")
    max_sweeps: int = Field(30, ge=1, description="rebasin/mudsc: coordinate-descent sweeps at most")
    patience: int = Field(5, ge=1, description="mudsc: stop after this many sweeps without improvement")
    frontend: Literal["auto", "fx", "export"] = Field("auto", description="graph capture: torch.fx or torch.export")

    @field_validator("width")
    @classmethod
    def _width(cls, value: str | int | dict[int, int] | None) -> str | int | dict[int, int] | None:
        if isinstance(value, str) and value not in ("max", "min"):
            raise ValueError(f"must be 'max', 'min', a positive width or a mapping group id -> width, got {value!r}")
        widths = value.values() if isinstance(value, dict) else [value] if isinstance(value, int) else []
        if any(w < 1 for w in widths):
            raise ValueError(f"widths must be >= 1, got {value}")
        return value

    @property
    def hetero(self) -> bool:
        """Whether depth or width heterogeneity is switched on."""
        return self.depth is not None or self.width is not None

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fxmerge.merge` (the depth/width options only when they apply)."""
        kwargs = self.model_dump()
        if not self.hetero:
            for key in HETERO_ONLY:
                kwargs.pop(key)
        return kwargs


class DigitsData(_Strict):
    """scikit-learn's bundled 8x8 digits as ``[B, 1, 8, 8]`` images (nothing is downloaded)."""

    classes: list[int] = Field(default_factory=lambda: list(range(10)), min_length=1, description="digits to use")
    split: Literal["train", "test"] = Field("train", description="which part of the stratified split")
    batch_size: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1, description="use at most this many images")
    seed: int = Field(0, description="seed of the train/test split")

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or not all(0 <= c <= 9 for c in value):
            raise ValueError(f"must be distinct digits in 0-9, got {value}")
        return value


class ImageFolderData(_Strict):
    """A ``torchvision.datasets.ImageFolder`` (one sub-folder per class), resized and center-cropped."""

    path: str = Field(description="folder with one sub-folder of images per class")
    size: int = Field(224, ge=1, description="resize the short side, then center-crop to size x size")
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1, description="use at most this many images, evenly spread")
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], description="per-channel mean")
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225], description="per-channel std")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str, info: ValidationInfo) -> str:
        path = resolve_path(value, _root_of(info))
        if not path.is_dir():
            raise ValueError(f"folder not found: {path}")
        return str(path)

    @field_validator("std")
    @classmethod
    def _std(cls, value: list[float]) -> list[float]:
        if any(s <= 0 for s in value):
            raise ValueError(f"every std must be > 0, got {value}")
        return value


class DataConfig(_Strict):
    """``data:``, exactly one source of input batches."""

    digits: DigitsData | None = Field(None, description="see data.digits")
    image_folder: ImageFolderData | None = Field(None, description="see data.image_folder")
    callable: str | None = Field(None, description="package.module:fn; fn() returns an iterable of batches")

    @field_validator("callable")
    @classmethod
    def _callable(cls, value: str | None) -> str | None:
        return None if value is None else check_callable(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> DataConfig:
        given = [k for k in ("digits", "image_folder", "callable") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of digits, image_folder, callable (got {given or 'none'})")
        return self


class OutputsConfig(_Strict):
    """``outputs:``, what is written into the output folder."""

    checkpoint: bool = Field(True, description="model.safetensors + model.safetensors.json (fxmerge.load_state)")
    onnx: bool = Field(False, description="model.onnx, verified in onnxruntime against PyTorch")
    onnx_dynamic_batch: bool = Field(True, description="keep the ONNX batch dimension dynamic")
    onnx_exporter: Literal["dynamo", "trace"] = Field(
        "dynamo", description="dynamo (torch.export: refuses value-dependent control flow) or trace (the "
        "TorchScript tracer, also checked on the first data: batches and on inputs that take other branches)")
    report: bool = Field(True, description="report.json")
    plots: bool = Field(True, description="PNG charts under plots/")
    max_heatmaps: int = Field(24, ge=0, description="at most this many per-space similarity heatmaps")

    @model_validator(mode="after")
    def _something(self) -> OutputsConfig:
        if not (self.checkpoint or self.onnx or self.report or self.plots):
            raise ValueError("every output is switched off, so nothing would be written")
        return self


class MergeConfig(_Strict):
    """A validated ``fxmerge merge`` config."""

    models: list[ModelEntry] = Field(min_length=2, description="two or more models of one architecture")
    method: str = Field(description=", ".join(METHODS))
    options: MergeOptions = Field(default_factory=MergeOptions, description="keyword arguments of fxmerge.merge")
    data: DataConfig | None = Field(None, description="input batches (needed by act_align, zipit, mudsc, repair)")
    evaluate: str | None = Field(None, description="package.module:fn; fn(model) returns {metric: float}")
    input_shape: Shape = Field(None, description="default input_shape of every model")
    outputs: OutputsConfig = Field(default_factory=OutputsConfig, description="what to write into --out")
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="config")

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}{_suggest(value, METHODS)}")
        return value

    @field_validator("evaluate")
    @classmethod
    def _evaluate(cls, value: str | None) -> str | None:
        return None if value is None else check_callable(value)

    @property
    def root(self) -> Path:
        """The folder relative paths were resolved against."""
        return self._root

    def shape_of(self, index: int) -> list[int] | None:
        """The input shape of ``models[index]`` (its own, else the top-level default)."""
        return self.models[index].input_shape or self.input_shape


def cross_field_errors(cfg: MergeConfig) -> list[str]:
    """Problems that involve several fields, as ``field: message`` lines."""
    errors = []
    opts = cfg.options
    if cfg.method in NEEDS_DATA and cfg.data is None:
        errors.append(f"data: method {cfg.method!r} needs data for activation statistics; add a data: section")
    if opts.repair and cfg.data is None:
        errors.append("options.repair: REPAIR needs data to measure the parents' statistics; add a data: section")
    if opts.repair and (opts.stop_at is not None or opts.matcher == "zip" or cfg.method in ("zipit", "wzip")):
        errors.append("options.repair: needs a one-to-one matching: use an align method (matcher: align) without "
                      "stop_at")  # fmt: skip
    if opts.stop_at is not None and opts.hetero:
        errors.append("options.stop_at: partial zipping cannot be combined with depth/width")
    for key in HETERO_ONLY:
        if key in opts.model_fields_set and not opts.hetero:
            errors.append(f"options.{key}: applies only to depth/width merges; set options.depth or options.width")
    return errors


def format_validation_error(exc: ValidationError) -> list[str]:
    """``field.path: message`` lines; unknown keys list the allowed ones (and the closest match)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _dotted(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key {loc[-1]!r}"
            if allowed:
                msg += f"; allowed: {', '.join(allowed)}{_suggest(str(loc[-1]), allowed)}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                msg += f" (got {err['input']!r})"
        lines.append(f"{path or '<top level>'}: {msg}")
    return lines


def _dotted(loc: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _allowed_keys(loc: tuple) -> list[str]:
    cls: type[BaseModel] | None = MergeConfig
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        cls = _inner_model(field.annotation) if field is not None else None
    return list(cls.model_fields) if cls is not None else []


def _inner_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def parse_merge_config(data: Any, root: str | Path | None = None, source: str = "config") -> MergeConfig:
    """Validate an already-loaded mapping; ``root`` anchors relative paths (default: the current folder)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping with models, method, options, data, outputs")
    base = Path(root).absolute() if root is not None else Path.cwd()
    try:
        cfg = MergeConfig.model_validate(dict(data), context={"root": base})
    except ValidationError as exc:
        raise ConfigError(_message(source, format_validation_error(exc))) from exc
    cross = cross_field_errors(cfg)
    if cross:
        raise ConfigError(_message(source, cross))
    cfg._root, cfg._source = base, source
    return cfg


def _message(source: str, lines: list[str]) -> str:
    return f"{source} is invalid:\n" + "\n".join(f"  {line}" for line in lines)


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML config; errors are :class:`~fxmerge.errors.ConfigError` naming the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    return parse_merge_config(data, p.absolute().parent, str(p))
