"""Merge speed, memory and recovery: fxmerge vs the ``rebasin`` package (PyPI, weight matching), and fxmerge
alone on larger models for every method.

The task (the same for both tools, back to back in one run, with the same number of threads):

* A is a randomly initialised model with non-degenerate weights (norm gammas / running variances re-drawn
  from U[0.5, 1.5], betas / running means from U[-0.5, 0.5], every constant tensor re-drawn:
  ``zoo_sweep._reinit``);
* B is A under a random permutation of every group the merge engine carries
  (``spec = fxmerge.infer_groups(A, x)``, ``B = spec.apply(A, spec.random_perms(generator, carried))``), so
  B computes exactly A's function and a correct merge of ``[A, B]`` gives A back;
* fxmerge: ``fxmerge.merge([A, B], method=m, example_inputs=x, reset_bn=False, progress=False)`` (``data``
  only for the methods that need statistics);
* peer (``rebasin`` 0.0.47, weight matching only): ``PermutationCoordinateDescent(A, B, x).rebasin()``
  permutes B in place into A's basis; the merged model is the plain average of A and the aligned B.

Measured for each run, each in its own child process (so that a crash, a time-out or a memory blow-up is a
row with its reason, never the end of the benchmark):

* wall time of the merge call (for the peer: tracing + coordinate descent + averaging);
* peak resident memory above the loaded models (the child resets its peak RSS after building A, B and the
  data, ``/proc/self/clear_refs``, and reads ``VmHWM`` after the merge), and that peak over the bytes of the
  two input models (the issue's bound: <= 4x plus the statistics);
* recovery: ``max|merged(x) - A(x)| / max(1, max|A(x)|)`` over the evaluation batches (for the peer also
  how far its aligned B moved from B's own function, which a valid permutation keeps at 0);
* the achieved fraction of a FLOP lower bound of ONE weight-matching sweep: the cross-block multiply-adds
  ``sum over merge spaces (fxmerge.merge.spaces.find_spaces) of size^2 * D(slot)`` over every slot (``D`` =
  the slot's entries per unit: ``unit * numel / shape[axis]``) at the float32 matmul throughput measured on
  this machine with the same threads. A merge that runs several sweeps, or spends time outside the
  similarity products, sits below 100%; the peer is held to the same bound.

A watchdog in the parent kills a child whose resident memory passes ``--mem-limit-gb`` (and the child runs
under an address-space limit a few GB above it); ``--timeout`` bounds each run.

    python benchmarks/bench_merge.py                                   # everything, writes docs/results/bench_merge.md
    python benchmarks/bench_merge.py --models resnet18,mobilenet_v3_small,efficientnet_b0 --methods rebasin
    python benchmarks/bench_merge.py --tools rebasin --models resnet18 --out /tmp/peer.md
    python benchmarks/bench_merge.py --quick                            # tiny models and data (CI smoke)

``bench(...)`` is the core (used by tests/benchmarks/test_bench_merge_smoke.py); ``run_task(task)`` runs one
merge in-process and returns its record.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "bench_merge.md"

SHARED = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")  # fxmerge vs the peer
ALONE = ("convnext_tiny", "densenet121", "vit_b_16", "bert_base")  # fxmerge alone, every method
TINY = ("tiny_cnn", "bert_tiny")  # --quick defaults (CI smoke)
METHODS = ("average", "rebasin", "act_align", "zipit", "mudsc")
DATA_METHODS = {"act_align", "zipit", "mudsc"}
TOOLS = ("fxmerge", "rebasin")
PEER = "rebasin"  # the PyPI package (weight matching only)
PEER_MODELS = (*SHARED, "tiny_cnn")
# runs at their own settings, for the targets table (not part of the per-method table)
TARGET_RUNS = ({"model": "resnet50", "method": "mudsc", "threads": 2, "batch": 32, "batches": 8, "image_size": 64},)

# --------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class Task:
    """One merge run: ``tool`` merges A and its permuted copy B of ``model`` with ``method``."""

    model: str
    tool: str = "fxmerge"
    method: str = "rebasin"
    quick: bool = False
    threads: int = 1
    image_size: int = 64
    seq_len: int = 32
    batch: int = 8
    batches: int = 4  # merge data (methods that need statistics)
    eval_batches: int = 2  # recovery check
    dtype: str = "float32"
    seed: int = 0
    target: bool = False  # one of TARGET_RUNS (its own threads and data), reported in the targets table

    @property
    def label(self) -> str:
        return f"{self.model} / {self.tool} / {self.method}"


def tiny_cnn(width: int = 16) -> Any:
    """A small residual CNN with BatchNorm (10k parameters): the smoke-test model."""
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.block = nn.Sequential(
                nn.Conv2d(width, 2 * width, 3, padding=1),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
                nn.Conv2d(2 * width, width, 3, padding=1),
                nn.BatchNorm2d(width),
            )
            self.head = nn.Linear(width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            h = torch.relu(h + self.block(h))
            return self.head(h.mean((2, 3)))

    return TinyCNN()


def _bert_config(tiny: bool) -> Any:
    from transformers import BertConfig

    if tiny:
        return BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        )
    return BertConfig()  # BERT-base: 12 layers, hidden 768, 12 heads, 110M parameters


def build_model(task: Task) -> tuple[Any, tuple, Callable[[Any], Any], str]:
    """``(A, example_inputs, make_batch(generator), input description)``: A in eval mode, ``task.dtype``."""
    import torch

    torch.manual_seed(task.seed)
    g = torch.Generator().manual_seed(task.seed)
    name = task.model
    if name.startswith("bert"):
        from transformers import BertModel

        tiny = name == "bert_tiny" or task.quick
        cfg = _bert_config(tiny)
        model = BertModel(cfg)
        vocab, seq = cfg.vocab_size, min(task.seq_len, cfg.max_position_embeddings)

        def make(gen: Any, batch: int = task.batch) -> Any:
            return {"input_ids": torch.randint(1, vocab, (batch, seq), generator=gen)}

        desc = f"{task.batch}x{seq} tokens" + (" (tiny config)" if tiny else "")
    else:
        if name == "tiny_cnn":
            model = tiny_cnn()
        else:
            import torchvision.models as tvm

            kwargs = {"image_size": task.image_size} if name.startswith("vit_") else {}
            model = getattr(tvm, name)(weights=None, **kwargs)
        size = task.image_size

        def make(gen: Any, batch: int = task.batch) -> Any:
            return torch.randn(batch, 3, size, size, generator=gen)

        desc = f"{task.batch}x3x{size}x{size}"
    model.eval()
    _reinit(model, task.seed + 1)
    dtype = getattr(torch, task.dtype)
    model = model.to(dtype)
    cast = (lambda b: b) if name.startswith("bert") else (lambda b: b.to(dtype))
    x = (cast(make(g, 2)),)
    return model, x, lambda gen: cast(make(gen)), desc


def _reinit(model: Any, seed: int) -> None:
    """``zoo_sweep._reinit`` (non-degenerate norm affines and running statistics)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from zoo_sweep import _reinit as reinit
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    reinit(model, seed)


def _outputs(model: Any, batch: Any) -> list[Any]:
    import torch

    from fxmerge.testing import zoo

    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return [t.detach().clone() for t in zoo.output_tensors(out) if t.is_floating_point()]


def rel_error(model: Any, reference: list[list[Any]], data: list[Any]) -> float:
    """``max |model(x) - ref(x)| / max(1, max |ref(x)|)`` over every output tensor of every batch."""
    diff, scale = 0.0, 1.0
    for batch, ref in zip(data, reference, strict=True):
        for a, b in zip(_outputs(model, batch), ref, strict=True):
            diff = max(diff, float((a.double() - b.double()).abs().max()))
            scale = max(scale, float(b.abs().max()))
    return diff / scale


def sweep_bound(spec: Any, model: Any) -> tuple[float, int]:
    """Multiply-adds of the cross blocks of one weight-matching sweep, and the number of merge spaces.

    Every merge space of ``size`` units gets one ``size x size`` cross block per slot, a product over the
    slot's ``D = unit * numel / shape[axis]`` entries per unit; the bound is their sum.
    """
    from fxmerge.merge.spaces import find_spaces

    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    spaces, _ = find_spaces(spec)
    total = 0.0
    for space in spaces.values():
        for slot in space.slots:
            t = tensors.get(slot.param)
            if t is None or t.ndim == 0:
                continue
            d = slot.unit * (t.numel() // t.shape[slot.axis])
            total += float(space.size) ** 2 * d
    return total, len(spaces)


def statistics_bytes(spec: Any, method: str, itemsize: int, n: int = 2) -> int:
    """The bytes of the per-space matrices a merge holds by design: the activation correlations over the stacked
    units of the ``n`` models (methods with data, spaces with probe points, in the models' precision), or the
    final weight similarities kept for the report (weight matching: float32, spaces of at most 4096 stacked
    units); none for ``average``. The memory target is 4x the input models' bytes plus these."""
    from fxmerge.merge.features import probe_slices
    from fxmerge.merge.spaces import find_spaces

    spaces, _ = find_spaces(spec)
    if method in DATA_METHODS:
        return sum((n * spaces[k].size) ** 2 * itemsize for k in probe_slices(spec, spaces))
    if method == "average":
        return 0
    return sum((n * sp.size) ** 2 * 4 for sp in spaces.values() if n * sp.size <= 4096)


def work_bytes(spec: Any, method: str, n: int = 2) -> int:
    """One space's work: three float64 matrices over the largest space's stacked units (its similarity and
    the matcher's or the correlation's temporaries); none for ``average``, which solves no space."""
    from fxmerge.merge.spaces import find_spaces

    spaces, _ = find_spaces(spec)
    if method == "average" or not spaces:
        return 0
    return 3 * max((n * sp.size) ** 2 * 8 for sp in spaces.values())


# -------------------------------------------------------------------------------------------- memory


def _status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` / ``VmSize`` of a process in bytes (empty where /proc is unavailable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M)}


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _tensor_bytes(model: Any) -> int:
    seen: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


# ----------------------------------------------------------------------------------------------- one run


def _merge_fxmerge(task: Task, a: Any, b: Any, x: tuple, data: list[Any]) -> tuple[Any, dict[str, Any]]:
    import fxmerge

    result = fxmerge.merge(
        [a, b],
        method=task.method,
        data=data if task.method in DATA_METHODS else None,
        example_inputs=x,
        reset_bn=False,
        progress=False,
    )
    report = result.report or {}
    extra = {"sweeps": report.get("sweeps"), "phases": report.get("timings")}
    return result.model, extra


def _merge_peer(task: Task, a: Any, b: Any, x: tuple, data: list[Any]) -> tuple[Any, dict[str, Any]]:
    import torch
    from rebasin import PermutationCoordinateDescent

    if task.method != "rebasin":
        raise ValueError(f"the rebasin package does weight matching only, not {task.method!r}")
    torch.manual_seed(task.seed)  # it visits the permutations in torch.randperm order (global RNG)
    inputs = x[0] if len(x) == 1 else x
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(a, b, inputs)
    t1 = time.perf_counter()
    pcd.rebasin()  # permutes b in place into a's basis
    t2 = time.perf_counter()
    merged = copy.deepcopy(a)
    with torch.no_grad():
        sb = b.state_dict()
        for k, v in merged.state_dict().items():
            if v.is_floating_point():
                v.copy_((v + sb[k]) / 2)
    t3 = time.perf_counter()
    return merged, {"phases": {"trace": t1 - t0, "solve": t2 - t1, "average": t3 - t2}, "aligned": b}


def run_task(task: Task, save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build A, B and the data, run one merge, and return its record (raises nothing: errors are recorded).

    ``save(record)`` is called before the merge starts, so that a run killed from outside keeps its setup.
    """
    rec: dict[str, Any] = {"task": asdict(task), "status": "running", "stage": "build"}
    try:
        _run(task, rec, save or (lambda r: None))
    except BaseException as e:  # a row with its reason, never a crash
        rec["status"] = "error"
        rec["reason"] = f"{rec.get('stage')}: {type(e).__name__}: {_first_line(e)}"
        rec["trace"] = traceback.format_exc()[-3000:]
    return rec


def _run(task: Task, rec: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> None:
    import torch

    torch.set_num_threads(task.threads)
    import fxmerge
    from fxmerge.merge.spaces import find_spaces

    if task.tool == PEER:
        import rebasin  # noqa: F401  (imported before the memory baseline)

    a, x, make_batch, desc = build_model(task)
    rec["input"] = desc
    rec["params"] = sum(p.numel() for p in {id(p): p for p in a.parameters()}.values())
    rec["stage"] = "infer"
    spec = fxmerge.infer_groups(a, x)
    stuck = find_spaces(spec)[1]
    carried = [g.id for g in spec.groups if g.id not in stuck]
    rec["groups"], rec["identity_groups"] = len(spec), len(stuck)
    rec["bound_madds"], rec["spaces"] = sweep_bound(spec, a)
    rec["stats_bytes"] = statistics_bytes(spec, task.method, 8 if task.dtype == "float64" else 4)
    rec["work_bytes"] = work_bytes(spec, task.method)
    b = spec.apply(a, spec.random_perms(torch.Generator().manual_seed(task.seed + 2), carried))
    gen = torch.Generator().manual_seed(task.seed + 3)
    data = [make_batch(gen) for _ in range(task.batches)] if task.method in DATA_METHODS else []
    evals = [make_batch(gen) for _ in range(task.eval_batches)]
    ref_a = [_outputs(a, e) for e in evals]
    ref_b = [_outputs(b, e) for e in evals]
    rec["b_vs_a"] = rel_error(b, ref_a, evals)  # the permuted copy computes A's function (rounding only)
    rec["model_bytes"] = _tensor_bytes(a) + _tensor_bytes(b)
    del spec

    merge = _merge_peer if task.tool == PEER else _merge_fxmerge
    rec["stage"] = "merge"
    save(rec)
    gc.collect()
    base = _status().get("VmRSS", 0)
    exact = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    merged, extra = merge(task, a, b, x, data)
    rec["time_s"] = time.perf_counter() - t0
    rec["cpu_s"] = time.process_time() - c0  # all threads; on a shared machine the robust one-thread measure
    st = _status()
    peak = st.get("VmHWM", 0) if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec["peak_above_bytes"] = max(0, peak - base)
    rec["peak_exact"] = exact
    rec["rss_base_bytes"] = base
    rec["sweeps"] = extra.get("sweeps")
    rec["phases"] = extra.get("phases")
    rec["stage"] = "check"
    rec["recovery"] = rel_error(merged, ref_a, evals)
    if extra.get("aligned") is not None:
        rec["aligned_vs_b"] = rel_error(extra["aligned"], ref_b, evals)
    rec["status"] = "ok"
    rec["stage"] = "done"


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------- child processes


def _limit_address_space(limit_bytes: int) -> None:
    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def _watch(
    proc: subprocess.Popen, t0: float, timeout: float, limit: int, mem_limit_gb: float
) -> tuple[Any, int | None, str, int]:
    """Wait for ``proc``, killing its group past ``timeout`` or ``limit`` bytes of resident memory.

    Returns ``(rusage, exit code, why it was killed or "", highest resident memory seen)``.
    """
    killed, seen_rss = "", 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code
            return ru, code, killed, seen_rss
        rss = _status(proc.pid).get("VmRSS", 0)
        seen_rss = max(seen_rss, rss)
        if not killed and limit > 0 and rss > limit:
            killed = f"resident memory {rss / 2**30:.2f} GB > limit {mem_limit_gb:g} GB"
        elif not killed and time.perf_counter() - t0 > timeout:
            killed = f"time limit {timeout:g} s"
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
        time.sleep(0.05)


def run_isolated(task: Task, timeout: float, mem_limit_gb: float) -> dict[str, Any]:
    """``run_task`` in a child process under a wall-time limit and a resident-memory watchdog."""
    limit = int(mem_limit_gb * 2**30)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(task.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result, log = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(asdict(task))]
        cmd += ["--_result", result]
        headroom = limit + 6 * 2**30 if limit > 0 else 0  # torch maps ~3 GB of address space it never touches
        t0 = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
                start_new_session=True,
                preexec_fn=lambda: _limit_address_space(headroom),
            )
        usage, code, killed, seen_rss = None, None, "", 0
        try:
            usage, code, killed, seen_rss = _watch(proc, t0, timeout, limit, mem_limit_gb)
        finally:  # the child has its own session: take it down with us (Ctrl-C, SIGTERM)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
        wall = time.perf_counter() - t0
        rec = json.loads(Path(result).read_text()) if os.path.exists(result) else {"task": asdict(task)}
        if rec.get("status") in (None, "running"):
            tail = Path(log).read_text(errors="replace").strip()[-400:]
            reason = killed or f"exit status {code}: {tail.splitlines()[-1] if tail else ''}"
            rec["status"] = "killed" if killed else "crashed"
            rec["reason"] = f"{rec.get('stage', 'start')}: {reason}"
            rec["log_tail"] = tail
        rec["child_wall_s"] = wall
        rec["child_max_rss_bytes"] = max(seen_rss, (usage.ru_maxrss * 1024) if usage else 0)
        return rec


def worker_main(task_json: str, result_path: str) -> None:
    def save(rec: dict[str, Any]) -> None:
        tmp = result_path + ".tmp"
        Path(tmp).write_text(json.dumps(rec, default=str))
        os.replace(tmp, result_path)

    save(run_task(Task(**json.loads(task_json)), save))


# ------------------------------------------------------------------------------------------------- bench


def matmul_throughput(threads: int, quick: bool = False) -> float:
    """Float32 multiply-adds per second of ``[C, D] @ [D, C]`` (C=512, D=4608: a resnet layer4 block).

    With one thread the clock is the process CPU time (as the merges' ratios are), so that other work on a
    shared machine does not lower it; the best of several runs.
    """
    import torch

    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    c, d = (128, 1152) if quick else (512, 4608)
    a, b = torch.randn(c, d), torch.randn(d, c)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5 if quick else 15):
        t = clock()
        torch.mm(a, b)
        best = min(best, clock() - t)
    return c * c * d / max(best, 1e-9)


def plan(
    models: Sequence[str], methods: Sequence[str], tools: Sequence[str], base: Task, targets: bool = False
) -> list[Task]:
    """Runs in order: per model, each method by fxmerge, and the peer right after fxmerge's rebasin; then, with
    ``targets``, the :data:`TARGET_RUNS` at their own settings."""
    tasks = []
    for model in models:
        for method in methods:
            for tool in tools:
                if tool == PEER and (method != "rebasin" or model not in PEER_MODELS):
                    continue
                tasks.append(Task(**{**asdict(base), "model": model, "tool": tool, "method": method}))
    if targets:
        tasks += [Task(**{**asdict(base), "tool": "fxmerge", **run, "target": True}) for run in TARGET_RUNS]
    return tasks


def bench(
    models: list[str],
    methods: Sequence[str] = METHODS,
    tools: Sequence[str] = TOOLS,
    *,
    threads: int = 1,
    quick: bool = False,
    timeout: float = 900.0,
    mem_limit_gb: float = 12.0,
    isolate: bool = True,
    log: Callable[[str], None] = print,
    on_record: Callable[[list[dict[str, Any]], float], None] | None = None,
    targets: bool = False,
    **task_options: Any,
) -> tuple[list[dict[str, Any]], float]:
    """Run every planned task; returns the records and the measured matmul throughput (multiply-adds/s)."""
    base = Task(model="", threads=threads, quick=quick, **task_options)
    if quick:
        base = Task(
            **{**asdict(base), "image_size": 32, "seq_len": 8, "batch": 2, "batches": 2, "eval_batches": 1}
        )
    throughput = matmul_throughput(threads, quick)
    log(f"float32 matmul, {threads} thread(s): {throughput / 1e9:.1f} G multiply-adds/s")
    records: list[dict[str, Any]] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for task in plan(models, methods, tools, base, targets):
        log(f"  {task.label} ...")
        rec = run_isolated(task, timeout, mem_limit_gb) if isolate else run_task(task)
        rec["load_before"] = load
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        rec["load_after"] = load
        records.append(rec)
        log(f"    {_one_line(rec, throughput)}")
        if on_record:
            on_record(records, throughput)
    return records, throughput


# ----------------------------------------------------------------------------------------------- tables

PEER_COLUMNS = [
    "model",
    "params",
    "fxmerge s",
    "peer s",
    "fxmerge cpu s",
    "peer cpu s",
    "peer / fxmerge",
    "fxmerge peak MB",
    "peer peak MB",
    "fxmerge err",
    "peer err",
    "peer B' vs B",
    "sweep bound s",
    "fxmerge % of bound",
    "peer % of bound",
    "notes",
]
METHOD_COLUMNS = [
    "model",
    "params",
    "method",
    "time s",
    "cpu s",
    "peak MB",
    "peak / model bytes",
    "statistics MB",
    "work MB",
    "err",
    "sweeps",
    "sweep bound s",
    "% of bound",
    "status",
]


def _mb(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def _s(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 0.1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _err(v: Any) -> str:
    return "-" if v is None else f"{v:.1e}"


def _pct(v: Any) -> str:
    return "-" if v is None else (f"{v:.1%}" if v >= 0.001 else f"{v:.2%}")


def _params(v: Any) -> str:
    return "-" if not v else f"{v / 1e6:.1f}M" if v >= 1e5 else f"{v / 1e3:.1f}k"


def _bound_s(rec: dict[str, Any], throughput: float) -> float | None:
    m = rec.get("bound_madds")
    return None if m is None else m / throughput


def _basis(rec: dict[str, Any]) -> float | None:
    """The time that ratios use: CPU time for one thread (robust to other load), else wall time."""
    one = rec.get("task", {}).get("threads") == 1 and rec.get("cpu_s")
    return rec.get("cpu_s") if one else rec.get("time_s")


def _frac(rec: dict[str, Any], throughput: float) -> float | None:
    b, t = _bound_s(rec, throughput), _basis(rec)
    return None if b is None or not t else b / t


def _status_text(rec: dict[str, Any]) -> str:
    if rec.get("status") == "ok":
        return "ok"
    return f"{rec.get('status')}: {rec.get('reason', '')}".replace("|", "/")


def _one_line(rec: dict[str, Any], throughput: float) -> str:
    if rec.get("status") != "ok":
        return _status_text(rec)
    return (
        f"{rec['time_s']:.2f} s (cpu {rec.get('cpu_s', 0):.2f} s), peak +{_mb(rec.get('peak_above_bytes'))} MB, err {_err(rec.get('recovery'))}, "
        f"sweeps {rec.get('sweeps', '-')}, {_pct(_frac(rec, throughput))} of the one-sweep bound"
    )


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _by(records: list[dict[str, Any]], model: str, tool: str, method: str) -> dict[str, Any] | None:
    for r in records:
        t = r["task"]
        if (t["model"], t["tool"], t["method"]) == (model, tool, method):
            return r
    return None


def peer_table(records: list[dict[str, Any]], throughput: float) -> list[str]:
    """Weight matching, fxmerge vs the peer: one row per model where either ran."""
    models = [
        m for m in dict.fromkeys(r["task"]["model"] for r in records if r["task"]["method"] == "rebasin")
    ]
    lines = [_row(PEER_COLUMNS), _row(["---"] * len(PEER_COLUMNS))]
    for model in models:
        f, p = _by(records, model, "fxmerge", "rebasin"), _by(records, model, PEER, "rebasin")
        if p is None:
            continue

        def val(r: dict[str, Any] | None, fmt: Callable[[Any], str], key: str) -> str:
            if r is None:
                return "-"
            if r.get("status") != "ok":
                return "fails" if key == "time_s" else "-"
            return fmt(r.get(key))

        ok = lambda r: r is not None and r.get("status") == "ok"  # noqa: E731
        ratio = f"{_basis(p) / _basis(f):.2f}x" if ok(f) and ok(p) and _basis(f) else "-"
        any_rec = f if f is not None and f.get("params") else p
        lines.append(
            _row(
                [
                    model,
                    _params(any_rec.get("params")),
                    val(f, _s, "time_s"),
                    val(p, _s, "time_s"),
                    val(f, _s, "cpu_s"),
                    val(p, _s, "cpu_s"),
                    ratio,
                    val(f, _mb, "peak_above_bytes"),
                    val(p, _mb, "peak_above_bytes"),
                    val(f, _err, "recovery"),
                    val(p, _err, "recovery"),
                    val(p, _err, "aligned_vs_b"),
                    _s(_bound_s(any_rec, throughput)),
                    _pct(_frac(f, throughput)) if ok(f) else "-",
                    _pct(_frac(p, throughput)) if ok(p) else "-",
                    "; ".join(
                        f"{who}: {_status_text(r)}"
                        for who, r in (("fxmerge", f), ("peer", p))
                        if r and not ok(r)
                    )
                    or "",
                ]
            )
        )
    return lines


def method_table(records: list[dict[str, Any]], throughput: float) -> list[str]:
    """fxmerge, every model and method."""
    lines = [_row(METHOD_COLUMNS), _row(["---"] * len(METHOD_COLUMNS))]
    for r in records:
        t = r["task"]
        if t["tool"] != "fxmerge" or t.get("target"):
            continue
        ok = r.get("status") == "ok"
        ratio = (
            f"{r['peak_above_bytes'] / r['model_bytes']:.2f}"
            if ok and r.get("model_bytes") and r.get("peak_above_bytes") is not None
            else "-"
        )
        weight = t["method"] == "rebasin"
        lines.append(
            _row(
                [
                    t["model"],
                    _params(r.get("params")),
                    t["method"],
                    _s(r.get("time_s")) if ok else "-",
                    _s(r.get("cpu_s")) if ok else "-",
                    _mb(r.get("peak_above_bytes")) if ok else "-",
                    ratio,
                    _mb(r.get("stats_bytes")) if r.get("stats_bytes") is not None else "-",
                    _mb(r.get("work_bytes")) if r.get("work_bytes") is not None else "-",
                    _err(r.get("recovery")) if ok else "-",
                    str(r.get("sweeps")) if ok and r.get("sweeps") is not None else "-",
                    _s(_bound_s(r, throughput)) if weight else "-",
                    _pct(_frac(r, throughput)) if weight and ok else "-",
                    _status_text(r),
                ]
            )
        )
    return lines


def _criterion(what: str, rec: dict[str, Any] | None, value: Callable[[dict[str, Any]], float | None],
               limit: float, fmt: Callable[[float], str], at_least: bool = False) -> list[str]:  # fmt: skip
    """One targets row: ``what``, the measured value, the limit and whether it is met."""
    if rec is None:
        return [what, "not run", fmt(limit), "-"]
    v = value(rec) if rec.get("status") == "ok" else None
    if v is None:
        return [what, _status_text(rec), fmt(limit), "no"]
    met = v >= limit if at_least else v <= limit
    return [what, fmt(v), ("≥ " if at_least else "≤ ") + fmt(limit), "yes" if met else "**no**"]


def _memory_ratio(rec: dict[str, Any]) -> float | None:
    """Peak memory above the inputs over the budget ``4 x model bytes + statistics + one space's work``."""
    peak, model, stats = rec.get("peak_above_bytes"), rec.get("model_bytes"), rec.get("stats_bytes")
    if peak is None or not model or stats is None:
        return None
    return peak / (4 * model + stats + rec.get("work_bytes", 0))


def targets_table(records: list[dict[str, Any]]) -> list[str]:
    """The one-merge-engine issue's speed and memory targets, measured in this run (rows for what ran)."""
    rows = []
    for model in SHARED:
        f, p = _by(records, model, "fxmerge", "rebasin"), _by(records, model, PEER, "rebasin")
        if f is not None and p is not None and p.get("status") == "ok":
            rows.append(_criterion(f"{model}: weight matching speed-up over the peer", f,
                                   lambda r, p=p: _basis(p) / _basis(r) if _basis(r) else None, 3.0,
                                   lambda v: f"{v:.2f}x", at_least=True))  # fmt: skip
        if f is not None:
            rows.append(_criterion(f"{model}: weight matching recovers A (err)", f, lambda r: r.get("recovery"),
                                   1e-4, lambda v: f"{v:.1e}"))  # fmt: skip
    for model in ("densenet121", "convnext_tiny"):
        f = _by(records, model, "fxmerge", "rebasin")
        if f is not None:
            rows.append(_criterion(f"{model}: weight matching time (1 thread, cpu s)", f, _basis, 20.0,
                                   lambda v: f"{v:.1f} s"))  # fmt: skip
    for r in records:
        t = r["task"]
        if t["tool"] == "fxmerge" and t["method"] == "average" and (r.get("params") or 0) <= 30e6:
            rows.append(_criterion(f"{t['model']}: average time", r, _basis, 1.0, lambda v: f"{v:.2f} s"))
    for r in records:
        t = r["task"]
        if t["tool"] == "fxmerge":
            rows.append(_criterion(f"{t['model']}: {t['method']} peak memory / (4 x model bytes + statistics + work)", r,
                                   _memory_ratio, 1.0, lambda v: f"{v:.2f}"))  # fmt: skip
    vit = _by(records, "vit_b_16", "fxmerge", "rebasin")
    if vit is not None:
        rows.append(_criterion("vit_b_16: weight matching peak above the two models", vit,
                               lambda r: (r.get("peak_above_bytes") or 0) / 2**30, 2.0,
                               lambda v: f"{v:.2f} GB"))  # fmt: skip
    for r in records:
        t = r["task"]
        if t.get("target"):
            what = (f"{t['model']}: {t['method']} with {t['batches']} batches of {t['batch']} at {t['image_size']} px, "
                    f"{t['threads']} threads (wall s)")  # fmt: skip
            rows.append(_criterion(what, r, lambda r: r.get("time_s"), 60.0, lambda v: f"{v:.1f} s"))
    if not rows:
        return []
    cols = ["target", "measured", "limit", "met"]
    return [_row(cols), _row(["---"] * len(cols)), *(_row(c) for c in rows)]


def tables(records: list[dict[str, Any]], throughput: float) -> str:
    out = []
    targets = targets_table(records)
    if targets:
        out += ["## Targets (measured in this run)", "", *targets, ""]
    if any(r["task"]["tool"] == PEER for r in records):
        out += [
            "## Weight matching: fxmerge vs the `rebasin` package",
            "",
            *peer_table(records, throughput),
            "",
        ]
    if any(r["task"]["tool"] == "fxmerge" for r in records):
        out += ["## fxmerge, every method", "", *method_table(records, throughput), ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ report


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return "not installed"


def _git() -> str:
    """The commit of this checkout, and where fxmerge is imported from when that is not this checkout."""
    try:
        import fxmerge

        where = Path(fxmerge.__file__).resolve().parent
        if where != ROOT / "fxmerge":
            return f"fxmerge imported from {where}"
    except Exception:
        return "fxmerge not importable"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fxmerge"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return f"commit {head}" + (" (fxmerge/ modified)" if dirty else "")
    except Exception:
        return "?"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    mem = "?"
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem = f"{int(m.group(1)) / 2**20:.0f} GB" if m else mem
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def _loads(records: list[dict[str, Any]]) -> str:
    loads = [v for r in records for v in (r.get("load_before"), r.get("load_after")) if v is not None]
    if not loads:
        return "?"
    return f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores"


def report(
    records: list[dict[str, Any]], throughput: float, command: str, threads: int, note: str = ""
) -> str:
    mach = machine()
    pkgs = ["torch", "torchvision", "transformers", "scipy", PEER, "torchview"]
    versions = ", ".join(f"{p} {_version(p)}" for p in pkgs)
    first = records[0]["task"] if records else {}
    lines = [
        "# Merge benchmark: fxmerge vs the `rebasin` package",
        "",
        "<!-- generated by benchmarks/bench_merge.py; do not edit by hand -->",
        "",
        "Generated by `benchmarks/bench_merge.py` (do not edit by hand):",
        "",
        f"```bash\n{command}\n```",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; fxmerge: {_git()}" + (f"; {note}" if note else ""),
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}; {mach['os']}; Python {mach['python']}",
        f"- versions: {versions}",
        f"- threads per tool: {threads}; float32 matmul throughput at that: "
        f"{throughput / 1e9:.1f} G multiply-adds/s ([512, 4608] @ [4608, 512])",
        f"- dtype {first.get('dtype', '-')}; images {first.get('image_size', '-')} px, token sequences of "
        f"{first.get('seq_len', '-')}; data for act_align / zipit / mudsc: {first.get('batches', '-')} random "
        f"batches of {first.get('batch', '-')}; recovery over {first.get('eval_batches', '-')} other batches",
        f"- machine load (1-minute load average) during the runs: {_loads(records)}",
        "",
        "Task (the same for both tools, back to back in one run, each merge in its own process): A is the model "
        "with non-degenerate random weights (norm gammas and running variances in U[0.5, 1.5], betas and "
        "running means in U[-0.5, 0.5], constant tensors re-drawn), B is A with every group the engine carries "
        "randomly permuted (the same function). fxmerge runs `merge([A, B], method=..., reset_bn=False)`; the "
        "peer runs `PermutationCoordinateDescent(A, B, x).rebasin()` and averages A with its aligned B.",
        "",
        "Columns: **s** is the wall time of the merge call (the peer: tracing + coordinate descent + "
        "averaging) and **cpu s** its CPU time; **peer / fxmerge** and **% of bound** use the CPU time when "
        "each tool has one thread (robust to other work on a shared machine; wall time otherwise); **peak MB** the peak resident memory of the merge above the two loaded models and the "
        "data; **peak / model bytes** that peak over the bytes of the two input models; **statistics MB** the "
        "per-space matrices the method holds by design (activation correlations over both models' units for "
        "the methods with data; the final weight similarities kept for the report for weight matching) and "
        "**work MB** one space's work (three float64 matrices over the largest space's stacked units: the "
        "engine holds one space's work at a time), so the memory target reads peak <= 4 x model bytes + "
        "statistics + work; **err** the recovery "
        "error `max|merged(x) - A(x)| / max(1, max|A(x)|)` (a correct merge of a permuted copy is A, so this is "
        "rounding only); **peer B' vs B** how far the peer's aligned B moved from B's own function (a valid "
        "permutation keeps it at rounding); **sweep bound s** the time of the cross-block multiply-adds of ONE "
        "weight-matching sweep (sum over merge spaces of size^2 x entries per unit, every slot) at the "
        "measured matmul throughput, and **% of bound** that time over the measured time (several sweeps or "
        "any work besides the similarity products put a merge below 100%). A run that failed, timed out or "
        "passed the memory limit is a row with its reason.",
        "",
        tables(records, throughput),
    ]
    return "\n".join(lines)


def write_report(
    path: Path, records: list[dict[str, Any]], throughput: float, command: str, threads: int, note: str = ""
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(report(records, throughput, command, threads, note))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- main


def _csv(value: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", help=f"comma-separated (default: {','.join(SHARED + ALONE)}; --quick: tiny ones)"
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated fxmerge methods")
    p.add_argument("--tools", default=",".join(TOOLS), help="fxmerge and/or rebasin (the peer)")
    p.add_argument("--threads", type=int, default=1, help="threads per tool (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny models and data (CI smoke)")
    p.add_argument("--out", type=Path, default=None, help=f"results page (default {OUT.relative_to(ROOT)})")
    p.add_argument("--json", type=Path, default=None, help="also write the raw records here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per merge run (default 900)")
    p.add_argument("--mem-limit-gb", type=float, default=12.0, help="kill a run above this RSS (default 12)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="data batches for the methods that need statistics")
    p.add_argument("--from-json", type=Path, help="only rewrite the page from records saved with --json")
    p.add_argument("--note", default="", help="free text for the report header (e.g. which engine)")
    p.add_argument("--in-process", action="store_true", help="no child processes (debugging; no limits)")
    p.add_argument("--targets", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the target runs at their own settings (mudsc on resnet50, 2 threads, 8 batches "
                        "of 32 at 64 px); default: on for the full run (no --models, no --quick)")  # fmt: skip
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the running child is killed
    if args._worker:
        worker_main(args._worker, args._result)
        return 0

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        recs, tput = saved["records"], saved["throughput"]
        threads = recs[0]["task"]["threads"] if recs else args.threads
        write_report(args.out or OUT, recs, tput, saved.get("command", "?"), threads, args.note)
        print(tables(recs, tput))
        return 0

    known = (*SHARED, *ALONE, *TINY)
    models = (
        _csv(args.models, known, "model") if args.models else list(TINY if args.quick else SHARED + ALONE)
    )
    methods = _csv(args.methods, METHODS, "method")
    tools = _csv(args.tools, TOOLS, "tool")
    if PEER in tools and _version(PEER) == "not installed":
        print(f"the peer ({PEER}) is not installed (pip install -e '.[bench]'); running fxmerge only")
        tools = [t for t in tools if t != PEER]
    out = args.out or (None if args.quick else OUT)
    command = "python benchmarks/bench_merge.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    command = command.strip()

    def save(records: list[dict[str, Any]], throughput: float) -> None:
        if out is not None:
            write_report(out, records, throughput, command, args.threads, args.note)
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {"throughput": throughput, "command": command, "records": records}, indent=1, default=str
                )
            )

    records, throughput = bench(
        models,
        methods,
        tools,
        threads=args.threads,
        quick=args.quick,
        timeout=args.timeout,
        mem_limit_gb=args.mem_limit_gb,
        isolate=not args.in_process,
        log=lambda msg: print(msg, flush=True),
        on_record=save,
        targets=args.targets if args.targets is not None else not (args.models or args.quick),
        dtype=args.dtype,
        image_size=args.image_size,
        seq_len=args.seq_len,
        batch=args.batch,
        batches=args.batches,
    )
    save(records, throughput)
    print()
    print(tables(records, throughput))
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
