"""Speed of permutation-group inference, with Torch-Pruning's group building as the reference.

For every case the script times fxmerge in two parts: *capture* (``fxmerge.capture``) and *inference*
(``GraphInterpreter.run`` + ``build_spec``: what "after capture" means below). Torch-Pruning 1.6
(``tp.DependencyGraph().build_dependency`` then ``list(get_all_groups())``) is timed on the same model in
a subprocess with a time limit, so a build that never finishes shows up as a timeout.

Both sides get one warm-up forward pass and one intra-op thread (``--threads``: the example inputs are
tiny, and on a busy 2-core CPU OpenMP's second thread makes every small kernel wait). Times are process
CPU seconds, which the other processes on a shared machine do not inflate; the best wall time is printed
next to them. Each is the best of ``--repeats`` runs (short cases repeat until they have run 1 s, at most
30 times); the 1 s targets use the median run.

Targets (printed next to the measured numbers as PASS/FAIL; a missed target does not change the exit
status, an error does):

* every zoo model finishes (``fxmerge.testing.zoo``, each with its declared frontend, strict mode);
* 16x depth costs <= 18x inference time (residual MLP, residual CNN, tiny Llama at 1x/4x/16x depth);
* a 32-layer tiny Llama and densenet121 each infer in under 1 s after capture;
* fxmerge (capture + inference) is >= 3x faster than Torch-Pruning wherever Torch-Pruning finishes.

The "bare fx" column times a plain ``torch.fx.Tracer().trace`` of the same model: the floor of any capture
built on fx. Where it alone exceeds a third of Torch-Pruning's whole build, the 3x target cannot be met by
an fx-based tool, and a note says so.

    python benchmarks/bench_infer.py                    # everything (several minutes: TP timeouts)
    python benchmarks/bench_infer.py --skip-zoo --tp-timeout 20
    python benchmarks/bench_infer.py --profile tiny_llama@32    # cProfile of the interpreter on one case
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import fxmerge
from fxmerge.capture.trace import split_inputs
from fxmerge.errors import UnsupportedOpsError
from fxmerge.gate import find_unsound_groups
from fxmerge.infer.api import format_unsupported
from fxmerge.infer.build import build_spec
from fxmerge.infer.interpret import GraphInterpreter
from fxmerge.testing import zoo

DEPTH_TARGET = 18.0  # inference time at 16x depth / at 1x, at most
ABS_TARGET = 1.0  # seconds after capture for tiny_llama@32 and densenet121, at most
TP_TARGET = 3.0  # Torch-Pruning time / fxmerge time, at least
SERIES = {"res_mlp": (4, 16, 64), "res_cnn": (4, 16, 64), "tiny_llama": (2, 8, 32)}
SINGLES = ("densenet121", "hf_llama@2", "hf_llama@8", "swin_t")
ABS_CASES = ("tiny_llama@32", "densenet121")
RESULT = "TPRESULT "
MIN_SECONDS, MAX_RUNS = 1.0, 30  # small cases repeat until they have run this long (noise on a shared CPU)


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def residual_mlp(depth: int, w: int = 64) -> nn.Module:
    """``depth`` pre-norm blocks ``x + fc2(relu(fc1(ln(x))))`` on a 64-wide stream, then a linear head."""
    blocks = [Residual(nn.LayerNorm(w), nn.Linear(w, 2 * w), nn.ReLU(), nn.Linear(2 * w, w)) for _ in range(depth)]
    return nn.Sequential(*blocks, nn.Linear(w, 10))


def residual_cnn(depth: int, w: int = 16) -> nn.Module:
    """A 16-channel stem, ``depth`` conv-BN-ReLU-conv-BN residual blocks (+ReLU), global pooling, a linear head."""
    blocks = [m for _ in range(depth) for m in (Residual(
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)), nn.ReLU())]  # fmt: skip
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10))


def build_case(case: str) -> tuple[nn.Module, tuple, str]:
    """``(model, example_inputs, frontend)`` for ``kind@depth`` or a zoo model name (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    kind, _, depth = case.partition("@")
    if kind == "res_mlp":
        return zoo.seeded(gen, lambda: residual_mlp(int(depth))), (torch.randn(2, 64, generator=gen),), "auto"
    if kind == "res_cnn":
        return zoo.seeded(gen, lambda: residual_cnn(int(depth))), (torch.randn(2, 3, 16, 16, generator=gen),), "auto"
    if kind == "tiny_llama" and depth:
        model, inputs = zoo.build_tiny_llama(gen, n_layers=int(depth))
        return model, inputs, "auto"
    if kind == "hf_llama":
        import transformers as tf

        cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=int(depth), num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, max_position_embeddings=64, vocab_size=100, bos_token_id=0,
                             eos_token_id=0, pad_token_id=0, use_cache=False)  # fmt: skip
        model = zoo.seeded(gen, lambda: tf.LlamaForCausalLM(cfg))
        return model, (torch.randint(0, 100, (2, 8), generator=gen),), "export"
    model, inputs = zoo.build(case)
    return model, inputs, zoo.ZOO[case].frontend


def warm_up(model: nn.Module, inputs: tuple) -> None:
    """One forward pass, so that neither side pays the one-off kernel and thread-pool start-up."""
    with torch.no_grad():
        zoo.call(model, inputs)


@dataclass
class FxTime:
    """Best-of-runs CPU seconds (``infer_median``: the median), the best wall seconds, and the result size."""

    capture: float
    infer: float
    infer_median: float
    infer_wall: float
    groups: int
    nodes: int
    frontend: str
    bare_trace: float = 0.0  # torch.fx.Tracer().trace alone: the floor of any fx-based capture
    gate: float = 0.0  # CPU seconds of infer_groups' soundness gate (find_unsound_groups) on the spec
    gate_forwards: int = 0

    @property
    def total(self) -> float:
        return self.capture + self.infer


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time does not count the time other processes hold the cores."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds elapsed since ``t0``."""
    t1 = clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def time_gate(model: nn.Module, inputs: tuple, frontend: str) -> tuple[float, int]:
    """CPU seconds and forward passes of the soundness gate that ``infer_groups`` runs on its result."""
    spec = fxmerge.infer_groups(model, inputs, frontend=frontend, verify=False)
    t0 = clock()
    _, record = find_unsound_groups(model, spec, inputs)
    return since(t0)[1], record.forwards


def infer_once(model: nn.Module, inputs: tuple, frontend: str) -> tuple[tuple, tuple, int, int, str]:
    """One strict inference without the gate: capture and inference (wall, CPU) times, groups, nodes, frontend."""
    args, kwargs = split_inputs(inputs)
    t0 = clock()
    cg = fxmerge.capture(model, inputs, frontend)
    cap, t1 = since(t0), clock()
    interp = GraphInterpreter(cg)
    interp.run(cg.flat_inputs(args, kwargs))
    if interp.unsupported:
        raise UnsupportedOpsError(format_unsupported(type(model).__name__, interp.unsupported), interp.unsupported)
    spec = build_spec(interp)
    return cap, since(t1), len(spec.groups), len(cg.gm.graph.nodes), cg.frontend


def _more(times: list[float], repeats: int) -> bool:
    """Another run? At least ``repeats``, and short cases until they add up to ``MIN_SECONDS``."""
    return len(times) < repeats or (sum(times) < MIN_SECONDS and len(times) < MAX_RUNS)


def time_fxmerge(case: str, repeats: int) -> FxTime:
    """Build ``case``, warm it up, and time repeated strict inferences."""
    model, inputs, frontend = build_case(case)
    warm_up(model, inputs)
    runs = [infer_once(model, inputs, frontend)]
    while _more([r[0][0] + r[1][0] for r in runs], repeats):
        runs.append(infer_once(model, inputs, frontend))
    cpu = sorted(r[1][1] for r in runs)
    wall = min(r[1][0] for r in runs)
    result = FxTime(min(r[0][1] for r in runs), cpu[0], cpu[len(cpu) // 2], wall, *runs[0][2:])
    if result.frontend == "fx":
        result.bare_trace = min(_bare_trace(model) for _ in range(max(10, len(runs))))
    result.gate, result.gate_forwards = time_gate(model, inputs, frontend)
    return result


def _bare_trace(model: nn.Module) -> float:
    """CPU seconds of a plain ``torch.fx.Tracer().trace`` (no leaves policy, no GraphModule, no analysis)."""
    t0 = clock()
    torch.fx.Tracer().trace(model)
    return since(t0)[1]



def tp_worker(case: str, timeout: float, repeats: int) -> None:
    """Subprocess body: time Torch-Pruning's graph and group building, print one ``TPRESULT`` JSON line."""
    import torch_pruning as tp

    model, inputs, _ = build_case(case)
    warm_up(model, inputs)

    def forward(m: nn.Module, x: tuple) -> list[torch.Tensor]:
        return zoo.output_tensors(zoo.call(m, x))

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    times, n_groups, error, start = [], 0, "", time.perf_counter()
    try:
        while not times or (_more([t[0] for t in times], repeats) and time.perf_counter() - start < timeout / 4):
            t0 = clock()
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, forward_fn=forward, verbose=False)
            n_groups = len(list(dg.get_all_groups()))
            times.append(since(t0))
    except TimeoutError:
        pass  # the runs that finished count; none finished: a timeout
    except Exception as e:  # a reference failure is a result, not a benchmark error
        times, error = [], f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:80]}"
    signal.setitimer(signal.ITIMER_REAL, 0)
    out: dict = {"error": error} if error else {"timeout": timeout}
    if times:
        out = {"seconds": min(t[1] for t in times), "wall": min(t[0] for t in times), "groups": n_groups}
    print(RESULT + json.dumps(out), flush=True)


def time_tp(case: str, timeout: float, repeats: int, threads: int) -> dict:
    """Run :func:`tp_worker` in a fresh interpreter; a hard kill backs up its own alarm."""
    cmd = [sys.executable, __file__, "--tp-worker", case, "--tp-timeout", str(timeout),
           "--repeats", str(repeats), "--threads", str(threads)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 180)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:80]}"}
    return json.loads(lines[-1][len(RESULT) :])


@dataclass
class Bench:
    """Measurements by case, errors, and (target, measured, goal, passed) verdicts."""

    fx: dict[str, FxTime] = field(default_factory=dict)
    tp: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    verdicts: list[tuple[str, str, str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def target(self, name: str, measured: str, goal: str, ok: bool) -> None:
        self.verdicts.append((name, measured, goal, ok))


def tp_cell(res: dict) -> str:
    """A Torch-Pruning result as a table cell: CPU seconds (groups), a timeout, or an error."""
    if not res:
        return "-"
    if "seconds" in res:
        return f"{res['seconds']:.3f} ({res['groups']})"
    return f"timeout>{res['timeout']:.0f}s" if "timeout" in res else f"error ({res['error']})"


def run_cases(bench: Bench, cases: list[str], args: argparse.Namespace) -> None:
    """Time fxmerge and Torch-Pruning on each case and print one table row per case."""
    head = (f"{'case':<14} {'frontend':<8} {'nodes':>5} {'groups':>6} {'capture':>7} {'infer min/med':>13} "
            f"{'(wall)':>7} {'TP (groups)':>15} {'(wall)':>7} {'TP/fx':>6} {'TP/infer':>8} {'bare fx':>7} "
            f"{'gate (fwd)':>12}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for case in cases:
        try:
            fx_t = bench.fx[case] = time_fxmerge(case, args.repeats)
        except Exception as e:
            bench.errors[case] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{case:<14} ERROR {bench.errors[case]}", flush=True)
            continue
        res = bench.tp[case] = {} if args.no_tp else time_tp(case, args.tp_timeout, args.repeats, args.threads)
        ok = "seconds" in res
        total = f"{res['seconds'] / fx_t.total:.1f}x" if ok else "-"
        infer = f"{res['seconds'] / fx_t.infer:.1f}x" if ok else "-"
        tp_wall = f"{res['wall']:.3f}" if ok else "-"
        timing = f"{fx_t.infer:.3f}/{fx_t.infer_median:.3f}"
        print(f"{case:<14} {fx_t.frontend:<8} {fx_t.nodes:>5} {fx_t.groups:>6} {fx_t.capture:>7.3f} {timing:>13} "
              f"{fx_t.infer_wall:>7.3f} {tp_cell(res):>15} {tp_wall:>7} {total:>6} {infer:>8} {fx_t.bare_trace:>7.3f} "
              f"{f'{fx_t.gate:.3f} ({fx_t.gate_forwards})':>12}", flush=True)  # fmt: skip


def judge(bench: Bench) -> None:
    """Depth scaling, absolute times and Torch-Pruning ratios against their targets."""
    series = {k: ds for k, ds in SERIES.items() if f"{k}@{ds[0]}" in bench.fx and f"{k}@{ds[-1]}" in bench.fx}
    if series:
        print(f"\n{'depth scaling (16x/1x)':<24} {'fx infer':>9} {'fx capture':>10} {'TP':>8}")
    for kind, depths in series.items():
        lo, hi = f"{kind}@{depths[0]}", f"{kind}@{depths[-1]}"
        a, b = bench.fx[lo], bench.fx[hi]
        ta, tb = bench.tp.get(lo, {}), bench.tp.get(hi, {})
        tp_ratio = f"{tb['seconds'] / ta['seconds']:.1f}x" if "seconds" in ta and "seconds" in tb else "-"
        ratio = b.infer / a.infer
        print(f"{kind + f' {depths[0]}->{depths[-1]}':<24} {ratio:>8.1f}x {b.capture / a.capture:>9.1f}x {tp_ratio:>8}")
        bench.target(f"16x depth, {kind}", f"{ratio:.1f}x", f"<= {DEPTH_TARGET:.0f}x", ratio <= DEPTH_TARGET)
    for case in ABS_CASES:
        if case in bench.fx:
            t = bench.fx[case].infer_median
            bench.target(f"after capture, {case}", f"{t:.3f} s", f"< {ABS_TARGET:.0f} s", t < ABS_TARGET)
    for case, res in bench.tp.items():
        if "seconds" in res and case in bench.fx:
            r = res["seconds"] / bench.fx[case].total
            bench.target(f"vs Torch-Pruning, {case}", f"{r:.1f}x", f">= {TP_TARGET:.0f}x", r >= TP_TARGET)
            floor = bench.fx[case].bare_trace
            if r < TP_TARGET and floor * TP_TARGET > res["seconds"]:
                bench.notes.append(f"{case}: a bare torch.fx trace alone ({floor * 1e3:.1f} ms) exceeds 1/{TP_TARGET:.0f} of "
                                   f"Torch-Pruning's whole build ({res['seconds'] * 1e3:.1f} ms): {TP_TARGET:.0f}x is out "
                                   "of reach for any fx-based capture here")


def run_zoo(bench: Bench, repeats: int) -> None:
    """Strict inference on every zoo model with its declared frontend: all must finish."""
    print(f"\nzoo ({len(zoo.ZOO)} models, strict, declared frontend, CPU seconds of the best run)")
    failed = []
    for name in zoo.ZOO:
        try:
            t = time_fxmerge(name, repeats)
            print(f"  {name:<24} {t.frontend:<7} capture {t.capture:7.3f} s  infer {t.infer:6.3f} s  {t.groups:5d} groups",
                  flush=True)  # fmt: skip
        except Exception as e:
            failed.append(name)
            bench.errors[f"zoo:{name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  {name:<24} ERROR {bench.errors[f'zoo:{name}']}", flush=True)
    done = len(zoo.ZOO) - len(failed)
    bench.target("every zoo model finishes", f"{done}/{len(zoo.ZOO)}", "all", not failed)


def profile_case(case: str, top: int) -> None:
    """cProfile of capture, then of the interpreter run + build_spec (after capture), on one case."""
    model, inputs, frontend = build_case(case)
    warm_up(model, inputs)
    infer_once(model, inputs, frontend)  # warm the rule code paths too
    args, kwargs = split_inputs(inputs)
    prof = cProfile.Profile()
    cg = prof.runcall(fxmerge.capture, model, inputs, frontend)
    print(f"== capture ({cg.frontend}, {len(cg.gm.graph.nodes)} nodes)")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top // 2)

    def after_capture() -> None:
        interp = GraphInterpreter(cg)
        interp.run(cg.flat_inputs(args, kwargs))
        build_spec(interp)

    prof = cProfile.Profile()
    prof.runcall(after_capture)
    print("== inference (interpreter + build_spec)")
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    """Run the cases, judge the targets, print the table; non-zero exit only when a case errors."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="fxmerge runs per case (the best is reported)")
    p.add_argument("--tp-timeout", type=float, default=60.0, help="seconds Torch-Pruning gets per model")
    p.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning reference")
    p.add_argument("--skip-zoo", action="store_true", help="skip the whole-zoo sweep")
    p.add_argument("--only", nargs="*", help="cases to run (e.g. tiny_llama@32 densenet121 res_mlp@4)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides (0: torch's default)")
    p.add_argument("--profile", metavar="CASE", help="profile the interpreter on CASE and exit")
    p.add_argument("--tp-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.tp_worker:
        tp_worker(args.tp_worker, args.tp_timeout, args.repeats)
        return 0
    if args.profile:
        profile_case(args.profile, 25)
        return 0
    tp_version = "(skipped)" if args.no_tp else __import__("torch_pruning").__version__
    cases = args.only or [f"{k}@{d}" for k, ds in SERIES.items() for d in ds] + list(SINGLES)
    print(f"fxmerge inference vs Torch-Pruning {tp_version}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), CPU seconds, best of {args.repeats}, TP limit {args.tp_timeout:.0f} s\n")  # fmt: skip
    bench = Bench()
    run_cases(bench, cases, args)
    judge(bench)
    if not args.skip_zoo and not args.only:
        run_zoo(bench, 1)
    print(f"\n{'target':<34} {'measured':>10} {'goal':>8}  verdict")
    for name, measured, goal, ok in bench.verdicts:
        print(f"{name:<34} {measured:>10} {goal:>8}  {'PASS' if ok else 'FAIL'}")
    for note in bench.notes:
        print(f"note: {note}")
    for case, err in bench.errors.items():
        print(f"error: {case}: {err}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
