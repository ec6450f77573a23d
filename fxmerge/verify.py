"""Self-verification: permuting any inferred group must leave the model's outputs unchanged.

Two entry points share one machinery:

* :func:`verify_invariance` checks a spec and raises :class:`~fxmerge.InvarianceError` naming the first
  group that is not a symmetry (the user-facing check);
* :func:`fxmerge.gate.find_unsound_groups` returns the offending groups instead of raising; ``infer_groups``
  uses it as a *gate*: offending groups are frozen and the spec re-verified before it is returned.

The check runs on a float64 copy of the model when the model runs in float64, and otherwise on a float32
copy with a tolerance scaled to the outputs (some kernels, e.g. grouped matmuls of mixture-of-experts
layers, exist only in lower precision).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from fxmerge.capture.trace import eval_mode, split_inputs
from fxmerge.clone import clone_module
from fxmerge.errors import InvarianceError
from fxmerge.ir.layout import groups_in, index
from fxmerge.ir.spec import PermutationSpec

#: relative tolerance (of the largest output magnitude) per verification dtype
RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


@dataclass
class InvarianceReport:
    """Max output difference per checked group (and for all groups at once)."""

    per_group: dict[int, float] = field(default_factory=dict)
    joint: float = 0.0
    scale: float = 0.0
    dtype: str = "float64"
    tolerance: float = 0.0


class Bench:
    """A private copy of the model in the verification dtype, its reference outputs and a tolerance."""

    def __init__(
        self, model: nn.Module, example_inputs: Any, rtol: float | None, atol: float, jitter: int | None = None
    ) -> None:
        self.model, self.args, self.kwargs, self.dtype, self.ref = _prepare(model, example_inputs, jitter)
        self.forwards = 1
        self.scale = max((_finite_max(t) for t in self.ref), default=0.0)
        self.tol = atol + (RTOL[self.dtype] if rtol is None else rtol) * self.scale
        self._deterministic = False

    def _run(self) -> list[torch.Tensor]:
        self.forwards += 1
        with eval_mode(self.model):
            return _outputs(self.model, self.args, self.kwargs)

    def require_deterministic(self) -> None:
        """Before a failing check is blamed on a group: two identical calls must agree (checked once, only
        when a check fails, so a sound spec costs no extra forward pass)."""
        if self._deterministic:
            return
        drift = _max_diff(self.ref, self._run())
        if drift > self.tol:
            raise InvarianceError(
                f"the model's forward is not deterministic in eval mode (two identical calls differ by {drift:.3g}); "
                "permutation invariance cannot be checked. Make the forward deterministic in eval mode (no "
                "sampling), or pass verify=False to infer_groups and check the spec yourself."
            )
        self._deterministic = True

    def diff(self, spec: PermutationSpec, perms: dict[int, torch.Tensor]) -> float:
        """Max |output change| with ``perms`` applied to the copy's parameters (restored afterwards)."""
        state = dict(self.model.named_parameters(remove_duplicate=False))
        state.update(dict(self.model.named_buffers(remove_duplicate=False)))
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad(), eval_mode(self.model):
            for name in spec.axes:
                t = state.get(name)
                if t is None or id(t) in saved:
                    continue
                new = spec.permute_tensor(name, t, perms)
                if new is not t:
                    saved[id(t)] = (t, t.clone())
                    t.copy_(new)
            try:
                diff = _max_diff(_permuted_outputs(spec, self.ref, perms), self._run())
            finally:
                for t, orig in saved.values():
                    t.copy_(orig)
        if diff > self.tol:
            self.require_deterministic()
        return diff


def _finite_max(t: torch.Tensor) -> float:
    """Largest finite magnitude of ``t`` (0 when it has none): an ``-inf`` must not scale the tolerance."""
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _permuted_outputs(spec: PermutationSpec, ref: list[torch.Tensor], perms: dict) -> list[torch.Tensor]:
    """What the permuted model must output: ``ref`` itself, permuted along output axes that carry groups
    (``free_outputs=True``). Output tensors are matched in graph order; integer outputs are not compared."""
    if not any(spec.output_layouts):
        return ref
    floats = [lays for lays, is_float in zip(spec.output_layouts, spec.output_floats, strict=True) if is_float]
    if len(floats) != len(ref):
        raise InvarianceError(
            f"the model returns {len(ref)} floating-point tensors but its graph {len(floats)}: cannot match the "
            "free outputs (free_outputs=True) to check invariance"
        )
    return [_permute_value(t, lays, perms) for t, lays in zip(ref, floats, strict=True)]


def _permute_value(t: torch.Tensor, lays: list, perms: dict) -> torch.Tensor:
    for axes, lay in lays:
        if not any(g in perms for g in groups_in(lay)):
            continue
        idx = index(lay, perms).to(t.device)
        rest = [a for a in range(t.ndim) if a not in axes]
        moved = t.permute(*rest, *axes)
        flat = moved.reshape(*moved.shape[: len(rest)], -1).index_select(len(rest), idx)
        back = flat.reshape(moved.shape)
        inverse = [0] * t.ndim
        for pos, a in enumerate([*rest, *axes]):
            inverse[a] = pos
        t = back.permute(*inverse)
    return t


def _prepare(
    model: nn.Module, example_inputs: Any, jitter: int | None = None
) -> tuple[nn.Module, tuple, dict, torch.dtype, list[torch.Tensor]]:
    """A float64 copy of the model and inputs, or float32 when the model cannot run in float64, and the
    copy's outputs (the reference). With ``jitter`` (a seed) the copy's parameters are jittered first."""
    errors = []
    for dtype in (torch.float64, torch.float32):
        work = clone_module(model).to(dtype)
        if jitter is not None:
            _jitter_parameters(work, jitter)
        args, kwargs = split_inputs(_cast(example_inputs, dtype))
        try:
            with eval_mode(work):
                ref = _outputs(work, args, kwargs)
        except Exception as e:  # e.g. a kernel without float64 support, a float32 constant built in forward
            errors.append(f"{dtype}: {type(e).__name__}: {str(e)[:200]}")
            continue
        _require_no_nan(ref, dtype)
        return work, args, kwargs, dtype, ref
    raise InvarianceError(
        "the model does not run on a float64 or float32 copy of itself with the example inputs, so permutation "
        "invariance cannot be checked: " + "; ".join(errors)
    )


def _jitter_parameters(model: nn.Module, seed: int) -> None:
    """Move every floating-point parameter off degenerate values, in place: ``p += 0.1 * max(mean |p|, 0.1) * n``
    with standard normal ``n``. A zero-initialised gamma or layer scale makes its branch invisible to a check on
    the model's own weights; groups are symmetries of the structure, so they must hold for these weights too.
    Buffers (running statistics, masks, position indices) are left as they are; tied parameters stay tied."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel():
                scale = 0.1 * max(float(p.abs().mean()), 0.1)
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def _outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t.detach().clone() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _require_no_nan(ref: list[torch.Tensor], dtype: torch.dtype) -> None:
    """A NaN compares unequal to everything, so outputs with NaN would fail every group (or, in a tolerance,
    pass every group): the check cannot see through them."""
    for i, t in enumerate(ref):
        n = int(torch.isnan(t).sum())
        if n:
            raise InvarianceError(
                f"the model's output {i} (shape {tuple(t.shape)}) contains NaN in {n} of {t.numel()} elements on the "
                f"example inputs ({str(dtype).removeprefix('torch.')} copy), so permutation invariance cannot be "
                "checked. Pass example inputs on which the model's outputs are finite (real data, or inputs within "
                "the ranges the model expects: token ids below the vocabulary size, long enough sequences), or "
                "fix the initialisation that produces NaN."
            )


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| over finite positions; a position where only one side is finite, or where the two differ
    in a non-finite value (inf vs -inf, NaN), counts as inf. Equal infinities (e.g. masked logits) agree."""
    if len(a) != len(b):
        return float("inf")
    out = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if not x.numel():
            continue
        finite = torch.isfinite(x) & torch.isfinite(y)
        if not bool(finite.all()) and not bool(torch.where(finite, True, x == y).all()):
            return float("inf")
        if bool(finite.any()):
            out = max(out, float((x - y)[finite].abs().max()))
    return out


def non_identity(n: int, gen: torch.Generator) -> torch.Tensor:
    if n < 2:
        return torch.arange(n)
    while True:
        p = torch.randperm(n, generator=gen)
        if not torch.equal(p, torch.arange(n)):
            return p


# --------------------------------------------------------------------------------------------- user check
def verify_invariance(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    *,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 1e-12,
    groups: Iterable[int] | None = None,
    batch: int = 1,
) -> InvarianceReport:
    """Apply an independent random permutation to each group (then to all at once).

    Runs on a float64 copy (float32 when the model cannot run in float64). Raises
    :class:`~fxmerge.InvarianceError` naming the first group whose permutation changes the outputs by more
    than ``atol + rtol * max|output|`` (``rtol`` defaults to 1e-6 in float64 and 1e-4 in float32). The model
    is not modified.

    ``batch > 1`` checks that many groups per forward pass (each with its own random permutation) and
    bisects a failing batch down to the offending group: same verdict and same error, far fewer forward
    passes on models with hundreds of groups (grouped convolutions, many heads).
    """
    spec.check_model(model)
    bench = Bench(model, example_inputs, rtol, atol)
    gen = torch.Generator().manual_seed(seed)
    report = InvarianceReport(scale=bench.scale, dtype=str(bench.dtype).removeprefix("torch."), tolerance=bench.tol)
    ids = [g.id for g in spec.groups] if groups is None else list(groups)
    step = max(batch, 1)
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        perms = {gid: non_identity(spec.group(gid).size, gen) for gid in chunk}
        _check_chunk(spec, bench, perms, report)
    perms = {gid: non_identity(spec.group(gid).size, gen) for gid in ids}
    report.joint = bench.diff(spec, perms) if perms else 0.0
    if report.joint > bench.tol:
        raise InvarianceError(
            f"permuting all {len(perms)} groups at once changed the outputs by {report.joint:.3g} "
            f"(tolerance {bench.tol:.3g}) although each group alone passed: the layouts compose incorrectly",
            max_diff=report.joint,
        )
    return report


def _check_chunk(spec: PermutationSpec, bench: Bench, perms: dict, report: InvarianceReport) -> None:
    diff = bench.diff(spec, perms)
    if diff <= bench.tol:
        for gid in perms:
            report.per_group[gid] = diff
        return
    if len(perms) == 1:
        (gid,) = perms
        report.per_group[gid] = diff
        raise InvarianceError(_message(spec, gid, diff, bench.tol), group=gid, max_diff=diff)
    items = list(perms.items())
    half = len(items) // 2
    _check_chunk(spec, bench, dict(items[:half]), report)
    _check_chunk(spec, bench, dict(items[half:]), report)
    raise InvarianceError(
        f"groups {sorted(perms)} pass one by one but not together (max |diff| {diff:.3g}, tolerance "
        f"{bench.tol:.3g}): the layouts of these groups compose incorrectly",
        max_diff=diff,
    )


def _message(spec: PermutationSpec, gid: int, diff: float, tol: float) -> str:
    return (
        f"group g{gid} ({describe_group(spec, gid)}) is not a symmetry: permuting it changed the outputs by "
        f"{diff:.3g} (tolerance {tol:.3g}). A rule links axes incorrectly; infer_groups (whose gate freezes "
        "such groups) or a fixed rule gives a sound spec."
    )


def describe_group(spec: PermutationSpec, gid: int, limit: int = 4) -> str:
    g = spec.group(gid)
    members = ", ".join(f"{m.param}[{m.axis}]" for m in g.members[:limit])
    return f"size {g.size}; {members}{' ...' if len(g.members) > limit else ''}"
