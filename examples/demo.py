"""fxmerge in one minute: merge two digit classifiers trained on disjoint classes, export, verify.

Model A learns digits 0-4 and model B digits 5-9 (scikit-learn's 8x8 digits, bundled, nothing to download).
fxmerge infers the permutation symmetries of the network from its graph, merges A and B into ONE model of
the same size with MuDSC, exports it to ONNX and checks the file in onnxruntime against PyTorch.

    python examples/demo.py                     # what `make demo` runs
    python examples/demo.py --kind mlp --width 128 --out runs/demo-mlp

Writes ``<out>/merged.onnx``, ``<out>/results.json`` and ``<out>/results.md`` (``--out`` defaults to
``runs/demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_common as dc

import fxmerge
from fxmerge.data import load_digits_split
from fxmerge.data.digits import DigitsSplit
from fxmerge.export import ExportReport, export_onnx

METRICS = (("task_0", "task A"), ("task_1", "task B"), ("joint", "joint"))
Log = Callable[[str], None]


@dataclass
class DemoResult:
    """Test accuracies (row -> metric -> fraction), the ONNX check and wall times in seconds."""

    scores: dict[str, dict[str, float]]
    onnx: dict[str, Any]
    merge_report: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _digits(task: Sequence[int]) -> str:
    return (
        f"{min(task)}-{max(task)}" if list(task) == list(range(min(task), max(task) + 1)) else str(list(task))
    )


def train_models(
    split: DigitsSplit,
    kind: str,
    width: int,
    seed: int,
    epochs: int | None,
    log: Log,
    seconds: dict[str, float],
) -> list[nn.Module]:
    models = []
    for task, name in enumerate("AB"):
        n_epochs = epochs or dc.RECIPES[kind][0]
        log(
            f"[{task + 1}/4] training model {name} on digits {_digits(split.tasks[task])} "
            f"({kind}, width {width}, {n_epochs} epochs) ..."
        )
        start = time.perf_counter()
        models.append(
            dc.train_task_model(split, kind, task, width=width, seed=seed + 1000 * task, epochs=epochs)
        )
        seconds[f"train_{name}"] = time.perf_counter() - start
        own = dc.evaluate(models[-1], split)[f"task_{task}"]
        log(f"      done in {seconds[f'train_{name}']:.1f} s, task {name} test accuracy {100 * own:.1f}%")
    return models


def merge_models(
    models: list[nn.Module], split: DigitsSplit, method: str, seed: int, progress: bool, **options: Any
) -> fxmerge.MergeResult:
    data = split.loader("train", None, batch_size=64)  # both halves' training images; labels are ignored
    return fxmerge.merge(
        models,
        method=method,
        data=data,
        example_inputs=(split.train_images[:2],),
        seed=seed,
        progress=progress,
        **options,
    )


@torch.no_grad()
def onnx_joint_accuracy(path: Path, input_name: str, split: DigitsSplit) -> float:
    """10-way test accuracy of the exported file, run in onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, labels = split.arrays("test")
    (embeddings,) = session.run(None, {input_name: images.numpy()})
    predicted = dc.logits(torch.from_numpy(np.asarray(embeddings))).argmax(dim=1)
    return float((predicted == labels).float().mean())


def export_and_check(model: nn.Module, split: DigitsSplit, out: Path, log: Log) -> dict[str, Any]:
    log("[4/4] exporting the merged model to ONNX and checking it in onnxruntime ...")
    report: ExportReport = export_onnx(model, (split.test_images[:2],), out / "merged.onnx")
    joint = onnx_joint_accuracy(report.path, report.input_names[0], split)
    return {
        "path": str(report.path),
        "exporter": report.exporter,
        "opset": report.opset,
        "batch_sizes": list(report.checked_batch_sizes),
        "max_abs_diff": report.max_abs_diff,
        "atol": report.atol,
        "rtol": report.rtol,
        "joint_accuracy": joint,
    }


def format_table(scores: dict[str, dict[str, float]]) -> str:
    width = max(len(row) for row in scores) + 2
    lines = ["test accuracy (%)".ljust(width) + "".join(name.rjust(8) for _, name in METRICS)]
    lines.append("-" * len(lines[0]))
    for i, (row, values) in enumerate(scores.items()):
        if i == 3:
            lines.append("-" * len(lines[0]))
        lines.append(row.ljust(width) + "".join(f"{100 * values[m]:8.1f}" for m, _ in METRICS))
    return "\n".join(lines)


def onnx_line(onnx: dict[str, Any], pytorch_joint: float) -> str:
    sizes = ", ".join(map(str, onnx["batch_sizes"]))
    return (
        f"ONNX {onnx['path']} ({onnx['exporter']}, opset {onnx['opset']}): onnxruntime matches PyTorch, "
        f"max |diff| {onnx['max_abs_diff']:.1e} on batch sizes {sizes} (allowed {onnx['atol']:g} + "
        f"{onnx['rtol']:g}*|y|); joint accuracy in onnxruntime {100 * onnx['joint_accuracy']:.1f}% "
        f"(PyTorch {100 * pytorch_joint:.1f}%)"
    )


def markdown(result: DemoResult, command: str) -> str:
    rows = ["| model | " + " | ".join(n for _, n in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    rows += [
        "| " + row + " | " + " | ".join(f"{100 * v[m]:.1f}" for m, _ in METRICS) + " |"
        for row, v in result.scores.items()
    ]
    return "\n".join(
        [
            f"# fxmerge demo\n\n    {command}\n",
            *rows,
            "",
            onnx_line(result.onnx, result.scores[_merge_label(result)]["joint"]),
            "",
        ]
    )


def _merge_label(result: DemoResult) -> str:
    return list(result.scores)[-1]


def run_demo(
    out: Path,
    *,
    kind: str = "resnet_bn",
    width: int = 32,
    seed: int = 0,
    epochs: int | None = None,
    matcher: str = "zip",
    progress: bool = True,
    log: Log = print,
) -> DemoResult:
    """Train A and B, merge them by weight averaging and with MuDSC, export the MuDSC merge; the numbers."""
    seconds: dict[str, float] = {}
    split = load_digits_split(seed=0)
    log(
        f"data: scikit-learn digits (8x8), {len(split.train_labels)} train / {len(split.test_labels)} test "
        f"images; task A = digits {_digits(split.tasks[0])}, task B = digits {_digits(split.tasks[1])}"
    )
    models = train_models(split, kind, width, seed, epochs, log, seconds)
    log(f"[3/4] merging A and B with MuDSC ({matcher} matcher; weight averaging for comparison) ...")
    start = time.perf_counter()
    mudsc = merge_models(models, split, "mudsc", seed, progress, matcher=matcher)
    seconds["merge_mudsc"] = time.perf_counter() - start
    average = merge_models(models, split, "average", seed, progress)
    rep = mudsc.report
    n_params = sum(p.numel() for p in mudsc.model.parameters())
    log(
        f"      done in {seconds['merge_mudsc']:.1f} s: {rep['groups']} permutation groups, {rep['spaces']} "
        f"merge spaces, {rep['sweeps']} coordinate-descent sweeps; one model of {n_params:,} parameters "
        "(as many as A)"
    )
    scores = {
        "model A": dc.evaluate(models[0], split),
        "model B": dc.evaluate(models[1], split),
        "ensemble (2x compute)": dc.evaluate(dc.ensemble(models), split),
        "weight average": dc.evaluate(average.model, split),
        f"MuDSC merge ({matcher})": dc.evaluate(mudsc.model, split),
    }
    start = time.perf_counter()
    onnx = export_and_check(mudsc.model, split, out, log)
    seconds["export"] = time.perf_counter() - start
    keep = ("method", "options", "groups", "spaces", "identity_groups", "sweeps", "timings")
    return DemoResult(scores, onnx, {k: rep[k] for k in keep if k in rep}, seconds)


def save(result: DemoResult, out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(
        json.dumps(
            {
                "scores": result.scores,
                "onnx": result.onnx,
                "merge": result.merge_report,
                "seconds": result.seconds,
            },
            indent=1,
            default=str,
        )
    )
    paths[1].write_text(markdown(result, command))
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="resnet_bn", choices=dc.MODEL_KINDS)
    p.add_argument("--width", type=int, default=32, help="model width (wider models merge better)")
    p.add_argument("--matcher", default="zip", choices=("zip", "align"), help="MuDSC matcher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the training recipe's epochs")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    start = time.perf_counter()
    print("fxmerge demo: merge two digit classifiers trained on disjoint classes into one model\n")
    result = run_demo(
        args.out,
        kind=args.kind,
        width=args.width,
        seed=args.seed,
        epochs=args.epochs,
        matcher=args.matcher,
        progress=not args.no_progress,
    )
    print("\n" + format_table(result.scores) + "\n")
    print(onnx_line(result.onnx, result.scores[_merge_label(result)]["joint"]))
    command = "python examples/demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for path in save(result, args.out, command.strip()):
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
