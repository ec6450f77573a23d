"""Real-data task-vector merging: a byte-level causal LM pretrained on a mix of text found on this
machine, fine-tuned separately on three domains, then merged with TA, TIES, DARE and DPPA.

Domains (all read offline, in sorted order, so the data is reproducible on a given machine):
  python  - the Python standard library sources (``sysconfig.get_paths()['stdlib']``)
  english - English documentation: package METADATA long descriptions in site-packages and
            README/markdown files under /usr/share/doc
  c       - C headers under /usr/include

Each domain's bytes are split 90/5/5 into train/validation/test. The base (a 4-layer Llama-layout
model from ``transformers``) is pretrained on the mixed train splits; each fine-tune continues on one
domain. Merges read the fine-tunes from Hugging Face directories on disk. The merge scale ``lam`` (and
DPPA's band factors, for ``dppa+search``) is chosen on the validation split; the table reports test
loss (nats per byte). Runs on CPU in about 6-10 minutes (2 cores); the trained models are cached under --workdir.

    python examples/taskvector_merge.py [--workdir runs/taskvector] [--plot docs/img/taskvector_losses.png]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from fxmerge.taskvector import merge_task_vectors, search_dppa_factors

DOMAINS = ("python", "english", "c")
CTX, BATCH = 128, 8
MAX_BYTES = 1_500_000
LAMS = (0.2, 0.35, 0.5, 0.75, 1.0)


def _read(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
        return b""


def _metadata_text(path: Path) -> bytes:
    raw = _read(path).decode("utf-8", "ignore")
    body = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
    return body.encode()


def collect(domain: str) -> bytes:
    """Up to MAX_BYTES of one domain's text, files in sorted order."""
    if domain == "python":
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        reader = _read
    elif domain == "c":
        files = sorted(Path("/usr/include").rglob("*.h"))
        reader = _read
    else:
        site = Path(sysconfig.get_paths()["purelib"])
        files = sorted(site.glob("*.dist-info/METADATA")) + sorted(
            p for p in Path("/usr/share/doc").rglob("*") if p.is_file() and (p.suffix in (".md", ".txt") or "README" in p.name))
        reader = lambda p: _metadata_text(p) if p.name == "METADATA" else _read(p)  # noqa: E731
    out, total = [], 0
    for f in files:
        data = reader(f)
        if data:
            out.append(data)
            total += len(data)
        if total >= MAX_BYTES:
            break
    if total < 200_000:
        raise SystemExit(f"not enough {domain} text found on this machine ({total} bytes)")
    return b"\n".join(out)[:MAX_BYTES]


def splits(data: bytes) -> dict[str, torch.Tensor]:
    """90/5/5 train/validation/test byte tensors."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    a, b = int(0.9 * len(t)), int(0.95 * len(t))
    return {"train": t[:a], "val": t[a:b], "test": t[b:]}


def new_model(seed: int) -> LlamaForCausalLM:
    """A ~0.8M-parameter byte-level Llama, initialised from an explicit generator."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CTX,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    return model


def batch(data: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """BATCH random windows of CTX + 1 bytes."""
    starts = torch.randint(0, len(data) - CTX - 1, (BATCH,), generator=g)
    return torch.stack([data[s : s + CTX + 1] for s in starts.tolist()])


def train(model: LlamaForCausalLM, sources: list[torch.Tensor], steps: int, lr: float, seed: int) -> None:
    """AdamW with linear warm-up and cosine decay, batches drawn round-robin from ``sources``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    model.train()
    for step in range(steps):
        x = batch(sources[step % len(sources)], g)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x[:, :-1]).logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: torch.Tensor, windows: int = 32) -> float:
    """Mean next-byte loss (nats) over the first ``windows`` non-overlapping windows."""
    model.eval()
    n = min(windows, (len(data) - 1) // (CTX + 1))
    x = torch.stack([data[i * (CTX + 1) : (i + 1) * (CTX + 1)] for i in range(n)])
    logits = model(input_ids=x[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)))


def losses(model: LlamaForCausalLM, data: dict, split: str) -> dict[str, float]:
    """Per-domain loss and their mean."""
    windows = 128 if split == "test" else 32  # 16 KiB of test text per domain, 4 KiB for validation
    res = {d: evaluate(model, data[d][split], windows) for d in DOMAINS}
    res["mean"] = sum(res.values()) / len(DOMAINS)
    return res


def prepare(work: Path, data: dict, pre_steps: int, ft_steps: int) -> None:
    """Pretrain the base and fine-tune one model per domain (cached as HF directories)."""
    stamp = {"pre_steps": pre_steps, "ft_steps": ft_steps}
    if (work / "done.json").is_file() and json.loads((work / "done.json").read_text()) == stamp:
        return
    base_stamp = work / "base" / "pretrain.json"
    if not (base_stamp.is_file() and json.loads(base_stamp.read_text()) == {"pre_steps": pre_steps}):
        base = new_model(seed=0)
        train(base, [data[d]["train"] for d in DOMAINS], pre_steps, lr=3e-3, seed=1)
        base.save_pretrained(work / "base")
        base_stamp.write_text(json.dumps({"pre_steps": pre_steps}))
    for i, d in enumerate(DOMAINS):
        ft = LlamaForCausalLM.from_pretrained(work / "base")
        train(ft, [data[d]["train"]], ft_steps, lr=5e-4, seed=10 + i)
        ft.save_pretrained(work / f"ft_{d}")
    (work / "done.json").write_text(json.dumps(stamp))


def merged_losses(work: Path, model: LlamaForCausalLM, data: dict, method: str, density: float,
                  lams: tuple[float, ...] = LAMS, **kw) -> dict:
    """Pick lam on validation, return test losses of the best merge."""
    fts = [work / f"ft_{d}" for d in DOMAINS]
    best = None
    for lam in lams:
        sd = merge_task_vectors(work / "base", fts, method=method, density=density, lam=lam, seed=0, **kw)
        model.load_state_dict(sd)
        val = losses(model, data, "val")["mean"]
        if best is None or val < best[0]:
            best = (val, lam, losses(model, data, "test"))
    return {"lam": best[1], **best[2]}


def run(work: Path, data: dict) -> list[dict]:
    """All rows of the results table."""
    model = LlamaForCausalLM.from_pretrained(work / "base")
    rows = [{"method": "base", "density": 1.0, **losses(model, data, "test")}]
    for d in DOMAINS:
        ft = LlamaForCausalLM.from_pretrained(work / f"ft_{d}")
        rows.append({"method": f"finetune:{d}", "density": 1.0, **losses(ft, data, "test")})
    grid = [("task_arithmetic", [1.0]), ("ties", [0.2, 0.5, 0.9]), ("dare_linear", [0.1, 0.2, 0.5, 0.9]),
            ("dare_ties", [0.2, 0.9]), ("dppa", [0.1, 0.2, 0.5])]
    for method, densities in grid:
        for dens in densities:
            rows.append({"method": method, "density": dens, **merged_losses(work, model, data, method, dens)})
            print(f"  {method:16s} density {dens:.2f}: mean test loss {rows[-1]['mean']:.4f}", flush=True)
    fts = [work / f"ft_{d}" for d in DOMAINS]
    lam = next(r["lam"] for r in rows if r["method"] == "dppa" and r["density"] == 0.2)

    def score(factors: tuple[float, ...]) -> float:
        sd = merge_task_vectors(work / "base", fts, method="dppa", density=0.2, lam=lam, band_factors=factors)
        model.load_state_dict(sd)
        return -losses(model, data, "val")["mean"]  # validation split only

    found = search_dppa_factors(score, start=(1.8, 1.0), step=0.2, max_steps=5)
    row = merged_losses(work, model, data, "dppa", 0.2, lams=(lam,), band_factors=found.factors)
    rows.append({"method": f"dppa+search{found.factors}", "density": 0.2, **row})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of test losses."""
    head = "| method | density | lam | " + " | ".join(DOMAINS) + " | mean |\n|---|---|---|" + "---|" * (len(DOMAINS) + 1)
    lines = [head]
    for r in rows:
        lam = f"{r['lam']:.2f}" if "lam" in r else "-"
        vals = " | ".join(f"{r[d]:.4f}" for d in (*DOMAINS, "mean"))
        lines.append(f"| {r['method']} | {r['density']:.2f} | {lam} | {vals} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Mean test loss vs density per method, with base and fine-tune references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, marker in (("ties", "o"), ("dare_linear", "s"), ("dare_ties", "^"), ("dppa", "D")):
        pts = sorted((r["density"], r["mean"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker=marker, label=method)
    ref = {r["method"]: r["mean"] for r in rows}
    ax.axhline(ref["base"], color="gray", ls="--", label="base")
    ax.axhline(ref["task_arithmetic"], color="black", ls=":", label="task_arithmetic (dense)")
    own = sum(r[r["method"].split(":")[1]] for r in rows if r["method"].startswith("finetune:")) / len(DOMAINS)
    ax.axhline(own, color="green", ls="-.", label="each fine-tune on its own domain")
    for r in rows:
        if r["method"].startswith("dppa+search"):
            ax.plot([r["density"]], [r["mean"]], "*", ms=14, color="red", label="dppa + factor search")
    ax.set_xlabel("density (fraction of each delta kept)")
    ax.set_ylabel("mean test loss over 3 domains (nats/byte)")
    ax.set_title("Merging 3 domain fine-tunes of a byte-level LM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/taskvector")
    ap.add_argument("--pre-steps", type=int, default=1500)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--plot", default="docs/img/taskvector_losses.png")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument("--from-json", default=None, help="only print the table and plot from saved rows")
    args = ap.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        print(table(rows))
        plot(rows, Path(args.plot))
        return
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = {d: splits(collect(d)) for d in DOMAINS}
    print("bytes per domain:", {d: sum(len(v) for v in s.values()) for d, s in data.items()}, flush=True)
    prepare(work, data, args.pre_steps, args.ft_steps)
    print(f"models ready after {time.perf_counter() - t0:.0f}s", flush=True)
    rows = run(work, data)
    print(table(rows))
    plot(rows, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"total {time.perf_counter() - t0:.0f}s; plot -> {args.plot}")


if __name__ == "__main__":
    main()
