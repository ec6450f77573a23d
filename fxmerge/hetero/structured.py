"""Elastic zip of structured spaces: blocks of units (attention heads x head dims, GroupNorm groups x channels).

A structured space ``outer x (inner_1, ..., inner_G)`` holds G blocks of units. Its merged units must stay in
blocks (a merged head attends with its own dims, a merged GroupNorm group normalises its own channels), so the
blocks are matched first and the units inside every set of matched blocks second:

* equal block counts: model m's blocks are paired one to one with model 0's (Hungarian assignment on the block
  scores), as the same-architecture merge pairs heads;
* different block counts (e.g. 4 vs 8 heads): all Σ n_m blocks are zipped to the target count K
  (:func:`~fxmerge.match.zip_match`, elastic, on the block scores), so a merged block may hold several blocks of
  one model (a model's duplicated heads zip together).

The units of the blocks of each merged block are then zipped elastically to the inner target k; merged block g
holds units [g·k, (g+1)·k). A block score is the mean similarity of the unit-level Hungarian matching between two
blocks, summed over the spaces of one outer group (q/k and v of the same heads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fxmerge.errors import MergeError
from fxmerge.ir.layout import G, Layout, Prod
from fxmerge.match import zip_match

__all__ = ["block_scores", "structured_target", "zip_blocks", "zip_structured"]


def structured_target(key: Layout, sizes: Sequence[Layout], targets: Mapping[int, int]) -> int | None:
    """Target size of a structured space ``outer x (inner_1, ..., inner_G)`` (attention heads, GroupNorm groups):
    the reference model's block count (``key`` is the reference's key: the model the merge is rebuilt from, which
    has the target count) times the common target of its inner groups. ``sizes`` are the models' keys of the space;
    their block counts may differ. None if the space is not of that form, its inner targets differ, or the target
    block count is not the reference's."""
    if not (isinstance(key, Prod) and isinstance(key.outer, G) and all(isinstance(i, G) for i in key.inners)):
        return None
    if any(not isinstance(k, Prod) or not isinstance(k.outer, G) for k in sizes):
        return None
    inner = {int(targets.get(i.gid, i.size)) for i in key.inners}
    if len(inner) != 1 or int(targets.get(key.outer.gid, key.outer.size)) != key.outer.size:
        return None
    return key.outer.size * inner.pop()


def _block_score(tile: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(tile, maximize=True)
    return float(tile[rows, cols].mean())


def block_scores(
    sims: Sequence[np.ndarray], pers: Sequence[Sequence[int]], offsets: Sequence[Sequence[int]], counts: Sequence[int]
) -> np.ndarray:
    """Score of every pair of blocks of all models, [B, B] with B = Σ counts, blocks stacked model by model.

    Args:
        sims: per space, the similarity over the stacked units of the models (float64 arrays).
        pers: per space, every model's units per block.
        offsets: per space, every model's first stacked unit.
        counts: every model's block count.
    """
    starts = [(m, b) for m, c in enumerate(counts) for b in range(c)]
    scores = np.zeros((len(starts), len(starts)))
    for a, per, offs in zip(sims, pers, offsets, strict=True):
        for i, (m, g) in enumerate(starts):
            r0 = offs[m] + g * per[m]
            for j in range(i, len(starts)):
                mj, h = starts[j]
                r1 = offs[mj] + h * per[mj]
                s = _block_score(a[r0 : r0 + per[m], r1 : r1 + per[mj]])
                scores[i, j] += s
                if j != i:
                    scores[j, i] += s
    return scores


def zip_blocks(scores: np.ndarray, counts: Sequence[int], target: int, *, alpha: float, beta: float) -> list[np.ndarray]:
    """Zip the Σ counts blocks of all models to ``target`` merged blocks on their ``scores`` (elastic ZipIt:
    within-model merges up to the β budgets, a merged cluster's scores decay by α). Returns, per model, the merged
    block of each of its blocks."""
    mt = zip_match(torch.as_tensor(scores), list(counts), r=0.5, alpha=alpha, beta=beta, target=target)
    return [mt.assignment(m).cpu().numpy() for m in range(len(counts))]


def _pair_blocks(sims: Sequence[np.ndarray], pers: list[list[int]], offsets: list[np.ndarray], n_blocks: int
                 ) -> list[np.ndarray]:  # fmt: skip
    """Equal block counts: model m's blocks paired with model 0's by a Hungarian assignment on the block scores.
    Returns, per model, the merged block (model 0's block) of each of its blocks."""
    n = len(pers[0])
    out = [np.arange(n_blocks)]
    for m in range(1, n):
        scores = np.zeros((n_blocks, n_blocks))
        for a, per, offs in zip(sims, pers, offsets, strict=True):
            for g in range(n_blocks):
                for h in range(n_blocks):
                    r0, r1 = offs[0] + g * per[0], offs[m] + h * per[m]
                    scores[g, h] += _block_score(a[r0 : r0 + per[0], r1 : r1 + per[m]])
        pairing = linear_sum_assignment(scores, maximize=True)[1]  # merged block g <- model m's block pairing[g]
        out.append(np.argsort(pairing))
    return out


def _units(block_of: np.ndarray, g: int, offset: int, per: int) -> np.ndarray:
    """Stacked indices of the units of one model's blocks that merge into block ``g``."""
    blocks = np.flatnonzero(block_of == g)
    return (offset + blocks[:, None] * per + np.arange(per)[None, :]).reshape(-1).astype(np.int64)


def _zip_units(sim: torch.Tensor, per: list[int], offs: np.ndarray, block_of: list[np.ndarray], n_merged: int,
               k: int, *, alpha: float, beta: float) -> tuple[np.ndarray, list[float]]:  # fmt: skip
    """Merged unit of every stacked unit of one space: the units of each merged block's member blocks zipped to
    ``k`` (fewer when the members hold fewer units: the rest of the merged block stays empty)."""
    cols = np.full(int(offs[-1]), -1, dtype=np.int64)
    picks = []
    for g in range(n_merged):
        idx = [_units(block_of[m], g, int(offs[m]), per[m]) for m in range(len(per))]
        present = [m for m in range(len(per)) if idx[m].size]
        flat = torch.as_tensor(np.concatenate([idx[m] for m in present]))
        sizes = [int(idx[m].size) for m in present]
        mt = zip_match(sim[flat][:, flat], sizes, r=0.5, alpha=alpha, beta=beta, target=min(k, sum(sizes)))
        for i, m in enumerate(present):
            cols[idx[m]] = g * k + mt.assignment(i).cpu().numpy()
        picks.append(mt.value)
    return cols, picks


def zip_structured(
    sims: Sequence[torch.Tensor],
    sizes: Sequence[Sequence[int]],
    n_blocks: int | Sequence[int],
    targets: Sequence[int],
    *,
    alpha: float,
    beta: float,
    target_blocks: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Elastic zip of the structured spaces of one outer group (attention heads, GroupNorm groups).

    Model m has ``n_blocks[m]`` blocks in each space, of ``sizes[s][m] // n_blocks[m]`` units (head dimension,
    channels per group). With equal counts and target, model m's blocks are paired with model 0's by a Hungarian
    assignment on the block scores summed over the spaces (score of a block pair: the mean similarity of the
    unit-level Hungarian matching between them); otherwise all blocks are zipped to ``target_blocks`` on those
    scores (:func:`zip_blocks`). Then the units of each merged block's members are zipped
    (:func:`~fxmerge.match.zip_match`, elastic) to ``targets[s] // target_blocks`` units; merged block g is units
    [g·k, (g+1)·k), so a merged group / head only holds units of the blocks merged into it.

    Args:
        sims: per space, the similarity over the stacked units of the models.
        sizes: per space, every model's unit count.
        n_blocks: every model's number of blocks (groups / heads), or one count for all models.
        targets: per space, the merged unit count (a multiple of ``target_blocks``).
        alpha, beta: the zip settings (of units and of blocks).
        target_blocks: the merged block count (default: model 0's).

    Returns:
        (per model, the merged block of each of its blocks; per space, the merged unit of every stacked unit;
        mean greedy pick over the merged blocks).
    """
    n = len(sizes[0])
    counts = [int(n_blocks)] * n if isinstance(n_blocks, (int, np.integer)) else [int(c) for c in n_blocks]
    k_blocks = counts[0] if target_blocks is None else int(target_blocks)
    for sz, t in zip(sizes, targets, strict=True):
        if len(sz) != n or len(counts) != n or t % k_blocks or any(c % b for c, b in zip(sz, counts, strict=True)):
            raise MergeError(f"structured space of {counts} blocks (target {k_blocks}): sizes {list(sz)} and target "
                             f"{t} must be multiples of the block counts.")  # fmt: skip
    if not 1 <= k_blocks <= sum(counts):
        raise MergeError(f"the target block count {k_blocks} must lie in [1, {sum(counts)}] (blocks {counts}).")
    pers = [[c // b for c, b in zip(sz, counts, strict=True)] for sz in sizes]
    offsets = [np.cumsum([0, *sz]) for sz in sizes]
    arrays = [sim.detach().double().cpu().numpy() for sim in sims]
    if len(set(counts)) == 1 and k_blocks == counts[0]:
        block_of = _pair_blocks(arrays, pers, offsets, k_blocks)
    else:
        block_of = zip_blocks(block_scores(arrays, pers, offsets, counts), counts, k_blocks, alpha=alpha, beta=beta)
    columns, picks = [], []
    for sim, per, offs, t in zip(sims, pers, offsets, targets, strict=True):
        cols, p = _zip_units(sim, per, offs, block_of, k_blocks, t // k_blocks, alpha=alpha, beta=beta)
        columns.append(cols)
        picks += p
    return block_of, columns, float(np.mean(picks)) if picks else 0.0
