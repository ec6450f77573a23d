"""Two gloo processes on loopback, each with half of the data, give the single-process statistics."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxmerge.errors import MergeError
from fxmerge.stats import CorrelationAccumulator

DIMS = [24, 40]


def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(600, 6, generator=g)
    return [shared @ torch.randn(6, d, generator=g) + torch.randn(600, d, generator=g) + 5.0 for d in DIMS]


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats = data()
        # uneven halves and different batch sizes, so the two shifts and counts differ
        lo, hi = (0, 250) if rank == 0 else (250, 600)
        acc = CorrelationAccumulator(DIMS)
        for i in range(lo, hi, 64 + 7 * rank):
            acc.update([f[i : min(hi, i + 64 + 7 * rank)] for f in feats])
        acc.all_reduce()
        try:
            acc.update([f[:5] for f in feats])
            refused = False
        except MergeError:
            refused = True
        torch.save(
            {
                "corr": acc.correlation(),
                "mean": acc.mean(),
                "cov": acc.covariance(),
                "count": acc.count,
                "refused": refused,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process(tmp_path) -> None:
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = CorrelationAccumulator(DIMS)
    single.update(data())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == 600 and got["refused"]
        torch.testing.assert_close(got["mean"], single.mean(), rtol=0, atol=1e-12)
        torch.testing.assert_close(got["cov"], single.covariance(), rtol=0, atol=1e-11)
        torch.testing.assert_close(got["corr"], single.correlation(), rtol=0, atol=1e-12)
