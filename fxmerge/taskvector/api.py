"""Public entry point :func:`merge_task_vectors` and the streamed merge driver behind it and the CLI."""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fxmerge.errors import TaskVectorError, TaskVectorPathError
from fxmerge.outputs import check_output_dir, terminate_raises
from fxmerge.taskvector.engine import Context, merge_tensor, pieces
from fxmerge.taskvector.methods import MergeOptions, build_options
from fxmerge.taskvector.params import Param, per_model
from fxmerge.taskvector.passes import compute_dp_shifts, compute_global_thresholds
from fxmerge.taskvector.plan import TensorPlan, build_plan, check_counts, resolve_params
from fxmerge.taskvector.sources import TensorSource, open_source
from fxmerge.taskvector.writer import LazyStateDict, ShardedWriter


class TaskVectorWarning(UserWarning):
    """A merge went ahead with a caveat (shape mismatch handled by policy, missing tensors)."""


@dataclass
class MergeReport:
    """Summary of one merge (what the CLI prints with ``--json``)."""

    method: str
    n_models: int
    n_tensors: int
    n_merged: int
    n_params: int
    out_bytes: int
    seconds: float = 0.0
    out_dir: str | None = None
    shards: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def merge_task_vectors(
    base: object,
    models: Sequence[object],
    *,
    method: str,
    weights: float | Sequence[object] | None = None,
    density: float | Sequence[object] = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    scope: str = "tensor",
    out: str | Path | None = None,
    **method_params: object,
) -> Mapping[str, torch.Tensor]:
    """Merge fine-tunes of one base by task-vector arithmetic; stream tensor by tensor.

    Args:
        base: the pre-trained model: an ``nn.Module``, a state dict, a ``.safetensors`` file or a
            Hugging Face model directory (sharded safetensors + index + config).
        models: the fine-tuned models, each in any of the same forms.
        method: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``della``,
            ``della_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``model_stock``, ``slerp`` or ``dppa``.
        weights: per-model weights ``w_t`` (default 1): a scalar or one value per model; a value may
            be a number, a layer gradient (list of numbers) or a list of ``{filter, value}``.
        density: fraction of each delta kept, in (0, 1]; scalar or one value per model (same forms).
        lam: the scaling lambda applied to the combined delta.
        seed: seeds random masks per (seed, model index, tensor name).
        scope: top-k granularity: ``tensor``, ``row``, ``global`` or ``layer_adaptive`` (DPPA's DP).
        out: when a directory path, the merge is written there (HF layout, sharded safetensors,
            base config copied, a manifest of the files) atomically and the returned mapping reads lazily
            from it. It must not be, contain or lie inside an input; an existing non-empty folder is
            replaced only with ``overwrite=True`` and only when it holds nothing but an earlier fxmerge
            output. Staging folders left by killed runs into the same place are removed.
        **method_params: method and engine options, see :mod:`fxmerge.taskvector.methods`.

    Returns:
        The merged state dict (a ``dict``; a lazy read-only mapping over the output when ``out`` is set).

    Raises:
        TaskVectorError: invalid inputs or options, found before anything is written; a NaN found
            while streaming aborts the merge and leaves no output directory.
        TaskVectorPathError: ``out`` overlaps an input, holds files fxmerge did not write, or is not writable.
    """
    state, _ = run_merge(base, models, method=method, weights=weights, density=density, lam=lam, seed=seed,
                         scope=scope, out=out, **method_params)
    return state


def _open_all(base: object, models: Sequence[object], labels: Sequence[str] | None) -> tuple[TensorSource, list[TensorSource]]:
    if isinstance(models, str | Path | Mapping | torch.nn.Module) or not isinstance(models, Sequence):
        raise TaskVectorError("models: pass a list of fine-tuned models (modules, state dicts, files or directories)")
    names = list(labels) if labels is not None else [_label(m, f"models[{i}]") for i, m in enumerate(models)]
    return open_source(base, _label(base, "base")), [open_source(m, n) for m, n in zip(models, names, strict=True)]


def _input_paths(base: TensorSource, models: Sequence[TensorSource]) -> list[tuple[str, Path]]:
    """Every file and folder the merge reads, labelled ``base`` / ``models[i]``."""
    named = [("base", base), *((f"models[{i}]", m) for i, m in enumerate(models))]
    return [(label, path) for label, src in named for path in src.paths()]


def _label(obj: object, default: str) -> str:
    return f"{default} ({obj})" if isinstance(obj, str | Path) else default


def _progress(opts: MergeOptions, total: int) -> tuple[Callable[[], None], Callable[[], None]]:
    if opts.progress is True:
        bar = tqdm(total=total, unit="tensor", desc=f"merge {opts.method}", leave=False)
        return (lambda: bar.update(1)), bar.close
    if callable(opts.progress):
        done = [0]
        cb = opts.progress

        def tick() -> None:
            done[0] += 1
            cb(done[0], total)

        return tick, lambda: None
    return (lambda: None), (lambda: None)


def _n_steps(plans: list[TensorPlan], opts: MergeOptions, global_pass: bool) -> int:
    merged = sum(p.merge for p in plans)
    steps = len(plans)
    if opts.scope == "layer_adaptive":
        steps += 2 * merged
    if global_pass:
        steps += 2 * merged
    return steps


def run_merge(base: object, models: Sequence[object], *, method: str, weights: object = None, density: object = 1.0,
              lam: float = 1.0, seed: int = 0, scope: str = "tensor", out: str | Path | None = None,
              labels: Sequence[str] | None = None, inputs: Sequence[tuple[str, Path]] = (),
              **method_params: object) -> tuple[Mapping[str, torch.Tensor], MergeReport]:  # fmt: skip
    """:func:`merge_task_vectors` plus a :class:`MergeReport`; ``labels`` name the models in messages and
    ``inputs`` lists further input files (a config) that ``out`` must keep clear of."""
    opts = build_options(method, scope, lam, seed, dict(method_params))
    start = time.perf_counter()
    base_src, model_srcs = _open_all(base, models, labels)
    try:
        if out is not None:
            out = check_output_dir(out, overwrite=opts.overwrite, error=TaskVectorPathError,
                                   inputs=[*inputs, *_input_paths(base_src, model_srcs)])  # fmt: skip
        check_counts(len(model_srcs), opts)
        w = per_model("weights", weights, len(model_srcs), 1.0)
        d = per_model("density", density, len(model_srcs), 1.0)
        plans, notes = build_plan(base_src, model_srcs, opts)
        for note in notes:
            warnings.warn(note, TaskVectorWarning, stacklevel=3)
        params = resolve_params(plans, w, d, opts)
        with terminate_raises():
            state, report = _execute(base_src, model_srcs, opts, plans, params, w, d, out)
    finally:
        base_src.close()
        for m in model_srcs:
            m.close()
    report.warnings = notes
    report.seconds = time.perf_counter() - start
    return state, report


def _merge_all(ctx: Context, plans: list[TensorPlan], writer: ShardedWriter | None, result: dict, tick: Callable) -> None:
    """Merge every unit (a tensor, or a cache-sized piece of an elementwise one) in order while one thread
    reads the next unit's inputs and another writes the finished one.

    Unit j's output lives in its base buffer, one of three rotating slots, so the write of unit j - 1 runs
    while unit j is merged and unit j + 1 is read; the read of unit j + 1 reuses unit j - 2's slot and
    starts once that unit is written.
    """
    units = [u for p in plans for u in pieces(ctx, p)]
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxmerge-read") as reader,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxmerge-write") as wpool):  # fmt: skip
        pending: Future | None = reader.submit(ctx.prefetch, units[0], 0) if units else None
        writes: deque[Future] = deque()
        for j, unit in enumerate(units):
            ctx.ready, ctx.step = pending.result(), j
            while len(writes) > 1:
                writes.popleft().result()
            pending = reader.submit(ctx.prefetch, units[j + 1], j + 1) if j + 1 < len(units) else None
            t = merge_tensor(ctx, unit)
            if writer is not None:
                writes.append(wpool.submit(writer.write, unit.name, t, unit.span))
            else:
                _collect(result, unit, t)
            if unit.span is None or unit.span[1] == unit.out.numel:
                tick()
        while writes:
            writes.popleft().result()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while streaming: the chunked kernels create many short-lived
    tensor objects (no cycles), and each allocation-triggered collection rescans every object torch
    imported (~3% of a merge's time). Restored on exit, also on errors."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _collect(result: dict[str, torch.Tensor], unit: TensorPlan, t: torch.Tensor) -> None:
    """Keep a copy of ``t`` (the work buffers are reused), assembling pieces into the whole tensor."""
    if unit.span is None:
        result[unit.name] = t.clone()
        return
    if unit.span[0] == 0:
        result[unit.name] = torch.empty(unit.out.shape, dtype=t.dtype)
    result[unit.name].view(-1)[unit.span[0]:unit.span[1]].copy_(t)


def _execute(base: TensorSource, models: list[TensorSource], opts: MergeOptions, plans: list[TensorPlan],
             params: dict, w: list[Param], d: list[Param], out: str | Path | None) -> tuple[Mapping[str, torch.Tensor], MergeReport]:
    infos = {p.name: p.out for p in plans}
    report = MergeReport(opts.method, len(models), len(plans), sum(p.merge for p in plans),
                         sum(i.numel for i in infos.values()), sum(i.numel * i.dtype.itemsize for i in infos.values()))
    writer = ShardedWriter(Path(out), infos, opts.shard_size, opts.overwrite) if out is not None else None
    dens = [x.at("", 0) for x in d]
    global_pass = opts.scope == "global" and opts.spec.sparsify == "magnitude" and min(dens) < 1.0
    tick, close = _progress(opts, _n_steps(plans, opts, global_pass))
    result: dict[str, torch.Tensor] = {}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        ctx = Context(base, models, opts, params)
        if opts.scope == "layer_adaptive":
            ctx.shifts = compute_dp_shifts(ctx, plans, tick)
        if global_pass:
            ctx.thresholds = compute_global_thresholds(ctx, plans, dens, tick)
        with _gc_paused():
            _merge_all(ctx, plans, writer, result, tick)
        if writer is not None:
            writer.commit(base.config_dir, opts.out_dtype)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        torch.set_num_threads(saved_threads)
        close()
    if writer is None:
        return result, report
    report.out_dir = str(writer.out_dir)
    report.shards = [s.filename for s in writer.shards]
    return LazyStateDict(writer.out_dir), report
