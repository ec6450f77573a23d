"""The YAML schema of ``fxmerge merge``, validated with pydantic.

Every error names the YAML field it is about (``models[1].checkpoint: file not found: ...``). Paths are taken
relative to the YAML file's folder (or the current folder for a config given as a dict). Validation checks
everything that can be checked without building a model: types, ranges, unknown keys, that files and folders
exist and that ``pkg.module:callable`` references import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

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

from fxmerge.config.messages import config_message, format_validation_error, suggest
from fxmerge.config.refs import check_callable, check_model_ref, resolve_path
from fxmerge.errors import ConfigError
from fxmerge.merge.methods import aliases_of, method_class, method_names, resolve_method, settings_of
from fxmerge.merge.options import HeteroOptions, MergeOptions

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
    checkpoint: str | None = Field(
        None, description="state dict to load: .pt/.pth/.bin (torch.save) or .safetensors"
    )
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


class Options(dict):
    """``options:``, the keyword arguments of ``fxmerge.merge``: the method's settings (see
    :mod:`fxmerge.merge.methods`; ``zip_alpha``/``zip_beta`` name ZipIt's ``alpha``/``beta``), the fields of
    :class:`fxmerge.merge.MergeOptions` and of :class:`fxmerge.merge.HeteroOptions`. They are validated by those
    very objects (one source of truth), see :func:`option_errors`."""

    @property
    def hetero(self) -> bool:
        """Whether depth or width heterogeneity is switched on."""
        return self.get("depth") is not None or self.get("width") is not None

    @property
    def depth(self) -> str | None:
        return self.get("depth")

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fxmerge.merge` (only what the config sets; defaults live in fxmerge)."""
        return dict(self)


def _options(value: Any) -> Options:
    if value is None:
        return Options()
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of option: value, got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ValueError(f"option names must be strings, got {bad[0]!r}")
    return Options(value)


OptionsField = Annotated[dict[str, Any], BeforeValidator(_options), AfterValidator(Options)]


def option_errors(method: str, options: Mapping[str, Any]) -> list[str]:
    """``options.key: message`` lines from validating ``options`` with the method's own settings object,
    :class:`~fxmerge.merge.MergeOptions` and :class:`~fxmerge.merge.HeteroOptions`."""
    cls = method_class(method)
    alias = aliases_of(cls)
    names = set(settings_of(cls))
    own = {k: v for k, v in options.items() if k in MergeOptions.model_fields}
    het = {k: v for k, v in options.items() if k in HeteroOptions.model_fields}
    mine = {k: v for k, v in options.items() if k not in own and k not in het}
    errors: list[str] = []
    for key in mine:
        if alias.get(key, key) not in names:
            allowed = sorted({*names, *alias, *MergeOptions.model_fields, *HeteroOptions.model_fields})
            owners = [n for n in method_names() if key in settings_of(method_class(n)) or key in aliases_of(
                method_class(n))]  # fmt: skip
            where = f"; it is a setting of {', '.join(owners)}" if owners else suggest(key, allowed)
            errors.append(
                f"options.{key}: not a setting of method {method!r}{where} (allowed: {', '.join(allowed)})"
            )
    if errors:
        return errors
    back = {v: k for k, v in alias.items() if k in mine}
    for target, values, rename in ((cls, {alias.get(k, k): v for k, v in mine.items()}, back),
                                   (MergeOptions, own, {}), (HeteroOptions, het, {})):  # fmt: skip
        try:
            target(**values)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(rename.get(p, p)) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                got = (
                    f" (got {err['input']!r})"
                    if err["type"] not in ("value_error",) and "input" in err
                    else ""
                )
                errors.append(f"options.{loc}: {msg}{got}")
        except TypeError as exc:  # a plain-dataclass method of a user
            errors.append(f"options: {exc}")
    return errors


class DigitsData(_Strict):
    """scikit-learn's bundled 8x8 digits as ``[B, 1, 8, 8]`` images (nothing is downloaded)."""

    classes: list[int] = Field(
        default_factory=lambda: list(range(10)), min_length=1, description="digits to use"
    )
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

    checkpoint: bool = Field(
        True, description="model.safetensors + model.safetensors.json (fxmerge.load_state)"
    )
    onnx: bool = Field(False, description="model.onnx, verified in onnxruntime against PyTorch")
    onnx_dynamic_batch: bool = Field(True, description="keep the ONNX batch dimension dynamic")
    onnx_exporter: Literal["dynamo", "trace"] = Field(
        "dynamo",
        description="dynamo (torch.export: refuses value-dependent control flow) or trace (the "
        "TorchScript tracer, also checked on the first data: batches and on inputs that take other branches)",
    )
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
    method: str = Field(description="a registered method: " + ", ".join(method_names()))
    options: OptionsField = Field(default_factory=Options, description="keyword arguments of fxmerge.merge")
    data: DataConfig | None = Field(
        None, description="input batches (needed by act_align, zipit, mudsc, repair)"
    )
    evaluate: str | None = Field(None, description="package.module:fn; fn(model) returns {metric: float}")
    input_shape: Shape = Field(None, description="default input_shape of every model")
    outputs: OutputsConfig = Field(default_factory=OutputsConfig, description="what to write into --out")
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="config")

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        names = method_names()
        if value not in names:
            raise ValueError(
                f"unknown method {value!r}; choose one of {', '.join(names)}{suggest(value, names)}"
            )
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
    errors = option_errors(cfg.method, cfg.options)
    if errors:
        return errors
    opts = cfg.options
    cls = method_class(cfg.method)
    if getattr(cls, "needs_data", False) and cfg.data is None:
        errors.append(
            f"data: method {cfg.method!r} needs data for activation statistics; add a data: section"
        )
    if opts.get("repair") and cfg.data is None:
        errors.append(
            "options.repair: REPAIR needs data to measure the parents' statistics; add a data: section"
        )
    one_to_one = getattr(
        resolve_method(
            cfg.method,
            **{
                k: v
                for k, v in opts.items()
                if k not in MergeOptions.model_fields and k not in HeteroOptions.model_fields
            },
        ),
        "one_to_one",
        False,
    )
    if opts.get("repair") and (opts.get("stop_at") is not None or not one_to_one):
        errors.append("options.repair: needs a one-to-one matching: use an align method (matcher: align) without "
                      "stop_at")  # fmt: skip
    if opts.get("stop_at") is not None and opts.hetero:
        errors.append("options.stop_at: partial zipping cannot be combined with depth/width")
    for key in HETERO_ONLY:
        if key in opts and not opts.hetero:
            errors.append(
                f"options.{key}: applies only to depth/width merges; set options.depth or options.width"
            )
    return errors


def parse_merge_config(data: Any, root: str | Path | None = None, source: str = "config") -> MergeConfig:
    """Validate an already-loaded mapping; ``root`` anchors relative paths (default: the current folder)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping with models, method, options, data, outputs"
        )
    base = Path(root).absolute() if root is not None else Path.cwd()
    try:
        cfg = MergeConfig.model_validate(dict(data), context={"root": base})
    except ValidationError as exc:
        raise ConfigError(config_message(source, format_validation_error(exc, MergeConfig))) from exc
    cross = cross_field_errors(cfg)
    if cross:
        raise ConfigError(config_message(source, cross))
    cfg._root, cfg._source = base, source
    return cfg


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
