"""Model references, ``package.module:callable`` references, checkpoints and merged output folders.

``build_model`` is also the constructor recorded in a merged checkpoint's sidecar, so that
:func:`fxmerge.load_state` can rebuild the architecture in another process.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxmerge.errors import ConfigError, ExportError, FxmergeError, UserCodeError
from fxmerge.export import load_program, load_state, sidecar_path
from fxmerge.export._tensors import check_compatible, match_float_dtype
from fxmerge.models import load_model_spec
from fxmerge.outputs import name

REF_FORMS = "torchvision:NAME, timm:NAME, hf:CONFIG_DIR or package.module:callable"
STATE_FILE = "model.safetensors"
PROGRAM_FILE = "model.pt2"


def resolve_path(value: str, root: Path) -> Path:
    """``value`` as an absolute path, relative paths taken from ``root``; ``~`` is expanded."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path)


def check_model_ref(ref: str, root: Path) -> str:
    """Validate a model reference without building the model; ``hf:`` paths come back absolute."""
    kind, sep, name = ref.partition(":")
    if not sep or not kind or not name:
        raise ValueError(f"{ref!r} must look like {REF_FORMS}")
    if kind == "torchvision":
        import torchvision

        _check_name(name, torchvision.models.list_models(), "torchvision")
    elif kind == "timm":
        import timm

        if not timm.is_model(name):
            _check_name(name, timm.list_models(), "timm")
    elif kind == "hf":
        path = resolve_path(name, root)
        if not path.exists():
            raise ValueError(
                f"hf: {path} does not exist (give a folder with config.json or a config JSON file)"
            )
        return f"hf:{path}"
    else:
        check_callable(ref)
    return ref


def _check_name(name: str, known: Sequence[str], source: str) -> None:
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{source} has no model {name!r}{hint}")


def import_callable(ref: str) -> Callable[..., Any]:
    """The callable named by ``package.module:attr``; raises ``ValueError`` with the reason (also when importing
    the module raises, e.g. a SyntaxError in it)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{ref!r} must look like package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} ({exc}); is it installed or on PYTHONPATH?"
        ) from exc
    except Exception as exc:  # the module's own code failed: a SyntaxError, or anything it raises on import
        raise ValueError(f"importing module {module_name!r} raised {describe(exc)}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{ref} is a {type(target).__name__}, not a callable")
    return target


def check_callable(ref: str) -> str:
    import_callable(ref)
    return ref


def describe(exc: BaseException) -> str:
    """``Type: message``, with the file and line of a SyntaxError."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}"


def check_no_arguments(fn: Callable[..., Any], ref: str, field: str) -> None:
    """A UserCodeError naming ``field`` unless ``fn`` (named by ``ref``) can be called without arguments."""
    try:
        inspect.signature(fn).bind()
    except TypeError as exc:
        raise UserCodeError(f"{field}: {ref} cannot be called without arguments ({exc}); a reference must name a "
                            "function that takes none: wrap yours in one") from exc  # fmt: skip
    except ValueError:
        pass  # no signature to inspect (a builtin): just call it


def call_user(fn: Callable[[], Any], ref: str, field: str) -> Any:
    """``fn()`` for the reference ``ref``: a callable that needs arguments, or raises, is a UserCodeError naming
    ``field``."""
    check_no_arguments(fn, ref, field)
    try:
        return fn()
    except Exception as exc:
        raise UserCodeError(f"{field}: {ref}() raised {describe(exc)}") from exc


def module_file(ref: str) -> Path | None:
    """The source file of the module a ``package.module:callable`` reference names (None if not found)."""
    module_name, sep, _ = ref.partition(":")
    if not sep or module_name in ("torchvision", "timm", "hf"):
        return None
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def build_model(ref: str, input_shape: Sequence[int] | None = None) -> nn.Module:
    """The module of a model reference (random weights; eval mode). Used as a checkpoint constructor."""
    return load_model_spec(ref, tuple(input_shape) if input_shape else None)[0]


def build_model_and_inputs(ref: str, input_shape: Sequence[int] | None, field: str) -> tuple[nn.Module, Any]:
    """``(module, example inputs)`` of a reference; errors name ``field``. A ``package.module:callable`` that
    cannot be imported, needs arguments or raises is a :class:`~fxmerge.errors.UserCodeError`."""
    shape = tuple(input_shape) if input_shape else None
    if ref.partition(":")[0] not in ("torchvision", "timm", "hf") and ":" in ref:
        _check_user_callable(ref, field)
    try:
        return load_model_spec(ref, shape)
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    except FxmergeError:
        raise
    except Exception as exc:  # the reference's own code raised
        raise UserCodeError(f"{field}: building {ref} raised {describe(exc)}") from exc


def _check_user_callable(ref: str, field: str) -> None:
    try:
        fn = import_callable(ref)
    except ValueError as exc:
        raise UserCodeError(f"{field}: {exc}") from exc
    check_no_arguments(fn, ref, field)


def load_checkpoint(model: nn.Module, path: str | Path, field: str) -> nn.Module:
    """Load a state dict file (``.safetensors``, or ``.pt``/``.pth``/``.bin`` from ``torch.save``) into ``model``.

    A ``torch.save`` file may hold the state dict itself or wrap it as ``{"state_dict": ...}`` /
    ``{"model": ...}``. Keys, shapes and dtypes are checked first; errors name ``field``.
    """
    source = Path(path)
    try:
        if source.suffix == ".safetensors":
            return load_state(source, model=model).eval()
        state = _torch_state(source)
        model = match_float_dtype(model, state)
        check_compatible(model, state, str(source))
        model.load_state_dict(state, strict=True)
    except ExportError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    return model.eval()


def _torch_state(source: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{source} cannot be read with torch.load(weights_only=True): {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{source} does not hold a state dict (a mapping of parameter names to tensors)")
    return dict(obj)


def is_merged_dir(path: str | Path) -> bool:
    """True for a folder written by ``fxmerge merge`` with a checkpoint in it."""
    p = Path(path)
    return p.is_dir() and ((p / STATE_FILE).is_file() or (p / PROGRAM_FILE).is_file())


def load_merged(path: str | Path, input_shape: Sequence[int] | None = None) -> tuple[nn.Module, Any]:
    """``(model, example inputs)`` from an ``fxmerge merge`` output folder.

    The model comes from ``model.safetensors`` (rebuilt by its recorded constructor) or, for a merged model
    whose architecture differs from its parents' (partial zipping, depth/width merges), from ``model.pt2``.
    Example inputs are rebuilt from the recorded model reference and input shape (or ``input_shape``).
    """
    folder = Path(path)
    state = folder / STATE_FILE
    meta = _sidecar_meta(state)
    if (folder / PROGRAM_FILE).is_file() and not _has_constructor(state):
        model: nn.Module = load_program(folder / PROGRAM_FILE)
    elif state.is_file():
        model = load_state(state)
    else:
        raise ExportError(
            f"{folder} holds neither {STATE_FILE} nor {PROGRAM_FILE}; is it an fxmerge merge output?"
        )
    ref = meta.get("model")
    if not ref:
        raise ExportError(
            f"{sidecar_path(state)} does not record the model reference its example inputs come from"
        )
    shape = input_shape or meta.get("input_shape")
    return model, build_model_and_inputs(ref, shape, "model")[1]


def _sidecar_meta(state: Path) -> dict[str, Any]:
    side = sidecar_path(state)
    if not side.is_file():
        return {}
    try:
        return dict(json.loads(side.read_text()).get("meta") or {})
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ExportError(f"cannot read {side}: {exc}") from exc


def _has_constructor(state: Path) -> bool:
    side = sidecar_path(state)
    if not side.is_file():
        return False
    try:
        return bool(json.loads(side.read_text()).get("constructor"))
    except (OSError, json.JSONDecodeError):
        return False


def load_source(
    source: str, input_shape: Sequence[int] | None = None, checkpoint: str | Path | None = None
) -> tuple[nn.Module, Any]:
    """``(model, example inputs)`` from what ``fxmerge export`` accepts.

    ``source`` is an ``fxmerge merge`` output folder, a ``.safetensors`` file written by
    :func:`fxmerge.save_state` (with a constructor), a ``.pt2`` program, or a model reference; ``checkpoint``
    loads weights into a model reference. ``input_shape`` overrides the recorded or default example shape
    (a random normal tensor of that shape; required for ``.pt2`` and for state files without a reference).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not is_merged_dir(path):
            raise ConfigError(
                f"{path} is a folder without {STATE_FILE} or {PROGRAM_FILE}; is it an fxmerge merge output?"
            )
        _no_checkpoint(checkpoint, "a merge output folder")
        return load_merged(path, input_shape)
    if path.suffix in (".safetensors", ".pt2"):
        if not path.is_file():
            raise ConfigError(f"file not found: {path}")
        _no_checkpoint(checkpoint, f"a {path.suffix} file")
        if path.suffix == ".safetensors" and not _has_constructor(path):
            raise ConfigError(
                f"{path.name} records no constructor to rebuild its model: give the model reference "
                f"as {name('source')} and the file as {name('checkpoint')}"
            )
        model = load_state(path) if path.suffix == ".safetensors" else load_program(path)
        ref = _sidecar_meta(path).get("model") if path.suffix == ".safetensors" else None
        if ref:
            return model, build_model_and_inputs(
                ref, input_shape or _sidecar_meta(path).get("input_shape"), "model"
            )[1]
        if not input_shape:
            raise ConfigError(
                f"{path.name} does not record its example inputs: pass {name('input_shape')}, "
                "e.g. 1,3,224,224"
            )
        return model, (torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)),)
    model, inputs = build_model_and_inputs(source, input_shape, name("source"))
    if checkpoint is not None:
        model = load_checkpoint(model, checkpoint, name("checkpoint"))
    return model, inputs


def source_inputs(source: str, checkpoint: str | None, *refs: str | None) -> list[tuple[str, Path]]:
    """The files and folders an export of ``source`` reads: the folder, or the file and its sidecar, or the
    module of a reference; the checkpoint; the modules of further references."""
    path = Path(source).expanduser()
    found: list[tuple[str, Path]] = []
    if path.exists():
        found.append((name("source"), path))
        if path.suffix == ".safetensors" and sidecar_path(path).exists():
            found.append((f"{name('source')}'s sidecar", sidecar_path(path)))
    elif (module := module_file(source)) is not None:
        found.append((f"{name('source')}'s module", module))
    if checkpoint is not None:
        found.append((name("checkpoint"), Path(checkpoint)))
    found += [("the module of " + ref, m) for ref in refs if ref and (m := module_file(ref)) is not None]
    return found


def _no_checkpoint(checkpoint: str | Path | None, what: str) -> None:
    if checkpoint is not None:
        raise ConfigError(
            f"{name('checkpoint')} loads weights into a model reference; {what} already holds its weights"
        )
