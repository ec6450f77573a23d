"""Heterogeneous merging on the digits 5+5 split: deep x shallow ResNets, deep x shallow plain VGGs, wide x narrow.

Every model maps an 8x8 digit to a 64-d embedding scored against fixed class vectors (``digits_common``), so
merged models are evaluated like the models they came from. Model "A" is trained on digits 0-4, model "B" on
digits 5-9. For the depth families the script trains two models of each architecture (one per task), then compares

* the individual models and the ensemble of the heterogeneous pair,
* homogeneous merges of the same task split (deep x deep, shallow x shallow): average, ZipIt, MuDSC,
* heterogeneous merges (``fxmerge.merge(..., depth=...)``): ZipIt with LMA / SMA / uniform depth alignment (the
  shallow block at the start or the end of its segment), MuDSC and averaging with LMA; the main row is run in both
  directions (deep on A + shallow on B and deep on B + shallow on A).

The width section (``--families width``) merges a wide and a narrow model of the same architecture (residual MLP
512 vs 256 units, ResNet with BatchNorm 32/64 vs 16/32 channels) with elastic ZipIt (``width="max"``), in both
directions, and compares it with the homogeneous ZipIt merge of two narrow models and with the parents, over
``--seeds`` seeds (mean ± std). An ablation row merges without the head balance of elastic merges
(:func:`fxmerge.hetero.width.balance_heads`).

The block-count section (``--families counts``, not in the default run) merges models whose numbers of attention
heads / GroupNorm groups differ at the same width (ViT width 64: 4 heads x 16 vs 8 heads x 8; GroupNorm ResNet
width 32: 4 vs 8 groups): parents, homogeneous ZipIt of each architecture, the ensemble and elastic ZipIt with
``width="max"`` (the model with more heads / groups is rebuilt) and ``"min"``, both directions, each with and
without the normalisation-aware post-passes (``COUNT_POST``), over ``--seeds`` seeds. It replaces its own section of ``digits_hetero.md`` and leaves the rest of the page as it is:

    python examples/digits_hetero.py --families counts    # ~15 min on one CPU core

The training images of both tasks (no labels) are the data for CKA, activation statistics and the BatchNorm
reset. Test accuracy: task A (digits 0-4, 5-way), task B (digits 5-9, 5-way), joint (10-way).

    nice python examples/digits_hetero.py               # ~15 min on one CPU core
    python examples/digits_hetero.py --quick       # fewer epochs, one seed, a smoke run

Writes ``<out>/results/digits_hetero.md`` and CKA heatmaps with the alignments ``<out>/img/digits_hetero_*.png``
(``--out`` defaults to ``docs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

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
FAMILIES = (
    Family("resnet", DigitsResNet, ((5, 5), 32), ((3, 3), 32), ("deep", "shallow"), DEPTH_MERGES),
    Family("vgg", DigitsVGG, ((5, 5), 32), ((3, 3), 32), ("deep", "shallow"), DEPTH_MERGES),
)
# (digits_common kind, wide width, narrow width, title) of the width section
WIDTH_ARCHS = (
    ("resmlp", 128, 64, "residual MLP: wide (512 units) x narrow (256 units)"),
    ("resnet_bn", 32, 16, "ResNet (BatchNorm): wide (32/64 channels) x narrow (16/32 channels)"),
)
# (digits_common kind, width, (fewer, more) heads / GroupNorm groups, what is counted, title) of the block-count section
COUNT_ARCHS = (
    ("vit", 64, (4, 8), "heads", "ViT (width 64): 4 heads x 16 vs 8 heads x 8"),
    ("resnet_gn", 32, (4, 8), "groups", "ResNet (GroupNorm, 32/64 channels): 4 vs 8 groups"),
)
COUNTS_HEADING = "## Elastic width: different numbers of heads / GroupNorm groups"
# the normalisation-aware post-passes that work best on each kind (docs/results/digits_norm.md)
COUNT_POST = {"vit": ["unit_repair", "norm_repair"], "resnet_gn": ["norm_repair"]}
WIDTH_CRITERION = 0.03  # the width merge should be within 3 points (joint) of the homogeneous narrow merge
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
            plot.unlink(missing_ok=True)  # this script's own heatmap from an earlier run (fxmerge never overwrites)
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


@dataclass
class WidthRun:
    """Per row, the scores of every seed (row -> list of metric -> accuracy) of one architecture."""

    kind: str
    title: str
    scores: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_width(split: DigitsSplit, kind: str, widths: tuple[int, int], title: str, seeds: Sequence[int],
              epochs: int | None) -> WidthRun:  # fmt: skip
    """Wide x narrow elastic ZipIt (both directions) vs narrow x narrow ZipIt vs the parents, per seed."""
    run = WidthRun(kind, title)
    start = time.perf_counter()
    data = split.loader("train", None, batch_size=64)
    example = (split.train_images[:2],)
    wide_w, narrow_w = widths

    def add(row: str, scores: dict[str, float]) -> None:
        run.scores.setdefault(row, []).append(scores)

    for seed in seeds:
        models = {(w, t): dc.train_task_model(split, kind, t, width=width, seed=1000 * seed + 100 * i + 10 * t,
                                              epochs=epochs)
                  for i, (w, width) in enumerate((("wide", wide_w), ("narrow", narrow_w))) for t in (0, 1)}  # fmt: skip

        def merge(pair: list[nn.Module], seed: int = seed, **options: Any) -> fxmerge.MergeResult:
            return fxmerge.merge(pair, method="zipit", data=data, example_inputs=example, seed=seed, progress=False,
                                 **options)  # fmt: skip

        for (w, t), m in sorted(models.items()):
            add(f"{w} {'AB'[t]} (parent)", dc.evaluate(m, split))
        add("narrow x narrow: ZipIt (homogeneous)",
            dc.evaluate(merge([models["narrow", 0], models["narrow", 1]]).model, split))  # fmt: skip
        add("wide x wide: ZipIt (homogeneous)", dc.evaluate(merge([models["wide", 0], models["wide", 1]]).model, split))
        pairs = ([models["wide", 0], models["narrow", 1]], [models["wide", 1], models["narrow", 0]])
        results = [merge(pair, width="max") for pair in pairs]
        add("wide x narrow: elastic ZipIt, width max (both directions)",
            _mean([dc.evaluate(r.model, split) for r in results]))  # fmt: skip
        factors = [f for r in results for fs in r.report["engine"].get("head_balance", {}).values() for f in fs]
        run.notes.append(f"seed {seed}: head balance factors (wide, narrow) {[round(f, 2) for f in factors]}")
        with mock.patch("fxmerge.hetero.api.balance_heads", lambda *args, **kwargs: {}):
            plain = [merge(pair, width="max") for pair in pairs]
        add("wide x narrow: elastic ZipIt without head balance (ablation)",
            _mean([dc.evaluate(r.model, split) for r in plain]))  # fmt: skip
        print(f"  {kind} seed {seed}: " + ", ".join(f"{row} {100 * v[-1]['joint']:.1f}" for row, v in run.scores.items()))
    run.seconds = time.perf_counter() - start
    return run


def _regroup(model: nn.Module, groups: int) -> nn.Module:
    """``model`` with every GroupNorm replaced by a fresh one of ``groups`` groups (same channels), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.GroupNorm):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, nn.GroupNorm(groups, module.num_channels))
    return model


def train_counted(split: DigitsSplit, kind: str, width: int, count: int, task: int, seed: int,
                  epochs: int | None) -> nn.Module:  # fmt: skip
    """``kind`` at ``width`` with ``count`` heads (ViT) or GroupNorm groups (ResNet), trained on ``task`` with the
    kind's ``digits_common.RECIPES`` (seeded like ``digits_common.train_task_model``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = dc.EmbedViT(width, heads=count) if kind == "vit" else _regroup(dc.EmbedResNet(width, "gn"), count)
    default_epochs, lr = dc.RECIPES[kind]
    loader = split.loader("train", task, 64, shuffle=True, generator=torch.Generator().manual_seed(seed + 1))
    return dc.train(model, loader, epochs=epochs or default_epochs, lr=lr, generator=torch.Generator().manual_seed(seed + 2),
                    classes=split.tasks[task])  # fmt: skip


def run_counts(split: DigitsSplit, arch: tuple[str, int, tuple[int, int], str, str], seeds: Sequence[int],
               epochs: int | None) -> WidthRun:  # fmt: skip
    """Models with different numbers of heads / groups: parents, homogeneous ZipIt, ensemble, elastic ZipIt with
    width max and min (both directions), per seed."""
    kind, width, counts, unit, title = arch
    run = WidthRun(kind, title)
    start = time.perf_counter()
    data = split.loader("train", None, batch_size=64)
    example = (split.train_images[:2],)

    def add(row: str, scores: dict[str, float]) -> None:
        run.scores.setdefault(row, []).append(scores)

    for seed in seeds:
        models = {(c, t): train_counted(split, kind, width, c, t, 1000 * seed + 100 * i + 10 * t, epochs)
                  for i, c in enumerate(counts) for t in (0, 1)}  # fmt: skip

        def merge(pair: list[nn.Module], seed: int = seed, **options: Any) -> fxmerge.MergeResult:
            return fxmerge.merge(pair, method="zipit", data=data, example_inputs=example, seed=seed, progress=False,
                                 **options)  # fmt: skip

        for (c, t), m in sorted(models.items()):
            add(f"{c} {unit} {'AB'[t]} (parent)", dc.evaluate(m, split))
        post = COUNT_POST[kind]
        plus = " + " + " + ".join(post)
        for c in counts:
            pair = [models[c, 0], models[c, 1]]
            add(f"{c} x {c} {unit}: ZipIt (homogeneous)", dc.evaluate(merge(pair).model, split))
            add(f"{c} x {c} {unit}: ZipIt{plus} (homogeneous)", dc.evaluate(merge(pair, post=post).model, split))
        pairs = ([models[counts[0], 0], models[counts[1], 1]], [models[counts[1], 0], models[counts[0], 1]])
        add(f"{counts[0]} x {counts[1]} {unit}: ensemble (both directions)",
            _mean([dc.evaluate(dc.ensemble(pair), split) for pair in pairs]))  # fmt: skip
        for w in ("max", "min"):
            for extra, label in (({}, ""), ({"post": post}, plus)):
                t0 = time.perf_counter()
                results = [merge(pair, width=w, **extra) for pair in pairs]
                add(f"{counts[0]} x {counts[1]} {unit}: elastic ZipIt{label}, width {w} (both directions)",
                    _mean([dc.evaluate(r.model, split) for r in results]))  # fmt: skip
                got = {next(iter(r.report["block_counts"].values()))["target"] for r in results}
                run.notes.append(f"seed {seed}, width {w}{label}: merged {unit} {sorted(got)}, "
                                 f"{(time.perf_counter() - t0) / 2:.1f} s per merge")  # fmt: skip
        print(f"  {kind} seed {seed}: " + ", ".join(f"{row} {100 * v[-1]['joint']:.1f}" for row, v in run.scores.items()))
    run.seconds = time.perf_counter() - start
    return run


def counts_section(runs: Sequence[WidthRun], command: str, seeds: Sequence[int]) -> str:
    """The markdown section of the block-count runs (``COUNTS_HEADING`` and its tables)."""
    parts = [COUNTS_HEADING, "",
             "Models of one architecture and width whose numbers of attention heads / GroupNorm groups differ, trained "
             "from different initialisations (A on digits 0-4, B on digits 5-9). The hetero merge zips the model with "
             "fewer blocks on A with the one with more blocks on B (and the reverse: \"both directions\", averaged). "
             "Elastic ZipIt zips the heads / groups themselves (`fxmerge.hetero.structured.zip_blocks`), then the units "
             "inside each merged block; `width=\"max\"` rebuilds the merge on the model with more heads / groups, "
             f"`\"min\"` on the one with fewer. Mean ± std over seeds {', '.join(map(str, seeds))} (one set of four "
             f"models per seed). Produced in {sum(r.seconds for r in runs) / 60:.1f} min on one CPU thread by", "",
             f"    {command}", ""]  # fmt: skip
    for run in runs:
        parts += [f"### {run.title}", "", width_markdown(run), ""]
        parts += [f"- {n}" for n in run.notes]
        parts += ["", f"Seconds: {run.seconds:.1f}.", ""]
    return "\n".join(parts)


def replace_section(text: str, heading: str, section: str | None) -> str:
    """``text`` with the ``## `` section titled ``heading`` replaced by ``section`` (appended when absent; removed
    when ``section`` is None)."""
    lines = text.rstrip("\n").split("\n")
    if heading in lines:
        i = lines.index(heading)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + lines[j:]
    body = "\n".join(lines).rstrip("\n")
    return body + "\n" if section is None else body + "\n\n" + section.rstrip("\n") + "\n"


def current_section(text: str, heading: str) -> str | None:
    """The ``## `` section titled ``heading`` of ``text``, or None."""
    lines = text.split("\n")
    if heading not in lines:
        return None
    i = lines.index(heading)
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return "\n".join(lines[i:j])


def _pm(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100.0 * statistics.mean(values):.1f} ± {100.0 * sd:.1f}"


def width_gap(run: WidthRun) -> float:
    """Mean joint accuracy of the width merge minus that of the homogeneous narrow merge."""
    joint = {row: statistics.mean(s["joint"] for s in v) for row, v in run.scores.items()}
    return joint["wide x narrow: elastic ZipIt, width max (both directions)"] - joint["narrow x narrow: ZipIt (homogeneous)"]


def width_markdown(run: WidthRun) -> str:
    lines = ["| model | " + " | ".join(name for _, name in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    lines += ["| " + row + " | " + " | ".join(_pm([s[m] for s in v]) for m, _ in METRICS) + " |"
              for row, v in run.scores.items()]  # fmt: skip
    return "\n".join(lines)


def width_text(run: WidthRun, with_gap: bool = True) -> str:
    width = max(len(r) for r in run.scores) + 2
    head = "".ljust(width) + "".join(name.rjust(14) for _, name in METRICS)
    lines = [head, "-" * len(head)]
    lines += [row.ljust(width) + "".join(_pm([s[m] for s in v]).rjust(14) for m, _ in METRICS)
              for row, v in run.scores.items()]  # fmt: skip
    if not with_gap:
        return "\n".join(lines)
    gap = width_gap(run)
    lines.append(f"width merge - homogeneous narrow merge (joint): {100 * gap:+.1f} points "
                 f"({'within' if gap >= -WIDTH_CRITERION else 'NOT within'} {100 * WIDTH_CRITERION:.0f})")  # fmt: skip
    return "\n".join(lines)


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


WIDTH_INTRO = (
    "Wide and narrow models of one architecture (`examples/digits_common.py` kinds), trained from different "
    "initialisations; `wide A` / `narrow B` etc. are the parents. The width merge zips the wide model on A with "
    "the narrow one on B (and wide on B with narrow on A: \"both directions\", averaged) to the larger width "
    "(`width=\"max\"`). Mean ± std over {n} seeds (one set of four models per seed)."
)
WIDTH_WHY = """Why the width merge was weak, and what changed. Before the head balance, elastic ZipIt on the residual MLP
reached ~57-69% joint (ablation row) against ~78% for two narrow models. Measured on seed 0 (wide A + narrow B):
the merged model sent 84% of the task-B test images to task-A classes (the homogeneous merge: 18%). Regressing the
merged embedding on the parents' embeddings, e ≈ 0.51 e_wide + 0.39 e_narrow, and the wide parent's embeddings
are 1.45x longer (16.1 vs 11.1), so the wide model contributed 2x more to the merged output (8.3 vs 4.3); in the
homogeneous merge the two contributions are 4.2 and 5.0. Neither the zip pattern nor the spread of the narrow
units was the cause: forbidding all within-model merges (beta=0: every narrow unit paired with one wide unit)
gave the same 57.3%, and spreading the narrow units over the whole target width (each narrow unit duplicated and
zipped against two wide units) 58.9%. The fix (`fxmerge.hetero.width.balance_heads`, run after the BatchNorm
reset of every merge whose widths differ): each model's share of a head, (1/N) W_m U_m, is rescaled so that every
parent's output survives in the merged output with the same strength (survival <y_m, f_m>/<f_m, f_m> times the
parent's output RMS, measured on the merge data). Exact merges (a model with its function-preserving widened copy)
get factors 1 and stay exact."""


def write_markdown(path: Path, runs: Sequence[FamilyRun], width_runs: Sequence[WidthRun], command: str,
                   total: float, n_seeds: int) -> None:  # fmt: skip
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
    if width_runs:
        parts += ["## Elastic width: wide x narrow", "", WIDTH_INTRO.format(n=n_seeds), ""]
        summary = ["| architecture | width merge | narrow x narrow | difference | within 3 points |", "|---|---:|---:|---:|---|"]
        for run in width_runs:
            joint = {row: [s["joint"] for s in v] for row, v in run.scores.items()}
            gap = width_gap(run)
            summary.append(f"| {run.kind} | {_pm(joint['wide x narrow: elastic ZipIt, width max (both directions)'])} | "
                           f"{_pm(joint['narrow x narrow: ZipIt (homogeneous)'])} | {100 * gap:+.1f} | "
                           f"{'yes' if gap >= -WIDTH_CRITERION else 'no'} |")  # fmt: skip
        parts += ["Joint accuracy (%):", "", *summary, ""]
        for run in width_runs:
            parts += [f"### {run.title}", "", width_markdown(run), ""]
            parts += [f"- {n}" for n in run.notes]
            parts += ["", f"Seconds: {run.seconds:.1f}.", ""]
        parts += [WIDTH_WHY, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=[f.name for f in FAMILIES] + ["width"],
                        choices=[f.name for f in FAMILIES] + ["width", "counts"],
                        help="'counts' (not in the default): different numbers of heads / GroupNorm groups")  # fmt: skip
    parser.add_argument("--count-archs", nargs="+", default=[a[0] for a in COUNT_ARCHS],
                        choices=[a[0] for a in COUNT_ARCHS], help="architectures of the 'counts' section")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the width section")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--quick", action="store_true", help="3 epochs per model and one width seed (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="writes <out>/results and <out>/img")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = 3 if args.quick else args.epochs
    n_seeds = 1 if args.quick else args.seeds
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
    width_runs = []
    if "width" in args.families:
        seeds = [args.seed + i for i in range(n_seeds)]
        for kind, wide, narrow, title in WIDTH_ARCHS:
            run = run_width(split, kind, (wide, narrow), title, seeds, 3 if args.quick else None)
            width_runs.append(run)
            print(f"\n{title}\n{width_text(run)}")
    count_runs = []
    if "counts" in args.families:
        seeds = [args.seed + i for i in range(n_seeds)]
        for arch in COUNT_ARCHS:
            if arch[0] in args.count_archs:
                run = run_counts(split, arch, seeds, 3 if args.quick else None)
                count_runs.append(run)
                print(f"\n{arch[4]}\n{width_text(run, with_gap=False)}")
    total = time.perf_counter() - start
    print(f"\ntotal {total / 60:.1f} min")
    if not args.no_write:
        command = "python examples/digits_hetero.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = args.out / "results" / "digits_hetero.md"
        kept = current_section(path.read_text(), COUNTS_HEADING) if path.exists() else None
        if runs or width_runs:
            write_markdown(path, runs, width_runs, command.strip(), total, n_seeds)
        seeds = [args.seed + i for i in range(n_seeds)]
        section = counts_section(count_runs, command.strip(), seeds) if count_runs else kept
        if section is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            old = path.read_text() if path.exists() else "# Heterogeneous merging on the digits 5+5 split\n"
            path.write_text(replace_section(old, COUNTS_HEADING, section))


if __name__ == "__main__":
    main()
