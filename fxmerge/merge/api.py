"""``fxmerge.merge``: one entry point for every graph-level merge method."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxmerge.capture.trace import capture, eval_mode, split_inputs
from fxmerge.clone import clone_module
from fxmerge.errors import FxmergeError, MergeError, MergeInputError
from fxmerge.gate import require_sound
from fxmerge.infer.api import infer_groups
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.checks import check_models_and_method, check_tensors, nonfinite_hint
from fxmerge.merge.engine import identity_transforms
from fxmerge.merge.features import activation_correlations
from fxmerge.merge.methods import Method, method_class, method_name, method_names, method_settings, resolve
from fxmerge.merge.options import HeteroOptions, MergeOptions
from fxmerge.merge.partial import build_multihead
from fxmerge.merge.problem import Problem, Solution
from fxmerge.merge.report import SpaceDetail, space_detail
from fxmerge.merge.result import Alignment, MergeResult, aligned_models
from fxmerge.merge.spaces import find_spaces
from fxmerge.merge.transform import load_merged, merge_state

# layers REPAIR can rescale (output units on weight axis 0, a bias it can add)
REPAIRABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered names, read when asked (user methods included)
        return method_names()
    if name == "NEEDS_DATA":
        return {n for n in method_names() if getattr(method_class(n), "needs_data", False)}
    raise AttributeError(name)


def merge(
    models: list[nn.Module],
    *,
    method: str | Method,
    data: Any = None,
    example_inputs: Any,
    spec: PermutationSpec | None = None,
    options: MergeOptions | None = None,
    hetero: HeteroOptions | None = None,
    **settings: Any,
) -> MergeResult:
    """Merge ``models`` (N >= 2) into one.

    ``method`` is a registered name (``"average"``, ``"rebasin"``, ``"act_align"``, ``"zipit"``, ``"wzip"``,
    ``"mudsc"``, or one of yours, see :func:`fxmerge.merge.register_method`) or a method object such as
    ``MuDSC(alpha=0.3, matcher="zip")``. ``data`` is any iterable of batches (tensor, tuple/list whose first
    item is the input, or dict of keyword inputs); methods with ``needs_data`` require it.

    Keyword ``settings`` are routed to the object that owns them, never dropped: the method's own settings
    (``alpha``, ``matcher``, ``max_sweeps``, ... for a method given by name), :class:`MergeOptions`
    (``seed``, ``reset_bn``, ``repair``, ``stop_at``, ``max_batches``, ``frontend``, ``progress``, ``post``) and
    :class:`HeteroOptions` (``depth``, ``width``, ``where``, ``blocks``, ``cka_batches``, ``cka_plot``); or pass
    ``options=`` / ``hetero=`` objects. ``spec``: a spec inferred earlier for model 0 (verified before use).

    Post-passes: BatchNorm statistics are re-estimated on ``data`` when ``reset_bn`` and the model has
    BatchNorm; ``repair=True`` rescales every producer layer to the parents' interpolated statistics (REPAIR,
    one-to-one matchings). ``post=["norm_repair", ...]`` then runs registered post-passes in order
    (:mod:`fxmerge.passes.registry`; with ``stop_at`` they correct the shared trunk). ``stop_at`` makes a
    partial zip (``result.model`` returns N outputs). ``depth`` / ``width`` merge models of different depth or
    width (:mod:`fxmerge.hetero`). The inputs are never modified.
    The result holds the merged model and, for one-to-one methods, the models aligned to model 0 and
    :meth:`MergeResult.interpolate`.
    """
    meth, opts, het = resolve(method, settings, options, hetero)
    check_models_and_method(models, meth, data)
    check_tensors(models)
    _check_selection(meth, opts, het)
    if het.active:
        from fxmerge.hetero.api import merge_hetero_with

        if spec is not None:
            raise MergeError(
                "spec= cannot be used for heterogeneous merges: each model's spec is inferred separately."
            )
        with nonfinite_hint():
            return merge_hetero_with(
                models, meth, data=data, example_inputs=example_inputs, options=opts, hetero=het
            )
    return _merge_same(models, meth, data, example_inputs, spec, opts)


def _merge_same(models, meth, data, example_inputs, spec, opts: MergeOptions) -> MergeResult:
    _check_post_passes(meth, data, opts)
    t0 = time.perf_counter()
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    _check_finite(states)
    needs_spec = (
        getattr(meth, "needs_spec", True) or opts.stop_at is not None or opts.repair or spec is not None
    )
    if needs_spec:
        spec = _checked_spec(models, spec, example_inputs, opts.frontend)
        spaces, stuck = find_spaces(spec)
    else:
        _check_same_state(states)
        _check_inputs_fit(models[0], example_inputs)
        spaces, stuck = {}, set()
    n = len(models)
    t1 = time.perf_counter()
    act = {}
    if meth.needs_data:
        with nonfinite_hint():
            act = activation_correlations(models, spec, spaces, data, example_inputs, progress=opts.progress,
                                          seed=opts.seed, max_batches=opts.max_batches)  # fmt: skip
    t2 = time.perf_counter()

    spent = {"solve": 0.0, "apply_and_post": 0.0}  # summed over the grid for alpha="auto"

    def build(m: Any) -> _Built:  # solve with a fresh seeded generator, then build the model and post-passes
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(opts.seed)
        problem = Problem(spec, spaces, states, identity_transforms(spaces, n), act, gen, opts.progress,
                          device=_device_of(models[0]))  # fmt: skip
        sol = m.solve(problem)
        del problem  # its similarity caches: free them before the merged model is built
        mid = time.perf_counter()
        merged = clone_module(models[0])
        load_merged(merged, merge_state(spec, states, sol.transforms) if spec is not None else average_state(states))
        info: dict[str, Any] = {}
        trunk_post = None
        if opts.stop_at is not None:
            if opts.post:  # the trunk is the merged model's start: correct it before the tails are split off
                merged, trunk_post = _run_post(merged, models, spec, spaces, sol.transforms, data, opts)
            cg = spec.graph if spec.graph is not None else capture(models[0], example_inputs, opts.frontend)
            merged, info = build_multihead(cg, spec, merged, models, sol.transforms, opts.stop_at, example_inputs)
        post = _post_passes(merged, models, spec, spaces, sol.transforms, data, opts)
        if trunk_post is not None:
            post["post"] = trunk_post
        spent["solve"] += mid - start
        spent["apply_and_post"] += time.perf_counter() - mid
        return _Built(post.pop("model"), sol, info, post, m)

    candidates = getattr(meth, "candidates", list)()
    selection = None
    if candidates:
        from fxmerge.merge.select import OutputAgreement, choose

        by_alpha = {c.alpha: c for c in candidates}
        built, selection = choose(list(by_alpha), lambda a: build(by_alpha[a]), lambda b: b.model,
                                  getattr(meth, "score", None),
                                  lambda: OutputAgreement(models, data, opts.max_batches))  # fmt: skip
    else:
        built = build(meth)
    merged, sol, info, post, used = built.model, built.solution, built.info, built.post, built.method
    tr = sol.transforms
    t3 = time.perf_counter()
    details = _details(spaces, tr, sol.sims, n)
    report = {
        "method": method_name(meth),
        "settings": method_settings(meth),
        "options": opts.model_dump(mode="json", exclude={"progress"}),
        "n_models": n,
        "groups": len(spec) if spec is not None else 0,
        "spaces": len(spaces),
        "identity_groups": sorted(stuck),
        "similarity": {k: d.to_obj() for k, d in details.items()},
        "sweeps": sol.log.sweeps,
        "sweep_values": sol.log.values,
        "sweep_changes": sol.log.changed,
        "post_passes": post,
        "timings": {"infer": t1 - t0, "statistics": t2 - t1, **spent, "select": t3 - t2 - sum(spent.values()),
                    "report": time.perf_counter() - t3},
    }  # fmt: skip
    if selection is not None:
        report["alpha_selection"] = selection.to_obj()
    if info:
        report["partial"] = info
    one_to_one = bool(getattr(used, "one_to_one", False)) and opts.stop_at is None
    align = Alignment(models, spec, spaces, tr, data, opts.max_batches) if one_to_one else None
    return MergeResult(merged, spec, report, details, align)


@dataclass
class _Built:
    """One solved and built merge: the model after post-passes and how it was made."""

    model: nn.Module
    solution: Solution
    info: dict[str, Any]
    post: dict[str, Any]
    method: Any


def _check_selection(meth: Any, opts: MergeOptions, het: HeteroOptions) -> None:
    """``alpha="auto"`` (a method with grid candidates) selects among whole merges of one architecture."""
    if not getattr(meth, "candidates", list)():
        return
    if het.active:
        raise MergeInputError("alpha='auto' is not available with depth/width (heterogeneous) merges; pass a "
                              "number, e.g. alpha=0.5")  # fmt: skip
    if opts.stop_at is not None:
        raise MergeInputError("alpha='auto' scores whole merged models; with stop_at (partial zip) pass a number, "
                              "e.g. alpha=0.5")  # fmt: skip


def _checked_spec(models, spec, example_inputs, frontend) -> PermutationSpec:
    given_spec = spec is not None
    spec = spec or infer_groups(models[0], example_inputs, frontend=frontend)
    for i, m in enumerate(models):
        try:
            spec.check_model(m)
        except FxmergeError as e:
            whose = "the spec's (spec= was inferred for another model)" if given_spec else "model 0's"
            raise MergeError(
                f"model {i} does not have {whose} architecture: {str(e).rstrip('.')}. Models of different "
                "depth or width merge with depth='lma' and/or width='max'."
            ) from e
    require_sound(models[0], spec, example_inputs)  # nothing unverified reaches a merge
    return spec


def _check_same_state(states) -> None:
    """Plain averaging without a spec: every model has model 0's tensors, with the same shapes."""
    ref = states[0]
    for i, st in enumerate(states[1:], start=1):
        if set(st) != set(ref):
            diff = sorted(set(st) ^ set(ref))[:3]
            raise MergeError(f"model {i} does not have model 0's architecture: tensors {diff} differ. Models of "
                             "different depth or width merge with depth='lma' and/or width='max'.")  # fmt: skip
        for k, v in st.items():
            if v.shape != ref[k].shape:
                raise MergeError(f"model {i} does not have model 0's architecture: {k!r} has shape "
                                 f"{tuple(v.shape)}, model 0's {tuple(ref[k].shape)}. Models of different depth or "
                                 "width merge with depth='lma' and/or width='max'.")  # fmt: skip


def _check_inputs_fit(model: nn.Module, example_inputs: Any) -> None:
    """One forward pass of model 0 on ``example_inputs`` (what inference would have run): a clear error now
    rather than a merged model the user's inputs do not fit."""
    args, kwargs = split_inputs(example_inputs)
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    except Exception as e:  # any failure of the user's model on the inputs is theirs to fix
        raise MergeInputError(f"example_inputs do not fit model 0: {type(e).__name__}: {str(e)[:300]}") from e


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The plain average of every floating tensor (integer buffers from model 0)."""
    n = len(states)
    out = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
        else:
            acc = states[0][name].double().clone()
            for s in states[1:]:
                acc += s[name].double()
            out[name] = (acc / n).to(ref.dtype)
    return out


def _device_of(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    return None


def _check_post_passes(meth, data, opts: MergeOptions) -> None:
    if opts.repair and (opts.stop_at is not None or not getattr(meth, "one_to_one", False)):
        raise MergeError("repair=True needs a one-to-one matching: use an align method without stop_at")
    if opts.repair and data is None:
        raise MergeError("repair=True needs data to measure the parents' statistics")
    if opts.post and data is None:
        raise MergeError("post-passes (post=[...]) need data to measure the parents' statistics")


def _post_passes(merged, models, spec, spaces, tr, data, opts: MergeOptions) -> dict:
    done: dict[str, Any] = {"reset_bn": False, "repair": []}
    progress, max_batches = opts.progress, opts.max_batches
    if opts.repair:
        from fxmerge.passes.bn import repair as repair_pass

        probes = _producer_modules(merged, spec, spaces)
        if not probes:
            raise MergeError("repair=True found no producer layer whose output units were matched")
        refs = aligned_models(models, spec, spaces, tr)
        merged = repair_pass(merged, refs, data, probes, num_batches=max_batches, progress=progress)
        done["repair"] = probes
    if opts.reset_bn and data is not None and _has_bn(merged):
        from fxmerge.passes.bn import reset_bn_stats

        merged = reset_bn_stats(merged, data, progress=progress, num_batches=max_batches)
        done["reset_bn"] = True
    if opts.post and opts.stop_at is None:
        merged, done["post"] = _run_post(merged, models, spec, spaces, tr, data, opts)
    done["model"] = merged
    return done


def _run_post(merged, models, spec, spaces, tr, data, opts: MergeOptions) -> tuple[nn.Module, list]:
    """The registered post-passes of ``opts.post`` (:mod:`fxmerge.passes.registry`), in order."""
    from fxmerge.passes.registry import PostContext, run_post_passes

    ctx = PostContext(models, spec, spaces, tr, data, _one_to_one(tr, spaces), opts.max_batches, opts.progress)
    return run_post_passes(merged, ctx, opts.post)


def _one_to_one(tr, spaces) -> bool:
    """Whether every merge space's solution is a permutation per model."""
    return all(tr[k].is_one_to_one() for k in spaces if k in tr)


def _producer_modules(model: nn.Module, spec: PermutationSpec, spaces) -> list[str]:
    """Modules whose ``weight`` has a matched output axis 0 and a contracted input axis (linear/conv-like)."""
    carried = set(spaces)
    out = []
    for name, mod in model.named_modules():
        w = f"{name}.weight" if name else "weight"
        lays = spec.axes.get(w)
        roles = spec.roles.get(w, [])
        if (
            lays
            and len(lays) >= 2
            and lays[0] in carried
            and "in" in roles[1:]
            and isinstance(mod, REPAIRABLE)
        ):
            out.append(name)
    return out


def _details(spaces, tr, sims, n) -> dict[str, SpaceDetail]:
    """Each space's final matching with the similarity matrix it was solved on; before/after are the mean
    cross-model similarities of the units paired by the identity and by the matching on that matrix."""
    out = {}
    for key, space in spaces.items():
        if key not in sims:
            continue
        d = space_detail(key, space, sims[key], tr[key], n)
        out[d.name] = d
    return out


def _check_finite(states) -> None:
    for i, st in enumerate(states):
        for name, t in st.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MergeError(f"model {i} has NaN/Inf values in {name!r}; fix or drop that checkpoint")


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
