"""``merge_hetero``: merge models that differ in depth and/or width (training-free heterogeneous merging).

Pipeline (``/work/shared/reference/hetero.md`` §8):

1. infer each model's spec and blocks (:func:`~fxmerge.hetero.blocks.find_blocks`);
2. depth: one data pass gives the block-output CKA between the deeper and the shallower model, and
   SMA / LMA / uniform segments every stage (first block pinned);
3. the shallower model is rebuilt on the deeper model's graph with identity blocks in the slots it
   does not fill (:func:`~fxmerge.hetero.expand.expand`), at its own widths;
4. groups whose sizes differ are zipped to a target width (largest by default), groups inside
   zero-branch blocks keep the deep model's units, and the merged tensors are written into the deeper
   model rebuilt at the target widths; BatchNorm statistics are re-estimated on the data.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxmerge.clone import clone_module
from fxmerge.errors import MergeError
from fxmerge.hetero.align import align_depth, block_cka, check_alignable
from fxmerge.hetero.blocks import BlockOverride, BlockStructure, find_blocks
from fxmerge.hetero.counts import (
    Correspondence,
    check_depth_counts,
    correspond,
    correspond_all,
    count_targets,
    rebuild_error,
    skeleton_model,
)
from fxmerge.hetero.depth import Segmentation
from fxmerge.hetero.engine import merge_states
from fxmerge.hetero.expand import Twin, expand, param_map
from fxmerge.hetero.plot import plot_cka_alignment
from fxmerge.hetero.width import (
    WidthTarget,
    balance_heads,
    check_same_structure,
    group_sizes,
    resize_model,
    target_widths,
)
from fxmerge.infer.api import infer_groups
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.checks import check_models_and_method, check_tensors
from fxmerge.merge.methods import method_name, method_settings, resolve
from fxmerge.merge.options import HeteroOptions, MergeOptions
from fxmerge.merge.result import MergeResult
from fxmerge.merge.spaces import find_spaces
from fxmerge.passes.registry import PostContext, run_post_passes

__all__ = ["DEPTH_METHODS", "merge_hetero"]

DEPTH_METHODS = ("lma", "sma", "uniform")
IDENTITY_TOL = 1e-4  # relative deviation of a twin from its model above which padding is reported inexact


def _validate(models: Any, method: Any, data: Any, het: HeteroOptions, opts: MergeOptions) -> None:
    check_models_and_method(models, method, data)
    if het.depth in ("lma", "sma") and data is None:
        raise MergeError(
            f"depth={het.depth!r} aligns blocks by CKA on data; pass data or use depth='uniform'."
        )
    if opts.repair:
        raise MergeError("repair=True is not supported for heterogeneous merges (zipped, padded models); "
                         "BatchNorm models are re-normalised with reset_bn=True.")  # fmt: skip
    if opts.stop_at is not None:
        raise MergeError("stop_at= (partial zipping) is not supported for heterogeneous merges.")
    if opts.post and data is None:
        raise MergeError("post-passes (post=[...]) need data to measure the parents' statistics")


def _overrides(blocks: Sequence[BlockOverride | None] | None, n: int) -> list[BlockOverride | None]:
    if blocks is None:
        return [None] * n
    if isinstance(blocks, str) or len(blocks) != n:
        raise MergeError(f"blocks must give one list of block module names (or None) per model ({n} models).")
    return list(blocks)


def _depth_error(structs: list[BlockStructure]) -> MergeError:
    desc = "; ".join(
        f"model {i}: {len(s.blocks)} blocks, stages {list(s.stages)}" for i, s in enumerate(structs)
    )
    return MergeError(f"the models differ in depth ({desc}); pass depth='lma', 'sma' or 'uniform'.")


def _align(
    models: Sequence[nn.Module], structs: list[BlockStructure], data: Any, depth: str | None, where: str,
    cka_plot: str | os.PathLike[str] | None, cka_batches: int | None, progress: bool,
) -> tuple[list[list[int]], dict[str, Any]]:  # fmt: skip
    """Slots of every model's blocks in the deepest model, and the alignment report."""
    deep = max(range(len(structs)), key=lambda i: (len(structs[i].blocks), -i))
    slots: list[list[int]] = [list(range(len(s.blocks))) for s in structs]
    info: dict[str, Any] = {"deep_model": deep, "segmentation": None, "cka": None, "cka_plot": None}
    if all(s.stages == structs[deep].stages for s in structs):
        return slots, info
    if depth is None:
        raise _depth_error(structs)
    if len(models) != 2:
        raise MergeError(f"depth alignment merges exactly 2 models, got {len(models)}.")
    shallow = 1 - deep
    check_alignable(structs[deep], structs[shallow], (f"model {deep}", f"model {shallow}"))
    cka = None
    if data is not None:
        cka = block_cka(structs[deep], structs[shallow], data, max_batches=cka_batches, progress=progress)
    seg = align_depth(cka, structs[deep], structs[shallow], depth)
    slots[shallow] = seg.slots(where)
    info.update(segmentation=_seg_report(seg, where, shallow, slots[shallow]),
                cka=None if cka is None else cka.tolist())  # fmt: skip
    if cka_plot is not None:
        if cka is None:
            raise MergeError("cka_plot needs data: the CKA matrix is computed on the data batches.")
        labels = (f"model {deep} block (deep)", f"model {shallow} block (shallow)")
        info["cka_plot"] = str(plot_cka_alignment(cka, seg, cka_plot, where=where, labels=labels))
    return slots, info


def _seg_report(seg: Segmentation, where: str, shallow: int, slots: list[int]) -> dict[str, Any]:
    return {"method": seg.method, "segments": [list(s) for s in seg.segments], "slots": slots, "where": where,
            "score": seg.score, "stages_deep": list(seg.stages_a), "stages_shallow": list(seg.stages_b),
            "shallow_model": shallow}  # fmt: skip


def _twin_spec(
    twin: Twin, example_inputs: Any, frontend: str, ref: PermutationSpec, label: str
) -> PermutationSpec:
    spec = infer_groups(twin.model, example_inputs, frontend=frontend)
    check_same_structure(ref, spec, ("the deep model", label))
    return spec


def _check_identity(twins: dict[int, Twin]) -> dict[int, float]:
    errors = {m: t.max_error for m, t in twins.items()}
    bad = {m: t.max_error for m, t in twins.items() if t.max_error > IDENTITY_TOL * (1.0 + t.scale)}
    if bad:
        warnings.warn(
            f"identity padding is not exact for model(s) {sorted(bad)} (max output deviation {max(bad.values()):.3g}): "
            "a block after a residual add is not an identity (e.g. post-norm or a non-ReLU activation).",
            stacklevel=3,
        )
    return errors


def _widths_report(sizes: list[dict[int, int]], targets: dict[int, int]) -> dict[str, dict[str, Any]]:
    return {f"g{g}": {"sizes": [s[g] for s in sizes], "target": k} for g, k in targets.items()}


def _width_error(
    sizes: list[dict[int, int]], absent: list[frozenset[int]], spec: PermutationSpec
) -> MergeError | None:
    for g in spec.groups:
        vals = [s[g.id] for m, s in enumerate(sizes) if g.id not in absent[m]]
        if len(set(vals)) > 1:
            where_ = ", ".join(f"{mb.param}[{mb.axis}]" for mb in g.members[:3])
            return MergeError(f"the models differ in width: group g{g.id} ({where_}) has sizes {vals}; pass "
                              "width='max' (or 'min', an int) to zip them to a common width.")  # fmt: skip
    return None


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def merge_hetero(
    models: list[nn.Module],
    *,
    method: Any,
    data: Any = None,
    example_inputs: Any,
    depth: str | None = None,
    width: WidthTarget | None = None,
    where: str = "start",
    blocks: Sequence[BlockOverride | None] | None = None,
    cka_plot: str | os.PathLike[str] | None = None,
    cka_batches: int | None = None,
    **settings: Any,
) -> MergeResult:
    """Merge models of different depth and/or width into one model with the deepest model's graph.

    Args:
        models: 2 models for depth heterogeneity (N >= 2 when only widths differ). They must share
            stem, head and block kinds; the inputs are never modified.
        method: a registered method name or object (:mod:`fxmerge.merge.methods`). Equal widths (after depth
            padding) accept every method; different widths need a zip matcher (``"zipit"``: elastic zipping).
        data: iterable of batches for CKA, activation statistics and the BatchNorm reset.
        example_inputs: inputs for one forward pass (tracing, shapes, identity checks).
        depth: ``"lma"`` (layer-wise, default choice), ``"sma"`` (segment-wise) or ``"uniform"``;
            required when the models differ in depth.
        width: ``"max"`` (default target when given), ``"min"``, an int for every group whose sizes
            differ, or a dict group id -> width; required when the models differ in width.
        where: ``"start"`` puts each shallow block at the start of its segment (paper), ``"end"`` at
            the end (released code).
        blocks: optional per-model block override: a list of module names (or lists of names) per model.
        cka_plot: optional PNG path for the CKA heatmap with the alignment.
        cka_batches: batches used for CKA (default: ``max_batches`` or all).
        **settings: the method's settings and :class:`~fxmerge.merge.MergeOptions` fields (seed, reset_bn,
            progress, frontend, max_batches), as for :func:`fxmerge.merge`.

    Returns:
        A :class:`~fxmerge.merge.MergeResult`; the report has ``"segmentation"`` (None without depth
        alignment), ``"cka"`` (deep x shallow list of lists, or None), ``"widths"`` (per group: sizes
        per model and target), plus the blocks, padded blocks and identity errors.

    Raises:
        MergeError: on bad arguments, models whose stems, heads, stages or layers do not correspond
            (the message says what differs), or models that differ in depth/width without ``depth``/``width``.
    """
    het = {"depth": depth, "width": width, "where": where, "blocks": blocks, "cka_plot": cka_plot,
           "cka_batches": cka_batches}  # fmt: skip
    meth, opts, hopt = resolve(method, {**settings, **het}, None, None)
    check_models_and_method(models, meth, data)
    check_tensors(models)
    return merge_hetero_with(
        models, meth, data=data, example_inputs=example_inputs, options=opts, hetero=hopt
    )


def merge_hetero_with(
    models: list[nn.Module], method: Any, *, data: Any, example_inputs: Any, options: MergeOptions,
    hetero: HeteroOptions,
) -> MergeResult:  # fmt: skip
    """:func:`merge_hetero` on resolved objects (what :func:`fxmerge.merge` calls)."""
    opt, het = options, hetero
    depth, width, where = het.depth, het.width, het.where
    cka_plot, cka_batches = het.cka_plot, het.cka_batches
    t0 = time.perf_counter()
    _validate(models, method, data, het, opt)
    frontend, progress, max_batches = opt.frontend, opt.progress, opt.max_batches
    overrides = _overrides(het.blocks, len(models))
    specs = [infer_groups(m, example_inputs, frontend=frontend) for m in models]
    structs = [
        find_blocks(m, example_inputs, spec=s, blocks=o)
        for m, s, o in zip(models, specs, overrides, strict=True)
    ]
    slots, info = _align(models, structs, data, depth, where, cka_plot,
                         cka_batches if cka_batches is not None else max_batches, progress)  # fmt: skip
    deep = info["deep_model"]
    t1 = time.perf_counter()
    corrs = correspond_all(specs) if info["segmentation"] is None else None
    if corrs is not None:
        return _merge_block_counts(models, method, data, example_inputs, opt, het, specs, structs, corrs, (t0, t1))
    if info["segmentation"] is not None:
        pairs = {m: param_map(structs[deep], structs[m], slots[m]) for m in range(len(models)) if m != deep}
        check_depth_counts(specs, deep, pairs)
    twins = {m: expand(models[deep], models[m], structs[deep], structs[m], specs[deep], slots[m],
                       example_inputs=example_inputs) for m in range(len(models)) if m != deep}  # fmt: skip
    errors = _check_identity(twins)
    engine_models = [models[m] if m == deep else twins[m].model for m in range(len(models))]
    engine_specs = [specs[deep] if m == deep else _twin_spec(twins[m], example_inputs, frontend, specs[deep],
                                                             f"model {m}") for m in range(len(models))]  # fmt: skip
    absent = [frozenset() if m == deep else twins[m].absent for m in range(len(models))]
    sizes = [group_sizes(s) for s in engine_specs]
    if width is None:
        err = _width_error(sizes, absent, specs[deep])
        if err is not None:
            raise err
    targets = target_widths(sizes, width if width is not None else "max", absent)
    t2 = time.perf_counter()
    head_shares: dict[str, list[Any]] = {}
    state, engine_report, trs = merge_states(engine_models, engine_specs, absent=absent, targets=targets, data=data,
                                             method=method, opts=opt, base=deep, head_shares=head_shares)  # fmt: skip
    skeleton, spec = _build(models[deep], specs[deep], targets, state, _Parents(engine_models, engine_specs, trs),
                            head_shares, engine_report, data, example_inputs, opt)  # fmt: skip
    report = {
        **_common_report(method, het, opt, models, structs, info),
        "deep_model": deep,
        "skeleton_model": deep,
        "widths": _widths_report(sizes, targets),
        "padded_blocks": {m: list(t.padded) for m, t in twins.items()},
        "absent_groups": {m: sorted(t.absent) for m, t in twins.items()},
        "identity_max_error": errors,
        "engine": engine_report,
        "timings": _timings(t0, t1, t2),
    }
    return MergeResult(skeleton, spec, report)


def _timings(t0: float, t1: float, t2: float) -> dict[str, float]:
    return {"blocks_and_alignment": t1 - t0, "expansion": t2 - t1, "merge": time.perf_counter() - t2}


@dataclass
class _Parents:
    """The models the engine merged (padded twins for depth merges), each with its spec and matchings."""

    models: list[nn.Module]
    specs: list[PermutationSpec]
    transforms: list[Any]


def _build(
    base: nn.Module, base_spec: PermutationSpec, targets: dict[int, int], state: dict[str, Any], parents: _Parents,
    head_shares: dict[str, list[Any]], engine_report: dict[str, Any], data: Any, example_inputs: Any,
    opt: MergeOptions,
) -> tuple[nn.Module, PermutationSpec]:  # fmt: skip
    """The merged model: ``base`` rebuilt at the target widths holding ``state``, BatchNorm statistics reset,
    heads balanced (models of different widths) and the post-passes of ``opt.post`` run; and its spec."""
    engine_models = parents.models
    resized = targets != group_sizes(base_spec)
    skeleton = (resize_model(base, base_spec, targets, example_inputs=example_inputs) if resized
                else clone_module(base))  # fmt: skip
    skeleton.load_state_dict(state)
    if opt.reset_bn and data is not None and _has_bn(skeleton):
        from fxmerge.passes.bn import reset_bn_stats

        skeleton = reset_bn_stats(skeleton, data, progress=opt.progress, num_batches=opt.max_batches)
    if engine_report["elastic"] and data is not None:  # models of different widths: no model may dominate
        engine_report["head_balance"] = balance_heads(skeleton, engine_models, head_shares, data,
                                                      max_batches=opt.max_batches)  # fmt: skip
    spec = infer_groups(skeleton, example_inputs, frontend=opt.frontend) if resized else base_spec
    if opt.post:
        skeleton, engine_report["post"] = _post_passes(skeleton, spec, parents, data, opt)
    return skeleton, spec


def _post_passes(merged: nn.Module, spec: PermutationSpec, parents: _Parents, data: Any,
                 opt: MergeOptions) -> tuple[nn.Module, list]:  # fmt: skip
    """The registered post-passes of ``opt.post`` on the merged model; each parent's per-unit statistics are
    merged through its own spec and matchings."""
    ctx = PostContext(parents.models, spec, find_spaces(spec)[0], {}, data, False, opt.max_batches, opt.progress,
                      model_specs=parents.specs, model_transforms=parents.transforms)  # fmt: skip
    return run_post_passes(merged, ctx, opt.post)


def _common_report(method: Any, het: HeteroOptions, opt: MergeOptions, models: list[nn.Module],
                   structs: list[BlockStructure], info: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {
        "method": method_name(method),
        "settings": method_settings(method),
        "hetero": True,
        "depth": het.depth,
        "width": het.width,
        "n_models": len(models),
        "blocks": [[b.name for b in s.blocks] for s in structs],
        "stages": [list(s.stages) for s in structs],
        "segmentation": info["segmentation"],
        "cka": info["cka"],
        "cka_plot": info["cka_plot"],
        "options": opt.model_dump(mode="json", exclude={"progress"}),
    }


def _merge_block_counts(
    models: list[nn.Module], method: Any, data: Any, example_inputs: Any, opt: MergeOptions, het: HeteroOptions,
    specs: list[PermutationSpec], structs: list[BlockStructure], corrs: list[Correspondence],
    times: tuple[float, float],
) -> MergeResult:  # fmt: skip
    """Width-only merge of models whose numbers of heads / GroupNorm groups differ (``corrs``: every model's groups
    paired with model 0's). Targets are computed in model 0's group ids; the merge runs on the models themselves with
    the skeleton model (the one with every target block count, :func:`~fxmerge.hetero.counts.skeleton_model`) first,
    and the skeleton is rebuilt at the target widths to hold it."""
    n = len(models)
    sizes = [c.sizes(s) for c, s in zip(corrs, specs, strict=True)]
    differ = {g for c in corrs for g in c.counts}
    if het.width is None:
        err = _width_error(sizes, [frozenset()] * n, specs[0])
        assert err is not None  # the block counts differ
        raise err
    targets0 = count_targets(sizes, het.width, target_widths(sizes, het.width), specs[0], differ)
    skel = skeleton_model(sizes, targets0, specs[0], differ)
    order = [skel, *(m for m in range(n) if m != skel)]
    ref = [correspond(specs[skel], specs[m], (f"model {skel}", f"model {m}")) for m in order]
    targets = {g.id: g.size for g in specs[skel].groups} | ref[order.index(0)].targets(targets0)
    t2 = time.perf_counter()
    head_shares: dict[str, list[Any]] = {}
    engine_models = [models[m] for m in order]
    engine_specs = [specs[m] for m in order]
    state, engine_report, trs = merge_states(engine_models, engine_specs, absent=[frozenset()] * n, targets=targets,
                                             data=data, method=method, opts=opt, base=0, head_shares=head_shares,
                                             maps=[c.signature_map() for c in ref])  # fmt: skip
    try:
        skeleton, spec = _build(models[skel], specs[skel], targets, state, _Parents(engine_models, engine_specs, trs),
                                head_shares, engine_report, data, example_inputs, opt)  # fmt: skip
    except MergeError as e:
        raise rebuild_error(e, skel, sizes, targets0) from e
    to_model0 = {r: o for o, r in ref[order.index(0)].to_ref.items()}
    engine_report["blocks"] = {f"g{to_model0[int(k[1:])]}": [v[order.index(m)] for m in range(n)]
                               for k, v in engine_report["blocks"].items()}  # fmt: skip
    report = {
        **_common_report(method, het, opt, models, structs, {"segmentation": None, "cka": None, "cka_plot": None}),
        "deep_model": skel,
        "skeleton_model": skel,
        "widths": _widths_report(sizes, targets0),
        "block_counts": {f"g{g}": {"counts": [s[g] for s in sizes], "target": targets0[g]} for g in sorted(differ)},
        "padded_blocks": {},
        "absent_groups": {},
        "identity_max_error": {},
        "engine": engine_report,
        "timings": _timings(times[0], times[1], t2),
    }
    return MergeResult(skeleton, spec, report)
