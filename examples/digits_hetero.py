"""Heterogeneous merging on the digits 5+5 split: deep x shallow ResNets, deep x shallow plain VGGs, wide x narrow.

Every model maps an 8x8 digit to a 64-d embedding scored against fixed class vectors (``digits_common``), so
merged models are evaluated like the models they came from. Model "A" is trained on digits 0-4, model "B" on
digits 5-9. For each family the script trains two models of each architecture (one per task), then compares

* the individual models and the ensemble of the heterogeneous pair,
* homogeneous merges of the same task split (deep x deep, shallow x shallow): average, ZipIt, MuDSC,
* heterogeneous merges (``fxmerge.merge(..., depth=..., width=...)``): ZipIt with LMA / SMA / uniform depth
  alignment (the shallow block at the start or the end of its segment), MuDSC and averaging with LMA, elastic
  ZipIt to the larger or smaller width; the main rows are run in both directions (deep on A + shallow on B
  and deep on B + shallow on A).

The training images of both tasks (no labels) are the data for CKA, activation statistics and the BatchNorm
reset. Test accuracy: task A (digits 0-4, 5-way), task B (digits 5-9, 5-way), joint (10-way).

    python examples/digits_hetero.py               # ~5 min on one CPU core
    python examples/digits_hetero.py --quick       # fewer epochs, a smoke run

Writes ``<out>/results/digits_hetero.md`` and CKA heatmaps with the alignments ``<out>/img/digits_hetero_*.png``
(``--out`` defaults to ``docs``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_common as dc

import fxmerge
from fxmerge.data import load_digits_split
from fxmerge.data.digits import DigitsSplit

METRICS = (("task_0", "task A"), ("task_1", "task B"), ("avg_task", "avg task"), ("joint", "joint"))
EPOCHS, LR = 20, 3e-3


class DigitsResNet(nn.Module):
    """Stem, ``depths[0]`` blocks at 8x8 (``width``), ``depths[1]`` at 4x4 (``2 * width``), pool, embedding."""

    def __init__(self, depths: Sequence[int], width: int, embed_dim: int = dc.EMBED_DIM) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for stage, depth in enumerate(depths):
            for i in range(depth):
                blocks.append(dc.ResBlock(c, width * 2**stage, 2 if stage and not i else 1, "bn"))
                c = width * 2**stage
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(c, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class DigitsVGG(nn.Module):
    """Plain stack: ``depths[0]`` conv-BN-ReLU at 8x8, max-pool, ``depths[1]`` at 4x4 (doubled width), pool, embedding."""

    def __init__(self, depths: Sequence[int], width: int, embed_dim: int = dc.EMBED_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for stage, depth in enumerate(depths):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers += [nn.Conv2d(c, width * 2**stage, 3, padding=1), nn.BatchNorm2d(width * 2**stage), nn.ReLU()]
                c = width * 2**stage
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(c, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@dataclass(frozen=True)
class Family:
    """Two architectures ("big" and "small") of one family and the heterogeneous merges to run."""

    name: str
    build: Any
    big: tuple[Sequence[int], int]  # (depths, width)
    small: tuple[Sequence[int], int]
    labels: tuple[str, str]
    hetero: tuple[tuple[str, str, dict[str, Any], bool], ...]  # (label, method, options, both directions)


DEPTH_MERGES = (
    ("ZipIt, LMA (start)", "zipit", {"depth": "lma"}, True),
    ("ZipIt, SMA (start)", "zipit", {"depth": "sma"}, False),
    ("ZipIt, uniform", "zipit", {"depth": "uniform"}, False),
    ("ZipIt, LMA (end)", "zipit", {"depth": "lma", "where": "end"}, False),
    ("MuDSC, LMA", "mudsc", {"depth": "lma"}, False),
    ("average, LMA", "average", {"depth": "lma"}, False),
)
WIDTH_MERGES = (
    ("ZipIt, width max", "zipit", {"width": "max"}, True),
    ("ZipIt, width min", "zipit", {"width": "min"}, False),
)
FAMILIES = (
    Family("resnet", DigitsResNet, ((5, 5), 32), ((3, 3), 32), ("deep", "shallow"), DEPTH_MERGES),
    Family("vgg", DigitsVGG, ((5, 5), 32), ((3, 3), 32), ("deep", "shallow"), DEPTH_MERGES),
    Family("width", DigitsResNet, ((2, 2), 32), ((2, 2), 16), ("wide", "narrow"), WIDTH_MERGES),
)
HOMOGENEOUS = (("average", "average", {}), ("ZipIt", "zipit", {}), ("MuDSC", "mudsc", {}))


@dataclass
class FamilyRun:
    """Scores (row -> metric -> accuracy) and notes of one family."""

    family: Family
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def train(split: DigitsSplit, family: Family, which: str, task: int, seed: int, epochs: int) -> nn.Module:
    """Train the ``which`` ("big"/"small") architecture of ``family`` on ``task``."""
    depths, width = getattr(family, which)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.build(depths, width)
    loader = split.loader("train", task, 64, shuffle=True, generator=torch.Generator().manual_seed(seed + 1))
    return dc.train(model, loader, epochs=epochs, lr=LR, generator=torch.Generator().manual_seed(seed + 2),
                    classes=split.tasks[task])  # fmt: skip


def _mean(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def run_family(split: DigitsSplit, family: Family, seed: int, epochs: int, img_dir: Path | None) -> FamilyRun:
    run = FamilyRun(family)
    big_name, small_name = family.labels
    start = time.perf_counter()
    models = {(w, t): train(split, family, w, t, 1000 * seed + 100 * i + 10 * t, epochs)
              for i, w in enumerate(("big", "small")) for t in (0, 1)}  # fmt: skip
    run.seconds["training (4 models)"] = time.perf_counter() - start
    for (w, t), m in models.items():
        run.scores[f"{big_name if w == 'big' else small_name} {'AB'[t]}"] = dc.evaluate(m, split)
    run.scores[f"ensemble {big_name} A + {small_name} B"] = dc.evaluate(
        dc.ensemble([models["big", 0], models["small", 1]]), split)  # fmt: skip
    data = split.loader("train", None, batch_size=64)
    example = (split.train_images[:2],)

    def merge(label: str, pair: list[nn.Module], method: str, **options: Any) -> fxmerge.MergeResult:
        t0 = time.perf_counter()
        result = fxmerge.merge(pair, method=method, data=data, example_inputs=example, seed=seed, progress=False,
                               **options)  # fmt: skip
        run.seconds[label] = time.perf_counter() - t0
        return result

    for label, method, options in HOMOGENEOUS:
        row = f"{big_name} x {big_name}: {label}"
        run.scores[row] = dc.evaluate(merge(row, [models["big", 0], models["big", 1]], method, **options).model, split)
    row = f"{small_name} x {small_name}: ZipIt"
    run.scores[row] = dc.evaluate(merge(row, [models["small", 0], models["small", 1]], "zipit").model, split)
    for label, method, options, both in family.hetero:
        row = f"{big_name} x {small_name}: {label}"
        plot = None
        if img_dir is not None and options.get("depth") in ("lma", "sma") and "where" not in options and method == "zipit":
            plot = img_dir / f"digits_hetero_{family.name}_{options['depth']}.png"
        first = merge(row, [models["big", 0], models["small", 1]], method, cka_plot=plot, **options)
        scores = [dc.evaluate(first.model, split)]
        if both:
            second = merge(row + " (B/A)", [models["big", 1], models["small", 0]], method, **options)
            scores.append(dc.evaluate(second.model, split))
            row += " (both directions)"
        run.scores[row] = _mean(scores)
        seg = first.report.get("segmentation")
        if seg is not None:
            run.notes.append(f"{row}: slots of the {small_name} blocks in the {big_name} model {seg['slots']} "
                             f"(stages {seg['stages_deep']} vs {seg['stages_shallow']})")  # fmt: skip
        if plot is not None:
            run.notes.append(f"{row}: CKA heatmap `{plot.name}`")
    return run


def _fmt(v: float) -> str:
    return f"{100.0 * v:5.1f}"


def text_table(run: FamilyRun) -> str:
    width = max(len(r) for r in run.scores) + 2
    head = "".ljust(width) + "".join(name.rjust(10) for _, name in METRICS)
    lines = [head, "-" * len(head)]
    lines += [row.ljust(width) + "".join(_fmt(s[m]).rjust(10) for m, _ in METRICS) for row, s in run.scores.items()]
    return "\n".join(lines)


def markdown_table(run: FamilyRun) -> str:
    lines = ["| model | " + " | ".join(name for _, name in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    lines += ["| " + row + " | " + " | ".join(_fmt(s[m]).strip() for m, _ in METRICS) + " |"
              for row, s in run.scores.items()]  # fmt: skip
    return "\n".join(lines)


def _title(f: Family) -> str:
    (bd, bw), (sd, sw) = f.big, f.small
    arch = "ResNet" if f.build is DigitsResNet else "plain VGG"
    return f"{arch}: {f.labels[0]} (blocks {list(bd)}, width {bw}) x {f.labels[1]} (blocks {list(sd)}, width {sw})"


def write_markdown(path: Path, runs: Sequence[FamilyRun], command: str, total: float) -> None:
    parts = ["# Heterogeneous merging on the digits 5+5 split", "",
             "Model A is trained on digits 0-4, model B on digits 5-9 (different initialisations). Task A / task B: "
             "5-way test accuracy on each half; avg task: their mean; joint: 10-way accuracy on all test images "
             "(%). Homogeneous rows merge two models of the same architecture; heterogeneous rows merge the bigger "
             "model trained on A with the smaller one trained on B (\"both directions\": mean with big-on-B + "
             "small-on-A). All merges use the unlabelled training images and reset BatchNorm statistics. Produced by",
             "", f"    {command}", "", f"Total run time {total / 60:.1f} min on one CPU thread.", ""]  # fmt: skip
    for run in runs:
        parts += [f"## {_title(run.family)}", "", markdown_table(run), ""]
        parts += [f"- {n}" for n in run.notes]
        secs = ", ".join(f"{k} {v:.1f}" for k, v in run.seconds.items())
        parts += ["", f"Seconds: {secs}.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=[f.name for f in FAMILIES],
                        choices=[f.name for f in FAMILIES])  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--quick", action="store_true", help="3 epochs per model (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="writes <out>/results and <out>/img")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = 3 if args.quick else args.epochs
    split = load_digits_split(seed=args.seed)
    img_dir = None if args.no_write else args.out / "img"
    if img_dir is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = []
    for family in FAMILIES:
        if family.name not in args.families:
            continue
        run = run_family(split, family, args.seed, epochs, img_dir)
        runs.append(run)
        print(f"\n{_title(family)}\n{text_table(run)}")
        for note in run.notes:
            print(f"  {note}")
    total = time.perf_counter() - start
    print(f"\ntotal {total / 60:.1f} min")
    if not args.no_write:
        command = "python examples/digits_hetero.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown(args.out / "results" / "digits_hetero.md", runs, command.strip(), total)


if __name__ == "__main__":
    main()
