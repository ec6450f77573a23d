"""Run a merge config end to end: build models and data, merge, evaluate, write the output folder atomically.

:func:`run_merge_config` is what ``fxmerge merge CONFIG --out DIR`` calls. The config is validated completely
before any work starts; every output is written into a hidden staging folder and moved to ``DIR`` only when all
of them are complete, so a failure anywhere leaves no ``DIR`` (and an existing one untouched).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fxmerge.config.data import build_data
from fxmerge.config.refs import (
    PROGRAM_FILE,
    STATE_FILE,
    build_model_and_inputs,
    import_callable,
    load_checkpoint,
)
from fxmerge.config.schema import MergeConfig, load_merge_config, parse_merge_config
from fxmerge.errors import ConfigError, ExportError, MergeError
from fxmerge.export import export_onnx, save_program, save_state
from fxmerge.merge import MergeResult, merge

CONSTRUCTOR = "fxmerge.config.refs:build_model"
REPORT_FILE = "report.json"
ONNX_FILE = "model.onnx"
PLOTS_DIR = "plots"
CKA_FILE = "cka.png"

Log = Callable[[str], None]


def as_config(config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str]) -> MergeConfig:
    """A validated :class:`MergeConfig` from a config object, a dict, or a YAML path."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        return parse_merge_config(config)
    return load_merge_config(config)


def run_merge_config(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Log | None = None,
) -> dict[str, Any]:
    """Run the merge ``config`` describes and write its outputs to ``out_dir``; returns the report dict.

    ``config`` is a YAML path, a dict with the same shape, or a :class:`MergeConfig`. ``out_dir`` must not
    exist, or be empty, unless ``overwrite``. ``progress`` shows progress bars; ``log`` receives one line per
    stage. Raises :class:`~fxmerge.errors.ConfigError` (naming the field) before any work for an invalid
    config, and other :class:`~fxmerge.errors.FxmergeError` subclasses when the merge or an output fails.
    """
    say = log or (lambda _: None)
    started = time.perf_counter()
    cfg = as_config(config)
    out = check_out_dir(out_dir, overwrite)
    with staging_folder(out) as stage:
        models, inputs = build_models(cfg, say)
        data = build_data(cfg.data)
        say(f"merging {len(models)} models with {cfg.method}")
        result = merge(models, method=cfg.method, data=data, example_inputs=inputs, progress=progress,
                       **cfg.options.merge_kwargs(), **_cka_plot(cfg, stage))  # fmt: skip
        metrics = evaluate_models(cfg.evaluate, models, result.model, say) if cfg.evaluate else {}
        files: dict[str, Any] = {}
        if cfg.outputs.checkpoint:
            say("saving the checkpoint")
            files["checkpoint"] = write_checkpoint(stage, cfg, result, models, inputs)
        if cfg.outputs.onnx:
            say("exporting ONNX and checking it in onnxruntime")
            files["onnx"] = write_onnx(stage, result.model, inputs, cfg.outputs.onnx_dynamic_batch)
        if cfg.outputs.plots:
            say("drawing plots")
            files["plots"] = write_plots(stage, result, metrics, cfg.outputs.max_heatmaps)
        report = build_report(cfg, result, metrics, files, time.perf_counter() - started, stage)
        if cfg.outputs.report:
            (stage / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        publish_folder(stage, out)
    say(f"wrote {out}")
    return report


def _cka_plot(cfg: MergeConfig, stage: Path) -> dict[str, Any]:
    """A depth merge with data and plots on draws its CKA alignment into plots/cka.png."""
    if cfg.options.depth is None or cfg.data is None or not cfg.outputs.plots:
        return {}
    (stage / PLOTS_DIR).mkdir(exist_ok=True)
    return {"cka_plot": stage / PLOTS_DIR / CKA_FILE}


# ------------------------------------------------------------------------------------------ inputs


def build_models(cfg: MergeConfig, say: Log) -> tuple[list[nn.Module], Any]:
    """Every ``models[i]`` built and loaded; example inputs come from ``models[0]``."""
    models, inputs = [], None
    for i, entry in enumerate(cfg.models):
        say(f"building models[{i}]: {entry.model}" + (f" <- {entry.checkpoint}" if entry.checkpoint else ""))
        model, example = build_model_and_inputs(entry.model, cfg.shape_of(i), f"models[{i}].model")
        if entry.checkpoint is not None:
            model = load_checkpoint(model, entry.checkpoint, f"models[{i}].checkpoint")
        models.append(model.eval())
        inputs = example if inputs is None else inputs
    return models, inputs


def evaluate_models(ref: str, parents: Sequence[nn.Module], merged: nn.Module, say: Log) -> dict[str, dict[str, float]]:
    """``{"models[0]": {...}, ..., "merged": {...}}`` from the ``evaluate:`` function."""
    fn = import_callable(ref)
    named = [*((f"models[{i}]", m) for i, m in enumerate(parents)), ("merged", merged)]
    out = {}
    for name, model in named:
        say(f"evaluating {name}")
        out[name] = _metrics(fn, ref, model, name)
    return out


def _metrics(fn: Callable[[nn.Module], Any], ref: str, model: nn.Module, name: str) -> dict[str, float]:
    try:
        values = fn(model)
    except Exception as exc:
        raise MergeError(f"evaluate: {ref}({name}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(values, Mapping):
        raise MergeError(f"evaluate: {ref}() returned a {type(values).__name__}; return a dict of metric -> float")
    try:
        return {str(k): float(v) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise MergeError(f"evaluate: {ref}() returned a non-numeric metric ({exc}); return metric -> float") from exc


# ----------------------------------------------------------------------------------------- outputs


def write_checkpoint(stage: Path, cfg: MergeConfig, result: MergeResult, parents: Sequence[nn.Module],
                     inputs: Any) -> dict:  # fmt: skip
    """``model.safetensors`` (+ sidecar). When the merged model has the architecture of one of its parents the
    sidecar names a constructor (that parent's reference) so :func:`fxmerge.load_state` rebuilds it; otherwise
    (partial zipping) a ``model.pt2`` program is added."""
    same = next((i for i, p in enumerate(parents) if _same_layout(result.model, p)), None)
    ctor = CONSTRUCTOR if same is not None else None
    kwargs = {"ref": cfg.models[same].model, "input_shape": cfg.shape_of(same)} if same is not None else None
    meta = {"model": cfg.models[0].model, "input_shape": cfg.shape_of(0), "method": cfg.method}
    save_state(result.model, stage / STATE_FILE, constructor=ctor, constructor_kwargs=kwargs, meta=meta)
    info: dict[str, Any] = {"state": STATE_FILE, "constructor": ctor}
    if same is None:
        try:
            save_program(result.model, inputs, stage / PROGRAM_FILE)
            info["program"] = PROGRAM_FILE
        except ExportError as exc:
            info["program_error"] = str(exc)
    return info


def _same_layout(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def write_onnx(stage: Path, model: nn.Module, inputs: Any, dynamic_batch: bool) -> dict:
    rep = export_onnx(model, inputs, stage / ONNX_FILE, dynamic_batch=dynamic_batch)
    return {"file": ONNX_FILE, "exporter": rep.exporter, "opset": rep.opset, "max_abs_diff": rep.max_abs_diff,
            "max_rel_diff": rep.max_rel_diff, "checked_batch_sizes": list(rep.checked_batch_sizes),
            "dynamic_batch": rep.dynamic_batch, "fallback_reason": rep.fallback_reason,
            "warnings": list(rep.warnings)}  # fmt: skip


def write_plots(stage: Path, result: MergeResult, metrics: Mapping, max_heatmaps: int) -> list[str]:
    from fxmerge.plots import write_merge_plots

    paths = write_merge_plots(result, stage / PLOTS_DIR, metrics=metrics or None, max_heatmaps=max_heatmaps)
    cka = stage / PLOTS_DIR / CKA_FILE
    return [p.relative_to(stage).as_posix() for p in [*paths, *([cka] if cka.is_file() else [])]]


def build_report(cfg: MergeConfig, result: MergeResult, metrics: Mapping, files: Mapping, seconds: float,
                 stage: Path | None = None) -> dict:  # fmt: skip
    """The merge report plus the config, coverage, metrics and the files written (paths relative to DIR)."""
    from fxmerge import __version__

    cov = result.spec.coverage
    report = {
        **result.report,
        "fxmerge_version": __version__,
        "config": cfg.model_dump(mode="json", exclude_none=True),
        "coverage": {"frontend": cov.frontend, "groups": cov.n_groups, "axes": cov.n_axes,
                     "permutable_axes": cov.n_permutable_axes, "frozen_axes": len(cov.frozen),
                     "permutable_fraction": cov.permutable_fraction},
        "metrics": dict(metrics),
        "files": {**files, **({"report": REPORT_FILE} if cfg.outputs.report else {})},
        "seconds": seconds,
    }  # fmt: skip
    return jsonable(report, f"{stage}{os.sep}" if stage is not None else None)


def jsonable(obj: Any, strip: str | None = None) -> Any:
    """Plain JSON: NaN/inf become None, tuples lists, paths strings; strings starting with ``strip`` lose it
    (paths into the staging folder become relative to the output folder)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, strip) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, strip) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if isinstance(obj, str) and strip and obj.startswith(strip):
        return obj[len(strip) :]
    return obj


# ------------------------------------------------------------------------------------ the out folder


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """The absolute output folder; refuses a file, or a non-empty folder without ``overwrite``."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out: {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    anchor = _existing_ancestor(out)
    if not os.access(anchor, os.W_OK):
        raise ConfigError(f"out: cannot create {out}: {anchor} is not writable")
    return out


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    raise ConfigError(f"out: no existing folder above {path}")


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A hidden temporary folder on ``out``'s file system (in its nearest existing ancestor), removed on exit."""
    anchor = _existing_ancestor(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=anchor))
    except OSError as exc:
        raise ConfigError(f"out: cannot write under {anchor}: {exc.strerror or exc}") from exc
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _share(stage: Path) -> None:
    """Give the staged tree the permissions the umask allows (mkdtemp/mkstemp made them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [stage, *stage.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def publish_folder(stage: Path, out: Path) -> None:
    """Move ``stage`` to ``out``, replacing an existing ``out`` (checked by :func:`check_out_dir`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _share(stage)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "previous")
    try:
        os.replace(stage, out)
    except OSError:
        if old is not None:
            os.replace(old / "previous", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
