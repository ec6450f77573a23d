"""Speed of the merge-pass kernels, as ratios against references measured in the same run.

1. Greedy zip (fxmerge.match.zip_match) at 2×C units against
   * the naive arg-max loop (zip_match_reference's loop; the merge sequences are asserted equal), and
   * scipy's linear_sum_assignment on the C×C cross block (what alignment costs).
   Target: zip ≤ 1.5× the Hungarian time at 2×2048.
2. CorrelationAccumulator.update (float64 accumulation of float32 features, as used on activations)
   against a bare ``torch.matmul(X, X.T)`` of the same [D, n] data in the same dtype.
   Target: update throughput ≥ 1.5× the bare matmul's. With ``--device cuda`` the statistics part is
   also run on the GPU and the GPU/CPU speed ratio is printed.

The similarity for zipping is the exact correlation of a factor model: model A's units are random
mixtures of ``C // 8`` shared factors plus unit noise, model B's are a permuted, perturbed copy (so
matched units correlate ≈ 0.5, as between independently trained networks). ``--matrix uniform``
uses a symmetric matrix of i.i.d. uniform entries (a harder case for the Hungarian); by default both
are run (the naive loop on the factor matrix only).

    python benchmarks/bench_match.py                      # full run, naive loop included at 2048
    python benchmarks/bench_match.py --skip-naive-above 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fxmerge.match import zip_match
from fxmerge.match.greedy import GreedyOwners, greedy_merges
from fxmerge.match.zip import plan_zip
from fxmerge.match.zip_reference import reference_merges
from fxmerge.stats import CorrelationAccumulator

ZIP_TARGET = 1.5  # zip time / Hungarian time at 2×2048, at most
STATS_TARGET = 1.5  # update throughput / bare matmul throughput, at least


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def factor_sim(c: int, seed: int) -> torch.Tensor:
    """Exact correlation [2c, 2c] (float32) of a two-model factor model with a hidden permutation."""
    g = torch.Generator().manual_seed(seed)
    k = max(8, c // 8)
    wa = torch.randn(k, c, generator=g, dtype=torch.float64)
    wb = wa[:, torch.randperm(c, generator=g)] + torch.randn(k, c, generator=g, dtype=torch.float64)
    w = torch.cat([wa, wb], dim=1)
    cov = w.T @ w
    cov.diagonal().add_(0.5 * k)
    d = cov.diagonal().sqrt()
    corr = cov / d[:, None] / d[None, :]
    return ((corr + corr.T) / 2).float()


def uniform_sim(c: int, seed: int) -> torch.Tensor:
    """Symmetric [2c, 2c] matrix of uniform(-1, 1) entries (float32)."""
    a = torch.rand(2 * c, 2 * c, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.triu(a) + torch.triu(a, 1).T


def bench_zip(c: int, matrix: str, repeats: int, naive: bool, seed: int) -> dict[str, float]:
    sim = factor_sim(c, seed) if matrix == "factor" else uniform_sim(c, seed)
    cross = sim[:c, c:].double().numpy()
    out = {
        "zip": best_time(lambda: zip_match(sim, [c, c]), repeats),
        "lsa": best_time(lambda: linear_sum_assignment(cross, maximize=True), repeats),
    }
    plan = plan_zip(sim, [c, c], 0.5, 0.5, 1.0, None)
    fast_pairs, fast_picks = greedy_merges(
        plan.sim.copy(), plan.n_merges, plan.alpha, [GreedyOwners(plan.owner, plan.budgets.copy())]
    )
    if naive:
        start = time.perf_counter()
        pairs, picks = reference_merges(plan)
        out["naive"] = time.perf_counter() - start
        if [tuple(p) for p in fast_pairs.tolist()] != pairs or fast_picks.tolist() != picks:
            raise SystemExit(f"merge sequences differ at 2x{c}: the fast kernel is wrong")
    return out


def stats_feats(d: int, n: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g).to(device) for _ in range(2)]


def bench_stats(
    d: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int, seed: int
) -> dict[str, float]:
    feats = stats_feats(d, n, device, seed)
    x = torch.cat(feats, dim=1).T.contiguous().to(dtype)
    acc = CorrelationAccumulator([d, d], dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return {
        "update": best_time(lambda: acc.update(feats), repeats, sync),
        "matmul": best_time(lambda: torch.matmul(x, x.T), repeats, sync),
    }


def zip_section(args: argparse.Namespace, matrix: str, with_naive: bool) -> None:
    print(f"== greedy zip, 2 models x C units ({matrix} similarity, float32) ==")
    print(
        f"{'C':>6} {'fast s':>9} {'naive s':>9} {'naive/fast':>11} {'LSA s':>8} {'zip/LSA':>8}  target zip/LSA"
    )
    for c in args.sizes:
        naive = with_naive and (args.skip_naive_above is None or c <= args.skip_naive_above)
        r = bench_zip(c, matrix, args.repeats, naive, args.seed)
        naive_s = f"{r['naive']:9.2f}" if naive else f"{'skipped':>9}"
        speedup = f"{r['naive'] / r['zip']:10.0f}x" if naive else f"{'-':>11}"
        target = f"<= {ZIP_TARGET} (2x2048)" if c == 2048 else ""
        print(
            f"{c:6d} {r['zip']:9.3f} {naive_s} {speedup} {r['lsa']:8.3f} {r['zip'] / r['lsa']:7.2f}x  {target}"
        )
        if naive:
            print(f"{'':6} merge sequence of the fast kernel == naive loop: yes")


def stats_section(args: argparse.Namespace) -> None:
    cpu = torch.device("cpu")
    print(f"== CorrelationAccumulator.update vs bare matmul, 2 models x d units, n={args.samples} samples ==")
    print(
        f"{'d':>6} {'dtype':>8} {'device':>6} {'update s':>9} {'matmul s':>9} {'ratio':>7}  target ratio >= {STATS_TARGET}"
    )
    cpu_times: dict[tuple[int, torch.dtype], float] = {}
    for d in args.stats_dims:
        for dtype in (torch.float64, torch.float32):
            r = bench_stats(d, args.samples, dtype, cpu, args.repeats, args.seed)
            cpu_times[d, dtype] = r["update"]
            name = str(dtype).removeprefix("torch.")
            print(
                f"{d:6d} {name:>8} {'cpu':>6} {r['update']:9.4f} {r['matmul']:9.4f} {r['matmul'] / r['update']:6.2f}x"
            )
    if args.device == "cuda":
        gpu = torch.device("cuda")
        print(f"\n{'d':>6} {'dtype':>8} {'update s':>9} {'matmul s':>9} {'ratio':>7} {'GPU/CPU speed':>14}")
        for d in args.stats_dims:
            for dtype in (torch.float64, torch.float32):
                r = bench_stats(d, args.samples, dtype, gpu, args.repeats, args.seed)
                name = str(dtype).removeprefix("torch.")
                speed = cpu_times[d, dtype] / r["update"]
                print(
                    f"{d:6d} {name:>8} {r['update']:9.5f} {r['matmul']:9.5f} {r['matmul'] / r['update']:6.2f}x {speed:13.1f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="units per model for zip"
    )
    parser.add_argument(
        "--skip-naive-above", type=int, default=None, metavar="N", help="skip the naive loop for C > N"
    )
    parser.add_argument(
        "--matrix",
        choices=["factor", "uniform", "both"],
        default="both",
        help="zip similarity; with 'both' the naive loop runs on the factor matrix only",
    )
    parser.add_argument(
        "--stats-dims", type=int, nargs="+", default=[512, 1024, 2048], help="units per model"
    )
    parser.add_argument("--samples", type=int, default=4096, help="samples per update batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: also run the stats part on GPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, numpy {np.__version__}")
    matrices = ["factor", "uniform"] if args.matrix == "both" else [args.matrix]
    for k, matrix in enumerate(matrices):
        zip_section(args, matrix, with_naive=k == 0)
        print()
    stats_section(args)


if __name__ == "__main__":
    main()
