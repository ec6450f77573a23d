"""Merge two digit models trained on disjoint classes (0-4 and 5-9) with every fxmerge method.

For each model kind (``mlp``, ``resnet_bn``, ``resnet_gn``, ``vit`` from ``digits_common``) and seed, model A
is trained on digits 0-4 and model B on digits 5-9 (different initialisations); both are merged with weight
averaging, Git Re-Basin, activation alignment, ZipIt, W. Zip, MuDSC (its defaults, MuDSC-Align, MuDSC-Zip and
``alpha="auto"``), using the training images (both halves, no labels) for activation statistics and the
BatchNorm reset. A stratified fifth of the training images (``VAL_FRACTION``) is held out from training and
merging: MuDSC ``alpha="auto"`` with a score rates each grid merge by its joint accuracy there (the test set is
never used to choose). Every model is scored on the test set: task A (digits 0-4, 5-way), task B (digits 5-9,
5-way) and joint (all digits, 10-way).

    python examples/digits_merge.py                      # all kinds, default widths, seeds 0 1 2
    python examples/digits_merge.py --kinds mlp --width 256 --seeds 0 1 2 3

Writes ``<out>/results/digits_merge.md`` (tables), ``<out>/results/digits_merge.json`` (raw numbers) and
``<out>/img/digits_merge.png`` (bar chart); ``--out`` defaults to ``docs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_common as dc

import fxmerge
from fxmerge.data import load_digits_split
from fxmerge.data.digits import DigitsSplit, stratified_indices

# a "score" option with this value is replaced by the joint accuracy on the held-out validation images
VALIDATION = "validation joint accuracy"
# (label, method, options) of every merge in the table
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("average", "average", {}),
    ("Git Re-Basin", "rebasin", {}),
    ("Git Re-Basin (identity start)", "rebasin", {"start": "identity"}),
    ("act. align", "act_align", {}),
    ("ZipIt", "zipit", {}),
    ("W. Zip", "wzip", {}),
    ("MuDSC (defaults)", "mudsc", {}),
    ("MuDSC align", "mudsc", {"matcher": "align", "alpha": 0.5}),
    ("MuDSC zip", "mudsc", {"matcher": "zip", "alpha": 0.5}),
    ("MuDSC auto (val. score)", "mudsc", {"matcher": "zip", "alpha": "auto", "score": VALIDATION}),
    ("MuDSC auto (proxy)", "mudsc", {"matcher": "zip", "alpha": "auto"}),
    ("act. align + REPAIR", "act_align", {"repair": True}),
    ("MuDSC align + REPAIR", "mudsc", {"matcher": "align", "alpha": 0.5, "repair": True}),
    ("ZipIt + norm_repair", "zipit", {"post": ["norm_repair"]}),
    ("MuDSC zip + unit/norm_repair", "mudsc", {"matcher": "zip", "alpha": 0.5, "post": ["unit_repair", "norm_repair"]}),
]
BASELINES = ("model A", "model B", "ensemble")
ROWS = (*BASELINES, *(label for label, _, _ in METHODS))
METRICS = (("task_0", "task A"), ("task_1", "task B"), ("joint", "joint"))
# widths (digits_common's width argument) where merging works; wider merges better (see --help)
DEFAULT_WIDTHS = {"mlp": 128, "resnet_bn": 32, "resnet_gn": 64, "vit": 64}
DEFAULT_SEEDS = (0, 1, 2)
VAL_FRACTION = 0.2  # of the training images, per class, held out from training and merging

Scores = dict[str, dict[str, float]]  # row -> metric -> accuracy in [0, 1]


@dataclass
class KindRun:
    """One kind at one seed: the test accuracies of every row and where the time went."""

    kind: str
    width: int
    seed: int
    scores: Scores
    train_s: float
    merge_s: dict[str, float] = field(default_factory=dict)
    alpha: dict[str, dict[str, Any]] = field(default_factory=dict)  # alpha="auto" rows: report["alpha_selection"]


def holdout(split: DigitsSplit, fraction: float = VAL_FRACTION) -> tuple[DigitsSplit, tuple[torch.Tensor, torch.Tensor]]:
    """``split`` without a stratified ``fraction`` of its training images, and those (images, labels)."""
    keep, val = stratified_indices(split.train_labels.numpy(), fraction, seed=0)
    fit = dataclasses.replace(split, train_images=split.train_images[keep], train_labels=split.train_labels[keep])
    return fit, (split.train_images[val], split.train_labels[val])


def validation_score(val: tuple[torch.Tensor, torch.Tensor]) -> Callable[[nn.Module], float]:
    """``score(model)``: 10-way (joint) accuracy on the held-out validation images (higher is better)."""
    images, labels = val

    @torch.no_grad()
    def joint_accuracy(model: nn.Module) -> float:
        return float((dc.logits(model.eval()(images)).argmax(dim=1) == labels).float().mean())

    return joint_accuracy


def train_pair(
    split: DigitsSplit, kind: str, width: int, seed: int, epochs: int | None = None
) -> list[nn.Module]:
    """Model A on task 0 and model B on task 1, from different initialisations derived from ``seed``."""
    return [
        dc.train_task_model(split, kind, task, width=width, seed=1000 * seed + 500 * task, epochs=epochs)
        for task in (0, 1)
    ]


def merge_all(
    models: list[nn.Module],
    split: DigitsSplit,
    seed: int,
    methods: Sequence[tuple[str, str, dict]] = METHODS,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Scores, dict[str, float], dict[str, dict[str, Any]]]:
    """Scores, wall times and alpha selections of every merge of ``models`` (data: the unlabelled training
    images; ``val``: the held-out images a ``score=VALIDATION`` option is computed on)."""
    data = split.loader("train", None, batch_size=64)
    example = (split.train_images[:2],)
    scores, seconds, alphas = {}, {}, {}
    for label, method, options in methods:
        if options.get("score") == VALIDATION:
            if val is None:
                raise ValueError(f"{label}: score={VALIDATION!r} needs the held-out validation images (val=)")
            options = {**options, "score": validation_score(val)}
        start = time.perf_counter()
        result = fxmerge.merge(
            models, method=method, data=data, example_inputs=example, seed=seed, progress=False, **options
        )
        seconds[label] = time.perf_counter() - start
        scores[label] = dc.evaluate(result.model, split)
        if "alpha_selection" in result.report:
            alphas[label] = result.report["alpha_selection"]
    return scores, seconds, alphas


def run_kind(
    split: DigitsSplit,
    kind: str,
    width: int,
    seed: int,
    *,
    epochs: int | None = None,
    methods: Sequence[tuple[str, str, dict]] = METHODS,
) -> KindRun:
    """Train the pair on ``split`` less its held-out validation images, score A, B and their ensemble, then
    merge with every method."""
    split, val = holdout(split)
    start = time.perf_counter()
    models = train_pair(split, kind, width, seed, epochs)
    train_s = time.perf_counter() - start
    scores = {
        "model A": dc.evaluate(models[0], split),
        "model B": dc.evaluate(models[1], split),
        "ensemble": dc.evaluate(dc.ensemble(models), split),
    }
    merged, merge_s, alphas = merge_all(models, split, seed, methods, val)
    scores.update(merged)
    return KindRun(kind, width, seed, scores, train_s, merge_s, alphas)


def summarize(runs: Sequence[KindRun]) -> dict[str, dict[str, tuple[float, float]]]:
    """row -> metric -> (mean, std over seeds) in percent (std 0 for a single seed)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for row in runs[0].scores:
        out[row] = {}
        for metric, _ in METRICS:
            values = [100.0 * r.scores[row][metric] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[row][metric] = (statistics.fmean(values), std)
    return out


def _cell(mean: float, std: float, n_seeds: int, pad: bool = True) -> str:
    cell = f"{mean:5.1f} ± {std:4.1f}" if n_seeds > 1 else f"{mean:5.1f}"
    return cell if pad else " ".join(cell.split())


def table_rows(
    summary: dict[str, dict[str, tuple[float, float]]], n_seeds: int, pad: bool = True
) -> list[list[str]]:
    return [[row, *(_cell(*summary[row][m], n_seeds, pad) for m, _ in METRICS)] for row in summary]


def format_table(title: str, summary: dict[str, dict[str, tuple[float, float]]], n_seeds: int) -> str:
    """A plain-text table for the terminal."""
    rows = table_rows(summary, n_seeds)
    header = ["", *(name for _, name in METRICS)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        title,
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        ),
    ]
    lines.append("-" * len(lines[-1]))
    for i, r in enumerate(rows):
        if i == len(BASELINES):
            lines.append("-" * len(lines[1]))
        lines.append(
            "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(lines)


def markdown_table(summary: dict[str, dict[str, tuple[float, float]]], n_seeds: int) -> str:
    header = "| model | " + " | ".join(name for _, name in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    body = ["| " + " | ".join(r) + " |" for r in table_rows(summary, n_seeds, pad=False)]
    return "\n".join([header, rule, *body])


def _timing_line(runs: Sequence[KindRun]) -> str:
    merges = ", ".join(
        f"{label} {statistics.fmean(r.merge_s[label] for r in runs):.1f}" for label in runs[0].merge_s
    )
    train = statistics.fmean(r.train_s for r in runs)
    return f"wall time, 1 thread: train (pair) {train:.1f} s; merge seconds: {merges}"


def _alpha_line(runs: Sequence[KindRun]) -> str:
    """The alpha each alpha="auto" row chose, per seed."""
    rows = []
    for label in runs[0].alpha:
        chosen = " ".join(format(r.alpha[label]["chosen"], "g") for r in runs)
        rows.append(f"{label} {chosen}")
    return "alpha chosen per seed: " + "; ".join(rows) if rows else ""


def _title(runs: Sequence[KindRun]) -> str:
    seeds = " ".join(str(r.seed) for r in runs)
    return f"{runs[0].kind}, width {runs[0].width}, seeds {seeds} (test accuracy %, mean ± std over seeds)"


def write_markdown(path: Path, by_kind: dict[str, list[KindRun]], command: str) -> None:
    parts = [
        "# Merging digit models trained on disjoint classes",
        "",
        "Model A is trained on digits 0-4, model B on digits 5-9 (different initialisations). Task A / "
        "task B: 5-way accuracy on the test images of each half; joint: 10-way accuracy on all test "
        "images. Ensemble: mean of the two models' normalised embeddings (2x the compute). A stratified "
        f"{VAL_FRACTION:.0%} of the training images is held out from training and merging: MuDSC auto (val. "
        "score) picks alpha by the merged model's joint accuracy there; MuDSC auto (proxy) picks it without "
        "labels (agreement of the merged model's outputs with the parents'). Merges use the rest of the "
        "training images, unlabelled. Produced by",
        "",
        f"    {command}",
        "",
    ]
    for runs in by_kind.values():
        parts += [
            f"## {_title(runs)}",
            "",
            markdown_table(summarize(runs), len(runs)),
            "",
            _timing_line(runs),
            "",
            _alpha_line(runs),
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def plot(path: Path, by_kind: dict[str, list[KindRun]]) -> None:
    """Grouped bars per kind: mean per-task accuracy and joint accuracy of every row (error bar: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(by_kind)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 2.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        _plot_kind(ax, by_kind[kind])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_kind(ax: Any, runs: Sequence[KindRun]) -> None:
    rows = list(runs[0].scores)
    task = [[50.0 * (r.scores[row]["task_0"] + r.scores[row]["task_1"]) for r in runs] for row in rows]
    joint = [[100.0 * r.scores[row]["joint"] for r in runs] for row in rows]
    xs = range(len(rows))
    for offset, values, label in ((-0.2, task, "mean of task A, B (5-way)"), (0.2, joint, "joint (10-way)")):
        means = [statistics.fmean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar([x + offset for x in xs], means, 0.4, yerr=stds, capsize=2, label=label)
    ax.axhline(20.0, color="tab:blue", lw=0.7, ls=":", label="chance, 5-way")
    ax.axhline(10.0, color="tab:orange", lw=0.7, ls=":", label="chance, 10-way")
    ax.axvline(len(BASELINES) - 0.5, color="black", lw=0.6)
    ax.set_xticks(list(xs), rows, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{runs[0].kind} (width {runs[0].width}, {len(runs)} seed(s))", fontsize=10)


def run(
    kinds: Sequence[str],
    seeds: Sequence[int],
    width: int | None = None,
    *,
    epochs: int | None = None,
    methods: Sequence[tuple[str, str, dict]] = METHODS,
    verbose: bool = True,
) -> dict[str, list[KindRun]]:
    """Every kind at every seed; prints one table per kind when ``verbose``."""
    split = load_digits_split(seed=0)
    by_kind: dict[str, list[KindRun]] = {}
    for kind in kinds:
        w = width or DEFAULT_WIDTHS[kind]
        by_kind[kind] = [run_kind(split, kind, w, seed, epochs=epochs, methods=methods) for seed in seeds]
        if verbose:
            runs = by_kind[kind]
            print(format_table(_title(runs), summarize(runs), len(runs)))
            print(_timing_line(runs), "\n", flush=True)
    return by_kind


def write_outputs(out: Path, by_kind: dict[str, list[KindRun]], command: str) -> list[Path]:
    paths = [
        out / "results" / "digits_merge.md",
        out / "results" / "digits_merge.json",
        out / "img" / "digits_merge.png",
    ]
    write_markdown(paths[0], by_kind, command)
    raw = {kind: [asdict(r) for r in runs] for kind, runs in by_kind.items()}
    paths[1].write_text(json.dumps(raw, indent=1))
    plot(paths[2], by_kind)
    return paths


def combine(paths: Sequence[Path]) -> dict[str, list[KindRun]]:
    """The runs recorded in ``digits_merge.json`` files, by kind (kinds in ``MODEL_KINDS`` order, runs in the order
    given)."""
    by_kind: dict[str, list[KindRun]] = {}
    for path in paths:
        for kind, runs in json.loads(path.read_text()).items():
            by_kind.setdefault(kind, []).extend(KindRun(**r) for r in runs)
    order = {kind: i for i, kind in enumerate(dc.MODEL_KINDS)}
    return {kind: by_kind[kind] for kind in sorted(by_kind, key=lambda k: order.get(k, len(order)))}


def _meta(path: Path) -> dict[str, str]:
    """The command a ``digits_merge.json`` was produced by (from the markdown written next to it)."""
    md = path.with_suffix(".md")
    lines = md.read_text().splitlines() if md.exists() else []
    cmd = next((line.strip() for line in lines if line.startswith("    python examples/digits_merge.py")), str(path))
    return {"command": cmd}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kinds", nargs="+", default=list(dc.MODEL_KINDS), choices=dc.MODEL_KINDS)
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help=f"width for every kind (default per kind: {DEFAULT_WIDTHS}); wider models merge better",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=list(DEFAULT_SEEDS),
        help="one run per seed; several seeds report mean ± std",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="override digits_common.RECIPES epochs (for smoke tests)"
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="merge only these rows of the table (labels as printed, e.g. 'Git Re-Basin' 'ZipIt'); default: all",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="write the tables and plot from the digits_merge.json files of earlier runs (e.g. one process per "
        "--kinds, run in parallel) instead of running anything",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("docs"),
        help="writes results/digits_merge.{md,json}, img/digits_merge.png",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    if args.width is not None and args.width < 1:
        raise SystemExit("--width must be >= 1")
    start = time.perf_counter()
    command = "python examples/digits_merge.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.combine:
        by_kind = combine(args.combine)
        runs = " & ".join(dict.fromkeys(_meta(path)["command"] for path in args.combine))
        command = f"{runs} & wait; {command.strip()}"  # the runs combined (in parallel), then this command
    else:
        methods = METHODS
        if args.rows:
            unknown = [r for r in args.rows if r not in {label for label, _, _ in METHODS}]
            if unknown:
                raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {[m[0] for m in METHODS]}")
            methods = [m for m in METHODS if m[0] in args.rows]
        by_kind = run(args.kinds, args.seeds, args.width, epochs=args.epochs, methods=methods)
    for path in write_outputs(args.out, by_kind, command.strip()):
        print(f"wrote {path}")
    minutes = (time.perf_counter() - start) / 60
    print(f"total {minutes:.1f} min on {torch.get_num_threads()} thread(s)")
    return (
        0
        if all(
            math.isfinite(v)
            for runs in by_kind.values()
            for r in runs
            for s in r.scores.values()
            for v in s.values()
        )
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
