"""``benchmarks/bench_merge.py --quick``: the core on a tiny residual CNN, each merge in its own process.

fxmerge must recover A from its permuted copy (recovery error <= 1e-5) and the tables must carry their
columns; the peer (the ``rebasin`` package, ``pip install -e '.[bench]'``) runs only where it is installed,
and only its row is checked (it need not recover A).
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.scripts import load_benchmark

bench = load_benchmark('bench_merge')
HAS_PEER = importlib.util.find_spec("rebasin") is not None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _header(text: str, first: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith("|") and _cells(line)[0] == "model" and first in _cells(line):
            return _cells(line)
    raise AssertionError(f"no table with a {first!r} column in:\n{text}")


@pytest.fixture(scope="module")
def run():
    tools = ["fxmerge", "rebasin"] if HAS_PEER else ["fxmerge"]
    records, throughput = bench.bench(
        ["tiny_cnn"], ["average", "rebasin"], tools, threads=1, quick=True, timeout=300, log=lambda m: None
    )
    return records, throughput


def test_fxmerge_recovers_a(run):
    records, throughput = run
    assert throughput > 0
    rec = next(r for r in records if r["task"]["tool"] == "fxmerge" and r["task"]["method"] == "rebasin")
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["recovery"] <= 1e-5
    assert rec["b_vs_a"] <= 1e-5  # the permuted copy computes A's function
    assert rec["time_s"] > 0 and rec["peak_above_bytes"] >= 0
    assert rec["bound_madds"] > 0 and rec["sweeps"] is not None
    avg = next(r for r in records if r["task"]["tool"] == "fxmerge" and r["task"]["method"] == "average")
    assert avg["status"] == "ok", avg.get("reason")
    assert avg["recovery"] > 1e-3  # plain averaging of a permuted copy does not recover A


def test_tables_have_the_columns(run, tmp_path):
    records, throughput = run
    out = tmp_path / "bench_merge.md"
    bench.write_report(out, records, throughput, "python benchmarks/bench_merge.py --quick", 1)
    text = out.read_text()
    assert _header(text, "method") == bench.METHOD_COLUMNS
    for column in ("time s", "peak MB", "err", "% of bound", "status"):
        assert column in bench.METHOD_COLUMNS
    assert "G multiply-adds/s" in text and "torch " in text
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| tiny_cnn |")]
    assert any(
        row[2] == "rebasin" and row[-1] == "ok" for row in rows if len(row) == len(bench.METHOD_COLUMNS)
    )
    if HAS_PEER:
        assert _header(text, "peer / fxmerge") == bench.PEER_COLUMNS


@pytest.mark.skipif(not HAS_PEER, reason="the rebasin package (extra 'bench') is not installed")
def test_peer_row(run):
    records, _ = run
    rec = next(r for r in records if r["task"]["tool"] == "rebasin")
    assert rec["task"]["method"] == "rebasin"
    assert rec["status"] in ("ok", "error"), rec  # it ran to an answer in its own process
    if rec["status"] == "ok":
        assert rec["time_s"] > 0 and rec["recovery"] >= 0 and "aligned_vs_b" in rec


def test_failed_run_is_a_row():
    task = bench.Task(model="tiny_cnn", quick=True)
    rec = bench.run_isolated(task, timeout=300, mem_limit_gb=0.05)  # below the interpreter itself
    assert rec["status"] == "killed" and "resident memory" in rec["reason"]
    line = "\n".join(bench.method_table([rec], 1e9))
    assert "killed" in line
