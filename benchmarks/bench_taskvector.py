"""Benchmark: fxmerge task-vector merging vs mergekit on the same synthetic Llama-layout models.

Generates a base plus N fine-tunes (sharded fp32 safetensors + index + config.json), then runs, each
in its own subprocess: a plain streamed safetensors pass (read every tensor of every model, write one
output), and the two command-line tools, ``fxmerge merge-tv`` and ``mergekit-yaml``, for task_arithmetic
and ties (density 0.2, per tensor). It
asserts the outputs agree, and prints wall and CPU time, throughput ratio (mergekit time / fxmerge time), peak
RSS (VmHWM) and peak anonymous RSS (RssAnon), sampled from /proc/PID/status, of every run.

    python benchmarks/bench_taskvector.py                      # ~0.33 GB per model, 4 models
    python benchmarks/bench_taskvector.py --issue-size         # ~0.98 GB per model (the issue's setting)
    python benchmarks/bench_taskvector.py --mergekit-bin /work/mkvenv/bin/mergekit-yaml

Install mergekit in a separate virtualenv (it pins its own torch):
    python3 -m venv /work/mkvenv && /work/mkvenv/bin/pip install mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SIZES = {"default": dict(hidden=768, inter=2048, layers=8, vocab=16000),
         "issue": dict(hidden=1024, inter=2816, layers=14, vocab=32000),
         "tiny": dict(hidden=128, inter=352, layers=2, vocab=1000)}
TARGETS = {"task_arithmetic": 2.5, "ties": 10.0}
MK_INSTALL = "python3 -m venv /work/mkvenv && /work/mkvenv/bin/pip install mergekit"


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-layout causal LM (no GQA)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(path: Path, shapes: dict, cfg: dict, seed: int, base_seed: int, shard_bytes: int = 500 << 20) -> None:
    """Write base (seed == base_seed) or base + seeded noise as sharded fp32 safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used, weight_map = 0, {}
    for j, (name, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(base_seed * 100003 + j)
        t = torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else torch.ones(shape)
        if seed != base_seed:
            g2 = torch.Generator().manual_seed(seed * 100003 + j)
            t += torch.randn(shape, generator=g2) * 0.002
        nbytes = t.numel() * 4
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for s in shards for t in s.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


def make_models(root: Path, size: dict, n_models: int) -> list[Path]:
    """Base + fine-tunes under ``root`` (reused when already generated with the same size)."""
    stamp = root / "stamp.json"
    want = json.dumps({"size": size, "n": n_models})
    paths = [root / "base"] + [root / f"ft{i}" for i in range(n_models)]
    if stamp.is_file() and stamp.read_text() == want:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": size["hidden"],
           "intermediate_size": size["inter"], "num_hidden_layers": size["layers"], "num_attention_heads": 8,
           "num_key_value_heads": 8, "vocab_size": size["vocab"], "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32"}
    shapes = llama_shapes(**size)
    for i, p in enumerate(paths):
        write_model(p, shapes, cfg, seed=i, base_seed=0)
    stamp.write_text(want)
    return paths


def yaml_config(method: str, paths: list[Path], density: float) -> str:
    """The same config for both tools (mergekit YAML is a subset of fxmerge's)."""
    lines = [f"merge_method: {method}", f"base_model: {paths[0]}", "models:"]
    n = len(paths) - 1
    for i, p in enumerate(paths[1:]):
        params = f"weight: {round(1.0 / n + 0.1 * (i - (n - 1) / 2), 4)}"
        if method == "ties":
            params += f", density: {density}"
        lines += [f"  - model: {p}", f"    parameters: {{{params}}}"]
    lines += ["parameters: {lambda: 1.0}", "dtype: float32", "out_dtype: float32"]
    return "\n".join(lines) + "\n"


def _sample_memory(pid: int, peak: dict, stop: threading.Event) -> None:
    """Poll /proc/PID/status: VmHWM (this process image's peak RSS, reset at exec) and RssAnon."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in ("VmHWM", "RssAnon"):
                    peak[key] = max(peak.get(key, 0), int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.01)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (VmHWM) and peak anonymous RSS in bytes (sampled every 10 ms).

    (wait4's ru_maxrss is not used: on Linux it carries over the parent's RSS at fork time.)
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out.decode()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall": wall, "cpu": cpu, "maxrss": peak.get("VmHWM", 0), "anon": peak.get("RssAnon", 0)}


def best_of(repeat: int, cmd: list[str], env: dict | None = None) -> dict:
    """Fastest of ``repeat`` runs (wall clock), peak memory over all of them."""
    runs = [measure(cmd, env) for _ in range(max(1, repeat))]
    best = min(runs, key=lambda r: r["wall"])
    return {**best, "maxrss": max(r["maxrss"] for r in runs), "anon": max(r["anon"] for r in runs)}


def plain_pass(paths: list[str], out: str) -> None:
    """Reference: stream every tensor of every model once and write the base's tensors to one file."""
    handles = [safe_open(str(f), "pt") for p in paths for f in sorted(Path(p).glob("*.safetensors"))]
    result = {}
    for h in handles:
        for k in h.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = h.get_tensor(k)
            if h is handles[0] or k not in result:
                result.setdefault(k, t.sum())
    save_file({k: v.reshape(1) for k, v in result.items()}, out)


def fxmerge_command(config: Path, out: Path) -> list[str]:
    """The ``fxmerge merge-tv`` command line (the installed console script, else ``python -m fxmerge.cli``)."""
    script = Path(sys.executable).with_name("fxmerge")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "fxmerge.cli"]
    return [*head, "merge-tv", str(config), str(out), "--overwrite", "--quiet"]


def _tensor(path: Path, name: str) -> torch.Tensor:
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():  # noqa: SIM118
                return h.get_tensor(name).float()
    raise SystemExit(f"{name} not found in {path}")


def tie_explained(paths: list[Path], name: str, where: torch.Tensor, density: float) -> bool:
    """True when every differing position holds, for some model, a |delta| equal to that model's
    per-tensor top-k threshold: both tools then kept a different member of a tie (equally valid)."""
    base = _tensor(paths[0], name).reshape(-1)
    hit = torch.zeros(where.numel(), dtype=torch.bool)
    for p in paths[1:]:
        a = (_tensor(p, name).reshape(-1) - base).abs()
        k = max(1, int(density * a.numel()))
        thr = torch.kthvalue(a, a.numel() - k + 1).values
        hit |= a[where] == thr
    return bool(hit.all())


def compare(a: Path, b: Path, atol: float, paths: list[Path], density: float | None) -> tuple[float, int, int, int]:
    """Max |diff|, elements off by more than atol, of which explained by top-k threshold ties, tensor count."""
    names = [k for f in a.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]  # noqa: SIM118
    worst, bad, tied = 0.0, 0, 0
    for k in names:
        diff = (_tensor(a, k) - _tensor(b, k)).abs().reshape(-1)
        worst = max(worst, float(diff.max()))
        where = torch.nonzero(diff > atol).reshape(-1)
        bad += where.numel()
        if where.numel() and density is not None and tie_explained(paths, k, where, density):
            tied += where.numel()
    return worst, bad, tied, len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/fxmerge_tv_bench")
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--issue-size", action="store_true", help="four ~0.98 GB fp32 models (the issue's setting)")
    ap.add_argument("--n-models", type=int, default=3, help="fine-tunes besides the base")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--mergekit-bin", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the fastest counts")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--mergekit-env", nargs="*", default=[], metavar="VAR=VALUE",
                    help="extra environment for mergekit, e.g. OMP_NUM_THREADS=1")
    ap.add_argument("--_plain", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--_gen", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args._gen:
        make_models(Path(args._gen[0]), json.loads(args._gen[1]), int(args._gen[2]))
        return None
    if args._plain:
        return plain_pass(args._plain[:-1], args._plain[-1])
    size = SIZES["issue" if args.issue_size else args.size]
    root = Path(args.workdir)
    paths = [root / "models" / "base"] + [root / "models" / f"ft{i}" for i in range(args.n_models)]
    subprocess.run([sys.executable, __file__, "--_gen", str(root / "models"), json.dumps(size), str(args.n_models)],
                   check=True)  # in a child, so this process stays small
    gb = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors")) / 1e9
    print(f"models: base + {args.n_models} fine-tunes, {gb / len(paths):.2f} GB each fp32 ({size})")
    mk = args.mergekit_bin or shutil.which("mergekit-yaml") or "/work/mkvenv/bin/mergekit-yaml"
    have_mk = Path(mk).is_file()
    if not have_mk:
        print(f"mergekit-yaml not found; running the fxmerge side only. Install with:\n    {MK_INSTALL}")
    me = [sys.executable, __file__]
    plain = best_of(args.repeat, [*me, "--_plain", *map(str, paths), str(root / "plain.safetensors")])
    print(f"plain streamed safetensors pass: {plain['wall']:.1f}s, peak RSS {plain['maxrss'] / 1e9:.2f} GB")
    print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings are wall clock)")
    for method in args.methods.split(","):
        cfg = root / f"{method}.yaml"
        cfg.write_text(yaml_config(method, paths, args.density))
        fx_out, mk_out = root / f"fx_{method}", root / f"mk_{method}"
        fx = best_of(args.repeat, fxmerge_command(cfg, fx_out))
        line = (f"{method:16s} fxmerge {fx['wall']:6.1f}s (cpu {fx['cpu']:5.1f}s) peak RSS {fx['maxrss'] / 1e9:.2f} GB "
                f"anon {fx['anon'] / 1e9:.2f} GB")
        if have_mk:
            shutil.rmtree(mk_out, ignore_errors=True)
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            env.update(kv.split("=", 1) for kv in args.mergekit_env)
            res = best_of(args.repeat, [mk, str(cfg), str(mk_out), "--no-copy-tokenizer", "--no-write-model-card",
                                        "--quiet", "--out-shard-size", "5B"], env=env)
            worst, bad, tied, n = compare(fx_out, mk_out, 1e-5, paths, args.density if method == "ties" else None)
            line += (f" | mergekit {res['wall']:6.1f}s (cpu {res['cpu']:5.1f}s) peak RSS {res['maxrss'] / 1e9:.2f} GB "
                     f"anon {res['anon'] / 1e9:.2f} GB | throughput x{res['wall'] / fx['wall']:.2f} "
                     f"(cpu x{res['cpu'] / fx['cpu']:.2f}) | max|diff| {worst:.2e} over {n} tensors")
            if bad:
                line += f", {bad} elements differ, {tied} of them at top-k threshold ties"
            print(line)
            target = TARGETS.get(method)
            if target:
                ratio = res["wall"] / fx["wall"]
                verdict = "met" if ratio >= target else "NOT met (see load average; try --repeat 3)"
                print(f"{'':16s} target >= {target}x mergekit throughput: {verdict}")
            if bad > tied:
                raise SystemExit(f"{method}: {bad - tied} elements differ by more than 1e-5 between fxmerge and mergekit")
        else:
            print(line)
        shard = 2 * 1024**3
        print(f"{'':16s} fxmerge peak anonymous memory {fx['anon'] / 1e9:.2f} GB vs one output shard "
              f"{shard / 1e9:.2f} GB: {'within' if fx['anon'] <= shard else 'ABOVE'}")
    print("agreement: OK" if have_mk else "agreement: not checked (no mergekit)")


if __name__ == "__main__":
    main()
