"""Depth-alignment DPs against brute-force enumeration, stage offsets, and input errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fxmerge.errors import MergeError
from fxmerge.hetero.depth import Segmentation, align_stages, lma, placement, sma, uniform


def brute_sma(c: np.ndarray) -> tuple[list[int], float]:
    """First (lexicographically smallest) strictly increasing map with the maximal Σ C[a_k, k]."""
    m, n = c.shape
    best, arg = -np.inf, None
    for a in itertools.combinations(range(m), n):  # lexicographic order
        score = sum(c[j, k] for k, j in enumerate(a))
        if score > best:
            best, arg = score, list(a)
    return arg, best


def brute_lma(c: np.ndarray) -> tuple[list[tuple[int, int]], float]:
    """First (lexicographically smallest starts) composition of m into n parts with maximal score."""
    m, n = c.shape
    best, arg = -np.inf, None
    for inner in itertools.combinations(range(1, m), n - 1):
        starts = [0, *inner]
        segs = [(s, e - 1) for s, e in zip(starts, [*inner, m], strict=True)]
        score = sum(c[s : e + 1, k].sum() for k, (s, e) in enumerate(segs))
        if score > best:
            best, arg = score, segs
    return arg, best


def lma_score(c: np.ndarray, segs: list[tuple[int, int]]) -> float:
    return float(sum(c[s : e + 1, k].sum() for k, (s, e) in enumerate(segs)))


def shapes() -> list[tuple[int, int]]:
    return [(m, n) for m in range(1, 9) for n in range(1, m + 1)]


@pytest.mark.parametrize("seed", range(6))
def test_sma_equals_brute_force_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for m, n in shapes():
        c = rng.uniform(-1.0, 1.0, size=(m, n))
        got = sma(c)
        ref, ref_score = brute_sma(c)
        assert got == ref, (m, n)
        assert sum(c[j, k] for k, j in enumerate(got)) == pytest.approx(ref_score, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_lma_equals_brute_force_random(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for m, n in shapes():
        c = rng.uniform(-1.0, 1.0, size=(m, n))
        got = lma(c)
        ref, ref_score = brute_lma(c)
        assert got == ref, (m, n)
        assert lma_score(c, got) == pytest.approx(ref_score, abs=1e-12)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ties_broken_like_lexicographic_brute_force(levels: int) -> None:
    """Integer matrices make ties frequent and exact; the DPs must pick the first optimum."""
    rng = np.random.default_rng(7 + levels)
    tied_cases = 0
    for _ in range(4):
        for m, n in shapes():
            c = rng.integers(0, levels + 1, size=(m, n)).astype(float)
            assert sma(c) == brute_sma(c)[0], c
            assert lma(c) == brute_lma(c)[0], c
            scores = [sum(c[j, k] for k, j in enumerate(a)) for a in itertools.combinations(range(m), n)]
            tied_cases += scores.count(max(scores)) > 1
    assert tied_cases > 50  # the tie-breaking rule was actually exercised


def test_all_equal_scores_pick_earliest() -> None:
    c = np.zeros((6, 3))
    assert sma(c) == [0, 1, 2]
    assert lma(c) == [(0, 0), (1, 1), (2, 5)]


def test_hand_computed_example() -> None:
    # Deep blocks 0..4, shallow 0..1.
    c = np.array([[0.9, 0.1],
                  [0.8, 0.2],
                  [0.1, 0.3],
                  [0.2, 0.9],
                  [0.3, 0.7]])
    # SMA: best a_0 < a_1 is (0, 3): 0.9 + 0.9 = 1.8 (next best (1, 3) = 1.7).
    assert sma(c) == [0, 3]
    # LMA: split after deep 0..e: e=0 → 0.9 + 2.1 = 3.0; e=1 → 1.7 + 1.9 = 3.6; e=2 → 1.8 + 1.6 = 3.4;
    # e=3 → 2.0 + 0.7 = 2.7. Best: segments (0, 1), (2, 4).
    assert lma(c) == [(0, 1), (2, 4)]
    assert lma_score(c, lma(c)) == pytest.approx(3.6, abs=1e-12)


def test_square_and_single_column() -> None:
    rng = np.random.default_rng(11)
    c = rng.random((4, 4))
    assert sma(c) == [0, 1, 2, 3]
    assert lma(c) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    col = np.array([[0.2], [0.9], [0.4]])
    assert sma(col) == [1]
    assert lma(col) == [(0, 2)]
    assert sma(np.zeros((3, 0))) == []


def test_uniform_segments() -> None:
    assert uniform(8, 3) == [(0, 2), (3, 5), (6, 7)]
    assert uniform(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert uniform(7, 1) == [(0, 6)]
    assert uniform(0, 0) == []
    for m, n in shapes():
        segs = uniform(m, n)
        sizes = [e - s + 1 for s, e in segs]
        assert segs[0][0] == 0 and segs[-1][1] == m - 1
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(segs))
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(MergeError, match="3 deep blocks into 4"):
        uniform(3, 4)


def test_placement() -> None:
    assert placement((3, 7)) == 3
    assert placement((3, 7), "end") == 7
    with pytest.raises(MergeError, match="'start' or 'end'"):
        placement((3, 7), "middle")  # type: ignore[arg-type]
    with pytest.raises(MergeError, match="Empty segment"):
        placement((5, 4))


def _planted_two_stage() -> np.ndarray:
    """Stage 1: 5 deep x 3 shallow; stage 2: 4 deep x 2 shallow. Off-stage entries are large decoys."""
    c = np.full((9, 5), 5.0)
    c[:5, :3] = [[1.0, 0.0, 0.0],
                 [0.0, 0.1, 0.0],
                 [0.0, 0.9, 0.0],
                 [0.0, 0.8, 0.1],
                 [0.0, 0.0, 1.0]]
    c[5:, 3:] = [[1.0, 0.0],
                 [0.0, 0.2],
                 [0.0, 0.1],
                 [0.0, 0.9]]
    return c


def test_align_stages_uses_each_stage_submatrix() -> None:
    c = _planted_two_stage()
    seg = align_stages(c, [5, 4], [3, 2], method="lma")
    # Stage 1 (after pinning 0→0): rows 1..4 vs cols 1..2 → LMA (1, 3), (4, 4); stage 2: rows 6..8 vs col 4.
    assert seg.segments == ((0, 0), (1, 3), (4, 4), (5, 5), (6, 8))
    assert seg.score == pytest.approx(1.0 + 1.8 + 1.0 + 1.0 + 1.2, abs=1e-12)
    assert seg.slots("start") == [0, 1, 4, 5, 6]
    assert seg.slots("end") == [0, 3, 4, 5, 8]
    sma_seg = align_stages(c, [5, 4], [3, 2], method="sma")
    assert sma_seg.segments == ((0, 0), (1, 2), (3, 4), (5, 5), (6, 8))
    assert sma_seg.score == pytest.approx(1.0 + 0.9 + 1.0 + 1.0 + 0.9, abs=1e-12)
    # The released code's bug (every stage reusing stage 1's submatrix) would give a different stage 2.
    buggy_stage2 = [5 + 1 + a for a in sma(c[1:4, 1:2])]
    assert buggy_stage2 != [sma_seg.segments[-1][1]]


@pytest.mark.parametrize("method", ["lma", "sma", "uniform"])
@pytest.mark.parametrize("pin_first", [True, False])
def test_align_stages_matches_per_stage_brute_force(method: str, pin_first: bool) -> None:
    rng = np.random.default_rng(21)
    stages_a, stages_b = [4, 6, 3], [2, 4, 3]
    for _ in range(10):
        c = rng.random((13, 9))
        seg = align_stages(c, stages_a, stages_b, method=method, pin_first=pin_first)
        expected, score, r0, c0 = [], 0.0, 0, 0
        for ma, nb in zip(stages_a, stages_b, strict=True):
            skip = int(pin_first)
            if pin_first:
                expected.append((r0, r0))
                score += c[r0, c0]
            sub = c[r0 + skip : r0 + ma, c0 + skip : c0 + nb]
            if sub.shape[1]:
                if method == "sma":
                    ends, s_sub = brute_sma(sub)
                    local = [(p + 1, e) for p, e in zip([-1, *ends[:-1]], ends, strict=True)]
                else:
                    local = brute_lma(sub)[0] if method == "lma" else uniform(*sub.shape)
                    s_sub = lma_score(sub, local)
                expected += [(r0 + skip + s, r0 + skip + e) for s, e in local]
                score += s_sub
            r0, c0 = r0 + ma, c0 + nb
        assert list(seg.segments) == expected
        assert seg.score == pytest.approx(score, abs=1e-12)
        assert seg.n_deep == 13 and seg.method == method


def test_align_stages_single_block_stage_and_tensor_input() -> None:
    c = torch.tensor([[0.5, 0.1], [0.3, 0.2], [0.1, 0.9], [0.2, 0.3]], dtype=torch.float32)
    before = c.clone()
    seg = align_stages(c, [2, 2], [1, 1], method="lma")
    assert seg.segments == ((0, 0), (2, 2))  # deep 1 and 3 are trailing identities
    assert seg.score == pytest.approx(0.5 + 0.9, abs=1e-6)
    assert torch.equal(c, before)
    assert isinstance(seg, Segmentation)


def test_align_stages_errors() -> None:
    c = np.random.default_rng(0).random((8, 6))
    with pytest.raises(MergeError, match=r"Stage counts differ.*2 stages.*3 stages"):
        align_stages(c, [4, 4], [2, 2, 2])
    with pytest.raises(MergeError, match="Stage 1: the shallow model has 5 blocks but the deep model only 4"):
        align_stages(np.zeros((8, 7)), [4, 4], [2, 5])
    with pytest.raises(MergeError, match=r"shape \(8, 6\).*need \(8, 5\)"):
        align_stages(c, [4, 4], [2, 3])
    with pytest.raises(MergeError, match="Unknown alignment method 'dtw'"):
        align_stages(c, [4, 4], [3, 3], method="dtw")  # type: ignore[arg-type]
    with pytest.raises(MergeError, match="at least one block"):
        align_stages(c, [8, 0], [6, 0])
    nan = c.copy()
    nan[2, 3] = np.nan
    with pytest.raises(MergeError, match="NaN"):
        align_stages(nan, [4, 4], [3, 3])


def test_dp_input_errors() -> None:
    with pytest.raises(MergeError, match="3 deep rows but 4 shallow columns"):
        sma(np.zeros((3, 4)))
    with pytest.raises(MergeError, match="3 deep rows but 4 shallow columns"):
        lma(np.zeros((3, 4)))
    with pytest.raises(MergeError, match="must be 2-D"):
        lma(np.zeros(5))
    with pytest.raises(MergeError, match="0 segments"):
        lma(np.zeros((3, 0)))
