"""``fxmerge.merge``: one entry point for every graph-level merge method."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxmerge.capture.trace import capture
from fxmerge.errors import FxmergeError, MergeError, MergeInputError
from fxmerge.infer.api import infer_groups
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.engine import (
    MatchOptions,
    coordinate_descent,
    identity_transforms,
    solve_spaces,
    unit_vectors,
)
from fxmerge.merge.engine import weight_similarity as _wsim
from fxmerge.merge.features import activation_correlations
from fxmerge.merge.partial import build_multihead
from fxmerge.merge.report import SpaceDetail, space_detail
from fxmerge.merge.spaces import families, find_spaces
from fxmerge.merge.transform import Transforms, load_merged, merge_state, perms_from
from fxmerge.verify import require_sound

METHODS = ("average", "rebasin", "act_align", "zipit", "wzip", "mudsc")
NEEDS_DATA = {"act_align", "zipit", "mudsc"}
# layers REPAIR can rescale (output units on weight axis 0, a bias it can add)
REPAIRABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class MergeResult:
    """A merged model with the original architecture, the spec it was merged on, and a report.

    ``details`` maps each merge space (``report["similarity"]`` keys) to its final similarity matrix and
    matching, for plots; ``report`` is plain JSON.
    """

    model: nn.Module
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)
    details: dict[str, SpaceDetail] = field(default_factory=dict)


def merge(
    models: list[nn.Module],
    *,
    method: str,
    data: Any = None,
    example_inputs: Any,
    alpha: float = 0.5,
    matcher: str = "align",
    seed: int = 0,
    reset_bn: bool = True,
    repair: bool = False,
    stop_at: str | None = None,
    depth: str | None = None,
    width: str | int | None = None,
    progress: bool = True,
    frontend: str = "auto",
    max_sweeps: int = 30,
    patience: int = 5,
    zip_alpha: float = 0.5,
    zip_beta: float = 1.0,
    max_batches: int | None = None,
    spec: PermutationSpec | None = None,
    **hetero_options: Any,
) -> MergeResult:
    """Merge ``models`` (same architecture, N >= 2) into one.

    Methods: ``"average"`` (plain weight averaging), ``"rebasin"`` (Git Re-Basin weight matching,
    coordinate descent), ``"act_align"`` (Hungarian on activation correlations), ``"zipit"`` (ZipIt greedy
    zip on activations), ``"wzip"`` (zip on weight correlations), ``"mudsc"`` (``alpha`` mixes weight and
    activation similarity; ``matcher`` "align" or "zip"; coordinate descent in random order, stopping after
    ``patience`` sweeps without improvement). ``data`` is any iterable of batches (tensor, tuple/list whose
    first item is the input, or dict of keyword inputs).

    Zipping merges units within a model as well as across models (ZipIt's ``zip_beta`` budget). Post-passes:
    BatchNorm statistics are re-estimated on ``data`` when ``reset_bn`` and the model has BatchNorm;
    ``repair=True`` rescales every producer layer to the parents' interpolated statistics (REPAIR, for
    models without BatchNorm; one-to-one matchings only). ``stop_at`` (a module path or node name) makes a
    partial zip: the graph is merged up to that module and each model keeps its own layers after it, so
    ``result.model`` returns a tuple of N outputs. ``depth``/``width`` switch to heterogeneous merging of
    models of different depth or width (``fxmerge.hetero``). The input models are never modified.
    """
    _validate(models, method, data, matcher, alpha, max_batches)
    if depth is not None or width is not None:
        from fxmerge.hetero.api import merge_hetero

        with _nonfinite_hint():
            return merge_hetero(
                models, method=method, data=data, example_inputs=example_inputs, depth=depth, width=width, alpha=alpha,
                matcher=matcher, seed=seed, reset_bn=reset_bn, repair=repair, progress=progress, frontend=frontend,
                max_sweeps=max_sweeps, patience=patience, zip_alpha=zip_alpha, zip_beta=zip_beta,
                max_batches=max_batches, **hetero_options,
            )  # fmt: skip
    if hetero_options:
        raise MergeError(f"unknown merge option(s) {sorted(hetero_options)}; they apply only with depth= or width=")
    if repair and (stop_at is not None or (matcher == "zip" or method in ("zipit", "wzip"))):
        raise MergeError("repair=True needs a one-to-one matching: use an align method without stop_at")
    if repair and data is None:
        raise MergeError("repair=True needs data to measure the parents' statistics")
    t0 = time.perf_counter()
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
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    _check_finite(states)
    n = len(models)
    spaces, stuck = find_spaces(spec)
    opts = MatchOptions(matcher="zip" if method in ("zipit", "wzip") else matcher, zip_alpha=zip_alpha,
                        zip_beta=zip_beta, weight_sim="dot" if method == "rebasin" else "corr")  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    act = {}
    t1 = time.perf_counter()
    if method in NEEDS_DATA:
        with _nonfinite_hint():
            act = activation_correlations(models, spec, spaces, data, example_inputs, progress=progress, seed=seed,
                                          max_batches=max_batches)  # fmt: skip
    t2 = time.perf_counter()
    tr, log, sims = _solve(method, spec, spaces, states, act, opts, alpha, gen, max_sweeps, patience)
    t3 = time.perf_counter()
    merged = copy.deepcopy(models[0])
    load_merged(merged, merge_state(spec, states, tr))
    info: dict[str, Any] = {}
    if stop_at is not None:
        cg = spec.graph if spec.graph is not None else capture(models[0], example_inputs, frontend)
        merged, info = build_multihead(cg, spec, merged, models, tr, stop_at, example_inputs)
    post = _post_passes(merged, models, spec, spaces, tr, data, reset_bn, repair, progress, max_batches)
    merged = post.pop("model")
    details = _details(spaces, tr, sims, n)
    report = {
        "method": method,
        "options": {"alpha": alpha, "matcher": opts.matcher, "seed": seed, "zip_alpha": zip_alpha,
                    "zip_beta": zip_beta, "reset_bn": reset_bn, "repair": repair, "stop_at": stop_at},
        "n_models": n,
        "groups": len(spec),
        "spaces": len(spaces),
        "identity_groups": sorted(stuck),
        "similarity": {k: d.to_obj() for k, d in details.items()},
        "sweeps": log.get("sweeps", 0),
        "sweep_values": log.get("values", []),
        "post_passes": post,
        "timings": {"infer": t1 - t0, "statistics": t2 - t1, "solve": t3 - t2,
                    "apply_and_post": time.perf_counter() - t3},
    }  # fmt: skip
    if info:
        report["partial"] = info
    return MergeResult(merged, spec, report, details)


def _post_passes(merged, models, spec, spaces, tr, data, reset_bn, repair, progress, max_batches) -> dict:
    done: dict[str, Any] = {"reset_bn": False, "repair": []}
    if repair:
        from fxmerge.passes.bn import repair as repair_pass

        probes = _producer_modules(merged, spec, spaces)
        if not probes:
            raise MergeError("repair=True found no producer layer whose output units were matched")
        refs = _aligned_parents(models, spec, spaces, tr)
        merged = repair_pass(merged, refs, data, probes, num_batches=max_batches, progress=progress)
        done["repair"] = probes
    if reset_bn and data is not None and _has_bn(merged):
        from fxmerge.passes.bn import reset_bn_stats

        merged = reset_bn_stats(merged, data, progress=progress, num_batches=max_batches)
        done["reset_bn"] = True
    done["model"] = merged
    return done


def _producer_modules(model: nn.Module, spec: PermutationSpec, spaces) -> list[str]:
    """Modules whose ``weight`` has a matched output axis 0 and a contracted input axis (linear/conv-like)."""
    carried = set(spaces)
    out = []
    for name, mod in model.named_modules():
        w = f"{name}.weight" if name else "weight"
        lays = spec.axes.get(w)
        roles = spec.roles.get(w, [])
        if lays and len(lays) >= 2 and lays[0] in carried and "in" in roles[1:] and isinstance(mod, REPAIRABLE):
            out.append(name)
    return out


def _aligned_parents(models, spec, spaces, tr) -> list[nn.Module]:
    refs = []
    for m, model in enumerate(models):
        perms: dict[int, torch.Tensor] = {}
        for key in spaces:
            perms.update(perms_from(spec, key, tr[key], m))
        refs.append(spec.apply(model, {g: p for g, p in perms.items()}))
    return refs


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


def _solve(method, spec, spaces, states, act, opts, alpha, gen, max_sweeps, patience):
    """Transforms per space, a log, and the similarity matrix each space's final matching was solved on."""
    n = len(states)
    ident = identity_transforms(spaces, n)
    if method == "average":
        return ident, {}, {k: _weight_sim(spec, spaces[k], states, ident) for k in spaces}
    if method in ("act_align", "zipit"):
        tr, sims = _act_then_weights(spec, spaces, states, act, opts, ident)
        return tr, {}, sims
    if method in ("rebasin", "wzip"):  # weight-only: coordinate descent over the spaces
        tr, log = coordinate_descent(spec, spaces, states, {}, opts, alpha=1.0, init=ident, generator=gen,
                                     max_sweeps=max_sweeps, patience=min(patience, 2))  # fmt: skip
        sims = {k: _cosine(v) for k, v in log.sims.items()} if opts.weight_sim == "dot" else log.sims
        return tr, {"sweeps": log.sweeps, "values": log.values}, sims
    init, _ = _act_then_weights(spec, spaces, states, act, opts, ident)
    tr, log = coordinate_descent(spec, spaces, states, act, opts, alpha=alpha, init=init, generator=gen,
                                 max_sweeps=max_sweeps, patience=patience)  # fmt: skip
    return tr, {"sweeps": log.sweeps, "values": log.values}, log.sims


def _act_then_weights(spec, spaces, states, act, opts, ident) -> tuple[Transforms, dict]:
    """Spaces with activation probes are matched on activations; the rest (e.g. heads inside an opaque
    attention leaf) on weights, with the activation-matched neighbours' transforms applied."""
    n = len(states)
    with_act = [k for fam in families(spaces) if all(act.get(k) is not None for k in fam) for k in fam]
    tr = dict(ident)
    sims = {k: act[k] for k in with_act}
    tr.update(solve_spaces(with_act, spaces, sims, n, opts))
    rest = [k for k in spaces if k not in with_act]  # a family with unprobed spaces: those on weights
    sims.update({k: act[k] if act.get(k) is not None else _weight_sim(spec, spaces[k], states, tr) for k in rest})
    tr.update(solve_spaces(rest, spaces, {k: sims[k] for k in rest}, n, opts))
    return tr, sims


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    """Weight matching solves on dot products; report them as cosines (same matching, readable scale)."""
    d = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / d[:, None] / d[None, :]


def _weight_sim(spec, space, states, tr) -> torch.Tensor:
    return _wsim(unit_vectors(spec, space, states, tr), "corr")


def check_models_and_method(models: Any, method: str, data: Any) -> None:
    """The checks every merge entry point shares: N >= 2 modules, a known method, data where it needs it."""
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise MergeError("merge needs a list of at least 2 models")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise MergeError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in NEEDS_DATA and data is None:
        raise MergeError(f"method {method!r} needs data (any iterable of input batches) for activation statistics")


@contextlib.contextmanager
def _nonfinite_hint():
    """The statistics' NaN error suggests an option of theirs that ``merge`` does not take: say what to fix."""
    try:
        yield
    except MergeError as e:
        if "nonfinite=" not in str(e):
            raise
        raise MergeError("activation features contain NaN or inf: check the data for NaN/inf values and that the "
                         "models produce finite outputs on it") from e  # fmt: skip


def _check_tensors(models) -> None:
    """Every model holds data (no meta tensors) in one floating dtype."""
    dtypes = []
    for i, m in enumerate(models):
        tensors = [*m.parameters(), *m.buffers()]
        if any(t.is_meta for t in tensors):
            raise MergeInputError(f"models[{i}] has tensors on the meta device (no data): load its weights first")
        dtypes.append(sorted({str(t.dtype) for t in tensors if t.is_floating_point()}))
    if any(d != dtypes[0] for d in dtypes):
        found = ", ".join(f"models[{i}]: {'/'.join(d) or 'none'}" for i, d in enumerate(dtypes))
        raise MergeInputError(f"the models have different floating dtypes ({found}); convert them to one dtype "
                              "first, e.g. model.float()")  # fmt: skip


def _validate(models, method, data, matcher, alpha, max_batches) -> None:
    check_models_and_method(models, method, data)
    _check_tensors(models)
    if matcher not in ("align", "zip"):
        raise MergeError(f"matcher must be 'align' or 'zip', got {matcher!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise MergeInputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise MergeError(f"alpha must be in [0, 1], got {alpha}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise MergeError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def _check_finite(states) -> None:
    for i, st in enumerate(states):
        for name, t in st.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MergeError(f"model {i} has NaN/Inf values in {name!r}; fix or drop that checkpoint")


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
