"""Depth alignment wiring: block-output CKA over data, then a per-stage segmentation of the deeper model.

One data pass runs both models' captured graphs and keeps only the block outputs; their minibatch
unbiased linear CKA (:class:`~fxmerge.hetero.cka.MinibatchCKA`) gives a deep x shallow matrix, and
:func:`~fxmerge.hetero.depth.align_stages` segments every stage with the first block pinned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fxmerge.capture.trace import eval_mode
from fxmerge.errors import MergeError
from fxmerge.hetero.blocks import BlockStructure
from fxmerge.hetero.cka import MIN_BATCH, MinibatchCKA
from fxmerge.hetero.depth import Method, Segmentation, align_stages
from fxmerge.hetero.graph import run_graph
from fxmerge.stats.batches import iter_inputs

__all__ = ["align_depth", "block_cka", "check_alignable"]


def block_cka(
    deep: BlockStructure,
    shallow: BlockStructure,
    data: Any,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Minibatch linear CKA between every block output of ``deep`` (rows) and ``shallow`` (columns).

    Both structures' captured graphs run in eval mode on the same batches. Batches with fewer than
    4 samples are skipped (the unbiased estimator needs n >= 4).

    Raises:
        MergeError: if no usable batch was seen, or a block output is constant over the data.
    """
    acc = MinibatchCKA(len(deep.blocks), len(shallow.blocks))
    keep_a, keep_b = deep.outputs, shallow.outputs
    used = 0
    with eval_mode(deep.graph.gm), eval_mode(shallow.graph.gm):
        for i, (args, kwargs) in enumerate(tqdm(iter_inputs(data), desc="block CKA", disable=not progress,
                                                leave=False)):  # fmt: skip
            if max_batches is not None and i >= max_batches:
                break
            va = run_graph(deep.graph, args, kwargs, keep_a)
            vb = run_graph(shallow.graph, args, kwargs, keep_b)
            feats_a, feats_b = [_as_tensor(va, k) for k in keep_a], [_as_tensor(vb, k) for k in keep_b]
            if feats_a[0].shape[0] < MIN_BATCH:
                continue
            acc.update(feats_a, feats_b)
            used += 1
    if used == 0:
        raise MergeError(f"depth alignment saw no batch with at least {MIN_BATCH} samples; pass data with "
                         "larger batches.")  # fmt: skip
    return acc.result().cpu()


def _as_tensor(values: dict[str, Any], name: str) -> torch.Tensor:
    v = values.get(name)
    if not isinstance(v, torch.Tensor):
        raise MergeError(
            f"block output {name!r} is not a tensor ({type(v).__name__}); give blocks explicitly."
        )
    return v


def check_alignable(deep: BlockStructure, shallow: BlockStructure, names: tuple[str, str]) -> None:
    """Raise a :class:`MergeError` saying what differs when the stage structures cannot be aligned."""
    sa, sb = deep.stages, shallow.stages
    if len(sa) != len(sb):
        raise MergeError(
            f"the models cannot be aligned: {names[0]} has {len(sa)} stages {list(sa)} and {names[1]} has "
            f"{len(sb)} stages {list(sb)} (a stage starts at every block that changes the feature shape or "
            f"has a projection shortcut).\n{names[0]}: {deep.describe()}\n{names[1]}: {shallow.describe()}"
        )
    bad = [s for s, (a, b) in enumerate(zip(sa, sb, strict=True)) if b > a]
    if bad:
        raise MergeError(
            f"the models cannot be aligned: {names[0]} has blocks per stage {list(sa)} and {names[1]} "
            f"{list(sb)}; one model must be at least as deep in every stage (stages {bad} differ)."
        )


def align_depth(
    cka: torch.Tensor | None,
    deep: BlockStructure,
    shallow: BlockStructure,
    method: Method,
) -> Segmentation:
    """Segment each stage of ``deep`` onto the blocks of ``shallow`` (first block of a stage pinned).

    ``cka`` may be None only for ``method="uniform"``.
    """
    if cka is None:
        if method != "uniform":
            raise MergeError(
                f"depth={method!r} needs data for the block CKA; pass data or use depth='uniform'."
            )
        cka = torch.zeros(len(deep.blocks), len(shallow.blocks), dtype=torch.float64)
    return align_stages(np.asarray(cka.double()), deep.stages, shallow.stages, method=method, pin_first=True)
