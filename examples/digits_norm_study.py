"""Why GroupNorm / LayerNorm merges lose accuracy, and the normalisation-aware post-passes that win it back.

For the digits GroupNorm ResNet and ViT (``digits_common``), model A is trained on digits 0-4 and model B on
5-9 (the pairs of ``digits_merge.py``). Per seed the study

1. merges the pair with activation alignment and measures, at every normalisation layer and residual-branch
   output, how the merged model's activations relate to the aligned parents': the parents' own per-channel
   correlation (how well the matching could pair them), the merged model's correlation with each parent, and
   the merged/parent standard-deviation ratio (variance collapse), also per GroupNorm group / attention head;
2. scores merges with and without the post-passes of :mod:`fxmerge.passes.norm` (``norm_repair``,
   ``unit_repair``), and for the ViT a partial zip (``stop_at``) whose trunk gets the same post-passes.

    python examples/digits_norm_study.py                        # resnet_gn and vit, seeds 0 1 2
    python examples/digits_norm_study.py --kinds vit --seeds 0 --cache /tmp/pairs

``--cache DIR`` keeps the trained pairs (``DIR/<kind>_<seed>.pt``) so a rerun only merges. Writes
``<out>/results/digits_norm.md`` and ``<out>/results/digits_norm.json``; ``--out`` defaults to ``docs``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_common as dc

import fxmerge
from fxmerge.data import load_digits_split
from fxmerge.data.digits import DigitsSplit

WIDTHS = {"resnet_gn": 64, "vit": 64}  # digits_merge.py's default widths
POST = ["unit_repair", "norm_repair"]
# (label, method, options) per kind; "stop_at" rows are multi-head models scored as the ensemble of their heads
MERGES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "resnet_gn": [
        ("act. align", "act_align", {}),
        ("act. align + REPAIR", "act_align", {"repair": True}),
        ("act. align + unit_repair + norm_repair", "act_align", {"post": POST}),
        ("ZipIt", "zipit", {}),
        ("ZipIt + norm_repair", "zipit", {"post": ["norm_repair"]}),
    ],
    "vit": [
        ("act. align", "act_align", {}),
        ("act. align + REPAIR", "act_align", {"repair": True}),
        ("act. align + unit_repair + norm_repair", "act_align", {"post": POST}),
        ("ZipIt", "zipit", {}),
        ("ZipIt + unit_repair + norm_repair", "zipit", {"post": POST}),
        ("MuDSC zip + unit_repair + norm_repair", "mudsc", {"matcher": "zip", "alpha": 0.5, "post": POST}),
        *((f"partial ZipIt (stop_at={cut}) + unit_repair + norm_repair", "zipit", {"stop_at": cut, "post": POST})
          for cut in ("blocks.0.attn", "blocks.0.norm2", "blocks.1", "blocks.2")),
    ],
}
VIT_DEPTH, VIT_HEADS = 3, 4  # digits_common.EmbedViT's defaults
ROTATION_ROWS = ("aligned, averaged + unit_repair + norm_repair",
                 "aligned, heads rotated (Procrustes), averaged + unit_repair + norm_repair")
# modules whose outputs the statistics study follows (normalisations and residual-branch outputs)
PROBES = {
    "resnet_gn": ["stem.1", *(f"blocks.{b}.{n}" for b in range(3) for n in ("norm1", "norm2")),
                  "blocks.1.shortcut.1", "blocks.0", "blocks.1", "blocks.2", "out"],
    "vit": ["patch", *(f"blocks.{b}.{n}" for b in range(3) for n in ("norm1", "attn", "norm2", "fc2")),
            "blocks.0", "blocks.1", "blocks.2", "norm", "out"],
}  # fmt: skip
METRICS = (("task_0", "task A"), ("task_1", "task B"), ("joint", "joint"))


def trained_pair(split: DigitsSplit, kind: str, seed: int, cache: Path | None) -> tuple[list[nn.Module], float]:
    """``digits_merge``'s pair for ``kind`` and ``seed`` (loaded from ``cache`` when there) and the training time."""
    path = cache / f"{kind}_{seed}.pt" if cache is not None else None
    if path is not None and path.exists():
        models = [dc.make_model(kind, WIDTHS[kind], seed=0) for _ in range(2)]
        for model, state in zip(models, torch.load(path), strict=True):
            model.load_state_dict(state)
        return [m.eval() for m in models], 0.0
    start = time.perf_counter()
    models = [  # digits_merge.train_pair: model A on digits 0-4, model B on 5-9, different initialisations
        dc.train_task_model(split, kind, task, width=WIDTHS[kind], seed=1000 * seed + 500 * task) for task in (0, 1)
    ]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([m.state_dict() for m in models], path)
    return models, time.perf_counter() - start


def _heads(model: nn.Module) -> Any:
    """A multi-head (partial zip) model as one embedding: the mean of its heads' normalised outputs."""
    return lambda x: torch.stack([F.normalize(o, dim=1) for o in model(x)]).mean(dim=0)


# ------------------------------------------------------------------------------------------- statistics


def _outputs(model: nn.Module, names: Sequence[str], x: torch.Tensor, inputs: bool = False) -> dict[str, Any]:
    got: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, i, o, n=n: got.__setitem__(n, (i[0] if inputs else o).detach())
        )
        for n in names
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return got


def _channels(t: torch.Tensor) -> torch.Tensor:
    """[samples, channels]: conv maps NCHW (channel axis 1), token and vector outputs channel-last."""
    return (t.movedim(1, -1) if t.dim() == 4 else t).reshape(-1, t.shape[1 if t.dim() == 4 else -1]).double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).mean(0) / (a.std(0, unbiased=False) * b.std(0, unbiased=False)).clamp_min(1e-12)


def layer_stats(parents: Sequence[nn.Module], merged: Sequence[nn.Module], names: Sequence[str],
                x: torch.Tensor) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per module: corr(A, B) of the aligned parents, corr of each merged model with the parents and its
    std ratio to the parents' mean std (median over channels)."""
    pa, pb = (_outputs(p, names, x) for p in parents)
    ms = [_outputs(m, names, x) for m in merged]
    out = {}
    for n in names:
        a, b = _channels(pa[n]), _channels(pb[n])
        ref_std = (a.std(0, unbiased=False) + b.std(0, unbiased=False)) / 2
        row = {"corr_ab": float(_corr(a, b).mean())}
        for i, m in enumerate(ms):
            mm = _channels(m[n])
            row[f"corr_m{i}"] = float((_corr(mm, a).mean() + _corr(mm, b).mean()) / 2)
            row[f"std_m{i}"] = float((mm.std(0, unbiased=False) / ref_std.clamp_min(1e-12)).median())
            shift = (mm.mean(0) - (a.mean(0) + b.mean(0)) / 2).abs() / ref_std.clamp_min(1e-12)
            row[f"shift_m{i}"] = float(shift.median())
        out[n] = row
    return out


def group_stats(parents: Sequence[nn.Module], merged: nn.Module, kind: str, x: torch.Tensor) -> dict[str, Any]:
    """Per GroupNorm group (ResNet) or attention head (ViT, at the attention projection's input): the
    parents' correlation and the merged/parent std ratio, each group's mean over its channels."""
    if kind == "vit":
        names, size, inputs = [f"blocks.{b}.attn.proj" for b in range(3)], 16, True
    else:
        names = [n for n, m in merged.named_modules() if isinstance(m, nn.GroupNorm)]
        size, inputs = None, False
    pa, pb = (_outputs(p, names, x, inputs) for p in parents)
    mm = _outputs(merged, names, x, inputs)
    out = {}
    for n in names:
        a, b, m = _channels(pa[n]), _channels(pb[n]), _channels(mm[n])
        width = size or a.shape[1] // merged.get_submodule(n).num_groups
        corr = _corr(a, b).view(-1, width).mean(1)
        ratio = (m.std(0, unbiased=False) / ((a.std(0, unbiased=False) + b.std(0, unbiased=False)) / 2)).view(-1, width)
        out[n] = {"corr_ab": corr.tolist(), "std_ratio": ratio.mean(1).tolist()}
    return out


# ------------------------------------------------------------------------------- attention heads (ViT)


def _qkv(model: nn.Module, block: int, x: torch.Tensor) -> torch.Tensor:
    """The fused q|k|v output of ``blocks.<block>.attn.qkv``, ``[B, T, 3C]``."""
    return _outputs(model, [f"blocks.{block}.attn.qkv"], x)[f"blocks.{block}.attn.qkv"]


def attention_maps(model: nn.Module, block: int, x: torch.Tensor, heads: int = VIT_HEADS) -> torch.Tensor:
    """Every head's attention probabilities in ``block``, ``[B, heads, T, T]`` (as ``EmbedViT`` computes them)."""
    qkv = _qkv(model, block, x)
    b, t, c = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, _ = (z.reshape(b, t, heads, c // heads).transpose(1, 2).double() for z in qkv.split(c, dim=2))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)


def head_overlap(parents: Sequence[nn.Module], x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per block: how alike the two parents' attention heads are, as 1 - total variation distance between
    their attention maps (1: the same map, 0: disjoint), averaged over images and query tokens. ``across``:
    the mean over the best one-to-one pairing of model A's heads with model B's (what a head matching can
    reach at best); ``within``: the mean over distinct head pairs of one model."""
    out = {}
    for block in range(VIT_DEPTH):
        maps = torch.cat([attention_maps(p, block, x) for p in parents], dim=1)
        h = maps.shape[1]
        sim = torch.stack([1 - 0.5 * (maps[:, i : i + 1] - maps).abs().sum(-1).mean(dim=(0, 2)) for i in range(h)])
        n = h // 2
        rows, cols = linear_sum_assignment(sim[:n, n:].numpy(), maximize=True)
        off = ~torch.eye(n, dtype=torch.bool)
        within = torch.cat([sim[:n, :n][off], sim[n:, n:][off]])
        out[f"blocks.{block}"] = {"across": float(sim[:n, n:][rows, cols].mean()), "within": float(within.mean())}
    return out


def _procrustes(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``Q`` minimising ``||target - source Q^T||`` over centred rows (``Q source_i ~ target_i``)."""
    a, b = target - target.mean(0), source - source.mean(0)
    u, _, vh = torch.linalg.svd(a.T @ b)
    return u @ vh


@torch.no_grad()
def rotate_heads(anchor: nn.Module, model: nn.Module, x: torch.Tensor, heads: int = VIT_HEADS) -> nn.Module:
    """A copy of ``model`` (already permuted onto ``anchor``) with every head's query/key and value dimensions
    rotated onto the anchor's by orthogonal Procrustes on their activations. Attention logits q·k are invariant
    to a rotation applied to both q and k, and the value path to any rotation undone in the output projection,
    so the copy computes exactly what ``model`` computes (a symmetry beyond permutations; the rotated model is
    then averaged with the anchor)."""
    model = copy.deepcopy(model)
    for block in range(VIT_DEPTH):
        fa, fm = (_qkv(m, block, x).flatten(0, 1).double() for m in (anchor, model))
        qkv, proj = model.get_submodule(f"blocks.{block}.attn.qkv"), model.get_submodule(f"blocks.{block}.attn.proj")
        c = fa.shape[1] // 3
        d = c // heads
        for h in range(heads):
            q, k, v = (slice(part * c + h * d, part * c + (h + 1) * d) for part in range(3))
            dtype = qkv.weight.dtype
            rot_qk = _procrustes(torch.cat([fa[:, q], fa[:, k]]), torch.cat([fm[:, q], fm[:, k]])).to(dtype)
            rot_v = _procrustes(fa[:, v], fm[:, v]).to(dtype)
            for rows, rot in ((q, rot_qk), (k, rot_qk), (v, rot_v)):
                qkv.weight[rows] = rot @ qkv.weight[rows]
                qkv.bias[rows] = rot @ qkv.bias[rows]
            cols = slice(h * d, (h + 1) * d)
            proj.weight[:, cols] = proj.weight[:, cols] @ rot_v.T
    return model


def rotation_rows(plain: Any, data: Any, example: Any, seed: int, split: DigitsSplit) -> dict[str, dict[str, float]]:
    """The activation-aligned pair averaged with the post-passes, with and without the head rotation."""
    anchor, other = plain.aligned_models
    rotated = rotate_heads(anchor, other, split.train_images)
    scores = {}
    for label, pair in zip(ROTATION_ROWS, ([anchor, other], [anchor, rotated]), strict=True):
        merged = fxmerge.merge(pair, method="average", data=data, example_inputs=example, seed=seed, progress=False,
                               post=POST).model  # fmt: skip
        scores[label] = dc.evaluate(merged, split)
    return scores


def parameter_share(model: nn.Module, parent: nn.Module) -> float:
    """Parameters of a (partially) merged model per parameter of one parent (1: fully merged, 2: two models)."""
    return sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in parent.parameters())


# ------------------------------------------------------------------------------------------------- runs


def run_seed(split: DigitsSplit, kind: str, seed: int, cache: Path | None) -> dict[str, Any]:
    models, train_s = trained_pair(split, kind, seed, cache)
    scores = {"model A": dc.evaluate(models[0], split), "model B": dc.evaluate(models[1], split),
              "ensemble": dc.evaluate(dc.ensemble(models), split)}  # fmt: skip
    data = split.loader("train", None, batch_size=64)
    example = (split.train_images[:2],)
    results, seconds, sizes = {}, {}, {}
    for label, method, options in MERGES[kind]:
        start = time.perf_counter()
        results[label] = fxmerge.merge(models, method=method, data=data, example_inputs=example, seed=seed,
                                       progress=False, **options)  # fmt: skip
        seconds[label] = time.perf_counter() - start
        model = results[label].model
        scores[label] = dc.evaluate(_heads(model) if "stop_at" in options else model, split)
        sizes[label] = parameter_share(model, models[0])
    plain, fixed = results["act. align"], results["act. align + unit_repair + norm_repair"]
    x = split.test_images
    stats = layer_stats(plain.aligned_models, [plain.model, fixed.model], PROBES[kind], x)
    groups = {"act. align": group_stats(plain.aligned_models, plain.model, kind, x),
              "+ post": group_stats(plain.aligned_models, fixed.model, kind, x)}  # fmt: skip
    run = {"seed": seed, "scores": scores, "train_s": train_s, "merge_s": seconds, "layers": stats,
           "groups": groups, "sizes": sizes}  # fmt: skip
    if kind == "vit":
        run["heads"] = head_overlap(models, x)
        scores.update(rotation_rows(plain, data, example, seed, split))
    return run


def _ms(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def accuracy_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    rows = list(runs[0]["scores"])
    lines = ["| model | task A | task B | joint | joint / ensemble | parameters / one model |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        cells = [_ms([100 * r["scores"][row][m] for r in runs]) for m, _ in METRICS]
        ratios = [r["scores"][row]["joint"] / r["scores"]["ensemble"]["joint"] for r in runs]
        ratio = f"{statistics.fmean(ratios):.2f}" + (f" ± {statistics.stdev(ratios):.2f}" if len(runs) > 1 else "")
        size = runs[0].get("sizes", {}).get(row, 2.0 if row == "ensemble" else 1.0)
        lines.append(f"| {row} | {' | '.join(cells)} | {ratio} | {size:.2f} |")
    return lines


def head_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| block | best pairing of A's heads with B's (1 - TV) | two heads of one model (1 - TV) |",
             "|---|---:|---:|"]  # fmt: skip
    for block in runs[0]["heads"]:
        across, within = (statistics.fmean(r["heads"][block][k] for r in runs) for k in ("across", "within"))
        lines.append(f"| `{block}` | {across:.2f} | {within:.2f} |")
    return lines


def layer_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| module | corr(A, B) | corr(merged, parents) | std merged / parents | mean shift / std | "
             "corr after post | std after post | mean shift after post |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    keys = ("corr_ab", "corr_m0", "std_m0", "shift_m0", "corr_m1", "std_m1", "shift_m1")
    for name in runs[0]["layers"]:
        vals = [statistics.fmean(r["layers"][name].get(k, float("nan")) for r in runs) for k in keys]
        lines.append(f"| `{name}` | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return lines


def group_lines(runs: Sequence[dict[str, Any]], kind: str) -> list[str]:
    unit = "head" if kind == "vit" else "group"
    lines = [f"| module | per-{unit} corr(A, B) | per-{unit} std merged / parents | after post |", "|---|---|---|---|"]
    def mean_list(name: str, key: str, which: str) -> str:
        per = [r["groups"][which][name][key] for r in runs]
        return " ".join(f"{statistics.fmean(v):.2f}" for v in zip(*per, strict=True))

    for name in runs[0]["groups"]["act. align"]:
        lines.append(f"| `{name}` | {mean_list(name, 'corr_ab', 'act. align')} | "
                     f"{mean_list(name, 'std_ratio', 'act. align')} | {mean_list(name, 'std_ratio', '+ post')} |")  # fmt: skip
    return lines


def best(runs: Sequence[dict[str, Any]], single: bool = True) -> tuple[str, float, float]:
    """The merge row with the best mean joint accuracy: (label, mean joint %, mean ratio to the ensemble)."""
    labels = [label for label in runs[0]["scores"] if label not in ("model A", "model B", "ensemble")
              and (not single or "stop_at" not in label)]  # fmt: skip
    joint = {lb: statistics.fmean(100 * r["scores"][lb]["joint"] for r in runs) for lb in labels}
    label = max(joint, key=joint.__getitem__)
    ratio = statistics.fmean(r["scores"][label]["joint"] / r["scores"]["ensemble"]["joint"] for r in runs)
    return label, joint[label], ratio


def markdown(by_kind: dict[str, list[dict[str, Any]]], command: str, minutes: str) -> str:
    parts = [
        "# Normalisation-aware merging on the digits GroupNorm ResNet and ViT",
        "",
        "Model A is trained on digits 0-4, model B on digits 5-9 (as in [digits_merge.md](digits_merge.md)); "
        "joint is the 10-way accuracy on all test digits, ensemble the mean of both models' normalised "
        "embeddings. Post-passes: `norm_repair` and `unit_repair` of `fxmerge.passes.norm` "
        "([normalisation.md](../normalisation.md)). Produced by",
        "",
        f"    {command}",
        "",
        f"({minutes} on 1 thread, merging and statistics; with --cache the trained pairs are loaded from it. "
        "Test accuracy %, mean ± std over seeds "
        f"{' '.join(str(r['seed']) for r in next(iter(by_kind.values())))}.)",
        "",
    ]
    for kind, runs in by_kind.items():
        label, joint, ratio = best(runs)
        parts += [f"## {kind}, width {WIDTHS[kind]}", "", *accuracy_table(runs), "",
                  f"Best single merged model: **{label}**, joint {joint:.1f} % = **{ratio:.2f} x ensemble**.", ""]  # fmt: skip
        if kind == "vit":
            plabel, pjoint, pratio = best(runs, single=False)
            if plabel != label:
                size = runs[0]["sizes"][plabel]
                parts += [f"Best with partial zipping (the layers after the cut run once per parent): {plabel}, "
                          f"joint {pjoint:.1f} % = {pratio:.2f} x ensemble, with {size:.2f} x one model's "
                          "parameters.", ""]  # fmt: skip
            parts += ["Attention maps of the parents' heads (test images): the mean over images and query tokens "
                      "of 1 - the total variation distance between two heads' attention distributions.", "",
                      *head_lines(runs), ""]  # fmt: skip
        parts += [
            "Per-layer statistics of the activation-aligned merge against the aligned parents (test images, "
            "mean over seeds): corr(A, B) is the parents' per-channel correlation after alignment (how well "
            "units could be paired), corr(merged, parents) the merged model's mean correlation with the two "
            "parents, std merged / parents the median per-channel ratio of the merged model's std to the "
            "parents' mean std, mean shift / std the median per-channel distance of the merged model's mean from "
            "the parents' average mean, in units of the parents' std; 'after post' is the same merge with `post=['unit_repair', 'norm_repair']`.",
            "",
            *layer_table(runs),
            "",
            *group_lines(runs, kind),
            "",
            "merge seconds (1 thread): " + ", ".join(
                f"{lb} {statistics.fmean(r['merge_s'][lb] for r in runs):.1f}" for lb in runs[0]["merge_s"]),
            "",
        ]  # fmt: skip
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=list(MERGES), choices=list(MERGES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cache", type=Path, default=None, help="keep/reuse trained pairs here")
    p.add_argument("--out", type=Path, default=Path("docs"), help="writes results/digits_norm.{md,json}")
    p.add_argument("--from-json", nargs="+", type=Path, default=None,
                   help="only render the markdown from digits_norm.json files of earlier runs (e.g. one per kind)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    start = time.perf_counter()
    split = load_digits_split(seed=0)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    if args.from_json:
        parts, commands, minutes = [], [], 0.0
        for path in args.from_json:
            saved = json.loads(path.read_text())
            by_kind.update(saved["runs"])
            parts.append(f"{', '.join(saved['runs'])}: {saved['minutes']:.1f} min")
            commands.append(saved["command"])
            minutes += saved["minutes"]
        command, took = "\n    ".join(commands), ", ".join(parts)
        args.kinds = []
    for kind in args.kinds:
        by_kind[kind] = []
        for seed in args.seeds:
            by_kind[kind].append(run_seed(split, kind, seed, args.cache))
            joint = {k: round(100 * v["joint"], 1) for k, v in by_kind[kind][-1]["scores"].items()}
            print(kind, seed, joint, flush=True)
    if not args.from_json:
        command = "python examples/digits_norm_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
        command, minutes = command.strip(), (time.perf_counter() - start) / 60
        took = f"{minutes:.1f} min"
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_norm.md").write_text(markdown(by_kind, command, took))
    saved = {"command": command, "minutes": minutes, "runs": by_kind}
    (out / "digits_norm.json").write_text(json.dumps(saved, indent=1))
    print(f"wrote {out / 'digits_norm.md'} ({took})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
