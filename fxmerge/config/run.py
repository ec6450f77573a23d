"""Run a merge config end to end: build models and data, merge, evaluate, write the output folder atomically.

:func:`run_merge_config` is what ``fxmerge merge CONFIG --out DIR`` calls. The config is validated completely
before any work starts, and ``DIR`` is checked against every input (config, checkpoints, data, the modules of
references). Every output is written into a locked hidden staging folder and moved to ``DIR`` with a manifest
only when all of them are complete, so a failure anywhere leaves no ``DIR`` (and an existing one untouched);
an existing ``DIR`` is replaced only when it holds nothing but an earlier fxmerge output.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fxmerge.config.data import build_data
from fxmerge.config.refs import (
    PROGRAM_FILE,
    STATE_FILE,
    build_model_and_inputs,
    describe,
    import_callable,
    load_checkpoint,
    module_file,
)
from fxmerge.config.schema import MergeConfig, load_merge_config, parse_merge_config
from fxmerge.errors import ExportError, OutputPathError, UserCodeError
from fxmerge.export import export_onnx, save_program, save_state
from fxmerge.merge import MergeResult, merge
from fxmerge.outputs import check_output_dir, existing_ancestor, publish_dir, staging

CONSTRUCTOR = "fxmerge.config.refs:build_model"
REPORT_FILE = "report.json"
ONNX_FILE = "model.onnx"
PLOTS_DIR = "plots"
CKA_FILE = "cka.png"
ONNX_CHECK_BATCHES = 4  # data batches the ONNX file is checked on, besides the examples

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

    ``config`` is a YAML path, a dict with the same shape, or a :class:`MergeConfig`. ``out_dir`` must not be,
    contain or lie inside an input, and must not exist, or be empty, unless ``overwrite`` (which replaces only
    an earlier fxmerge output, never other files). ``progress`` shows progress bars; ``log`` receives one line
    per stage. Raises :class:`~fxmerge.errors.InputError` subclasses before any work for an invalid config
    (:class:`~fxmerge.errors.ConfigError`, naming the field) or output folder
    (:class:`~fxmerge.errors.OutputPathError`), a :class:`~fxmerge.errors.UserCodeError` when code named by
    the config raises, and other :class:`~fxmerge.errors.FxmergeError` subclasses when the merge or an output
    fails.
    """
    say = log or (lambda _: None)
    started = time.perf_counter()
    cfg = as_config(config)
    source = None if isinstance(config, (MergeConfig, Mapping)) else Path(config)
    out = check_out_dir(out_dir, overwrite, config_inputs(cfg, source))
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
            files["onnx"] = write_onnx(stage, cfg, result.model, inputs, data)
        if cfg.outputs.plots:
            say("drawing plots")
            files["plots"] = write_plots(stage, result, metrics, cfg.outputs.max_heatmaps)
        report = build_report(cfg, result, metrics, files, time.perf_counter() - started, stage)
        if cfg.outputs.report:
            (stage / REPORT_FILE).write_text(json.dumps(reproducible(report), indent=1) + "\n")
        publish_folder(stage, out, overwrite)
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


def evaluate_models(
    ref: str, parents: Sequence[nn.Module], merged: nn.Module, say: Log
) -> dict[str, dict[str, float]]:
    """``{"models[0]": {...}, ..., "merged": {...}}`` from the ``evaluate:`` function."""
    try:
        fn = import_callable(ref)
    except ValueError as exc:
        raise UserCodeError(f"evaluate: {exc}") from exc
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
        raise UserCodeError(f"evaluate: {ref}({name}) raised {describe(exc)}") from exc
    if not isinstance(values, Mapping):
        raise UserCodeError(
            f"evaluate: {ref}() returned a {type(values).__name__}; return a dict of metric -> float"
        )
    try:
        return {str(k): float(v) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise UserCodeError(
            f"evaluate: {ref}() returned a non-numeric metric ({exc}); return metric -> float"
        ) from exc


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


def write_onnx(
    stage: Path, cfg: MergeConfig, model: nn.Module, inputs: Any, data: Iterable[Any] | None
) -> dict:
    """``model.onnx`` with the configured exporter. The tracer's file is also checked on the first batches of
    ``data:`` (the inputs it will be fed); torch.export's capture holds for every input."""
    traced = cfg.outputs.onnx_exporter == "trace"
    checks = list(itertools.islice(iter(data), ONNX_CHECK_BATCHES)) if traced and data is not None else None
    rep = export_onnx(model, inputs, stage / ONNX_FILE, exporter=cfg.outputs.onnx_exporter, check_data=checks,
                      dynamic_batch=cfg.outputs.onnx_dynamic_batch)  # fmt: skip
    return {"file": ONNX_FILE, "exporter": rep.exporter, "opset": rep.opset, "max_abs_diff": rep.max_abs_diff,
            "max_rel_diff": rep.max_rel_diff, "checked_batch_sizes": list(rep.checked_batch_sizes),
            "checks": [c.label for c in rep.checks], "dynamic_batch": rep.dynamic_batch,
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


RUN_DEPENDENT = ("seconds", "timings")  # wall-clock values: in the returned report, not in report.json


def reproducible(report: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` without its wall-clock values, so that identical runs write identical report.json files."""
    return {k: v for k, v in report.items() if k not in RUN_DEPENDENT}


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


def config_inputs(cfg: MergeConfig, source: Path | None = None) -> list[tuple[str, Path]]:
    """Every file and folder the config reads: the YAML file, checkpoints, ``hf:`` configs, the image folder
    and the modules of ``package.module:callable`` references (models, data, evaluate)."""
    found = [("config", source)] if source is not None else []
    for i, entry in enumerate(cfg.models):
        if entry.checkpoint is not None:
            found.append((f"models[{i}].checkpoint", Path(entry.checkpoint)))
        kind, _, rest = entry.model.partition(":")
        if kind == "hf":
            found.append((f"models[{i}].model", Path(rest)))
    if cfg.data is not None and cfg.data.image_folder is not None:
        found.append(("data.image_folder.path", Path(cfg.data.image_folder.path)))
    refs = [(f"models[{i}].model", e.model) for i, e in enumerate(cfg.models)]
    refs += [("data.callable", cfg.data.callable)] if cfg.data is not None and cfg.data.callable else []
    refs += [("evaluate", cfg.evaluate)] if cfg.evaluate else []
    found += [(f"{label} (module)", m) for label, ref in refs if (m := module_file(ref)) is not None]
    return found


def check_out_dir(
    out_dir: str | os.PathLike[str], overwrite: bool, inputs: Sequence[tuple[str, Path]] = ()
) -> Path:
    """The absolute output folder; refuses an overlap with ``inputs``, a file, a non-empty folder without
    ``overwrite``, and a folder holding anything but an earlier fxmerge output."""
    return check_output_dir(
        out_dir, overwrite=overwrite, inputs=inputs, error=OutputPathError, keyword="out_dir"
    )


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A locked hidden staging folder on ``out``'s file system (in its nearest existing ancestor), removed on
    exit (SIGTERM included); staging folders of dead runs into the same place are removed first."""
    with staging(existing_ancestor(out, OutputPathError), out.name, OutputPathError) as stage:
        yield stage


def publish_folder(stage: Path, out: Path, overwrite: bool) -> None:
    """Move ``stage`` to ``out`` with its manifest, replacing an earlier fxmerge output there (``overwrite``)."""
    publish_dir(stage, out, OutputPathError, overwrite=overwrite, keyword="out_dir")
