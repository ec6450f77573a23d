"""The soundness gate: which inferred groups are not symmetries of the model.

``infer_groups`` runs :func:`find_unsound_groups` before it returns a spec (offending groups are frozen and
the spec re-verified); merges call :func:`require_sound` on any spec that did not come through the gate.
The check itself (a private float64 copy, permuted outputs, tolerances) lives in :mod:`fxmerge.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxmerge.errors import InvarianceError
from fxmerge.ir.spec import PermutationSpec
from fxmerge.memory import release_freed_memory
from fxmerge.verify import Bench, describe_group, non_identity


class UnsoundGroupWarning(UserWarning):
    """``infer_groups``' soundness gate froze groups whose permutation changed the model's outputs."""


@dataclass
class VerificationRecord:
    """What the soundness gate of ``infer_groups`` checked: stored on the spec as ``spec.verification``."""

    dtype: str
    tolerance: float
    scale: float
    max_diff: float
    forwards: int
    trials: int
    frozen: list[str] = field(default_factory=list)
    #: the second stage, on a copy with jittered parameters: "checked", or why it was skipped
    jittered: str = "not run"

    def to_obj(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_unsound_groups(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    *,
    seed: int = 0,
    trials: int = 2,
    jitter: bool = True,
) -> tuple[dict[int, float], VerificationRecord]:
    """Groups whose random permutation changes the outputs, with the change each caused.

    Each trial permutes every group at once (one forward pass); a failing trial is bisected down to the
    offending groups. A set that fails while both its halves pass (groups that only fail together) is
    reported whole. With ``jitter`` the groups that pass are checked again on a copy whose parameters are
    jittered (:func:`_jitter_parameters`), so a branch muted by a zero gamma cannot hide a missing constraint;
    the stage is skipped (and the record says why) when the jittered copy does not give NaN-free outputs.
    Returns ``({group id: max |diff|}, record)``.
    """
    gen = torch.Generator().manual_seed(seed)
    bench = Bench(model, example_inputs, None, 1e-12)
    bad: dict[int, float] = {}
    worst = _trials(spec, bench, gen, trials, bad)
    record = VerificationRecord(
        dtype=str(bench.dtype).removeprefix("torch."), tolerance=bench.tol, scale=bench.scale,
        max_diff=worst, forwards=bench.forwards, trials=trials,
    )  # fmt: skip
    del bench  # the float64 copy of the model: hand its memory back before the caller goes on
    release_freed_memory()
    if jitter and len(bad) < len(spec.groups):
        record.jittered = _jittered_stage(model, spec, example_inputs, seed, gen, trials, bad, record)
    return bad, record


def _trials(spec: PermutationSpec, bench: Bench, gen: torch.Generator, trials: int, bad: dict[int, float]) -> float:
    worst = 0.0
    for _ in range(trials if spec.groups else 0):
        perms = {g.id: non_identity(g.size, gen) for g in spec.groups if g.id not in bad}
        worst = max(worst, _bisect(spec, bench, perms, bad))
    return worst


def _jittered_stage(
    model: nn.Module, spec: PermutationSpec, example_inputs: Any, seed: int, gen: torch.Generator, trials: int,
    bad: dict[int, float], record: VerificationRecord,
) -> str:  # fmt: skip
    try:
        bench = Bench(model, example_inputs, None, 1e-12, jitter=seed)
    except InvarianceError as e:  # e.g. a jittered parameter under a sqrt or log
        return f"skipped: {str(e)[:160]}"
    before = len(bad)
    _trials(spec, bench, gen, trials, bad)
    record.forwards += bench.forwards
    del bench
    release_freed_memory()
    return "checked" + (f" ({len(bad) - before} group(s) failed only with jittered parameters)" if len(bad) > before else "")


def _bisect(spec: PermutationSpec, bench: Bench, perms: dict[int, torch.Tensor], bad: dict[int, float]) -> float:
    """Max diff of ``perms``; records in ``bad`` the groups responsible when it exceeds the tolerance."""
    if not perms:
        return 0.0
    diff = bench.diff(spec, perms)
    if diff <= bench.tol:
        return diff
    if len(perms) == 1:
        bad.update(dict.fromkeys(perms, diff))
        return diff
    items = list(perms.items())
    half = len(items) // 2
    before = len(bad)
    _bisect(spec, bench, dict(items[:half]), bad)
    _bisect(spec, bench, dict(items[half:]), bad)
    if len(bad) == before:  # only the combination fails
        bad.update(dict.fromkeys(perms, diff))
    return diff


def require_sound(model: nn.Module, spec: PermutationSpec, example_inputs: Any, *, what: str = "merge") -> None:
    """Refuse a spec that has not passed the soundness gate on ``model``.

    A spec returned by ``infer_groups`` (gate on) carries ``spec.verification`` and passes at once; any other
    spec (``verify=False``, loaded from JSON, edited by hand) is checked here with all groups permuted at once
    (a few forward passes) and raises :class:`~fxmerge.InvarianceError` naming the offending groups.
    """
    if spec.verification is not None:
        return
    spec.check_model(model)
    bad, record = find_unsound_groups(model, spec, example_inputs)
    if bad:
        names = "; ".join(f"g{gid} ({describe_group(spec, gid)}): outputs moved by {d:.3g}" for gid, d in bad.items())
        raise InvarianceError(
            f"the spec given to {what} is not sound for this model: {names}. Infer the spec with "
            "fxmerge.infer_groups(model, example_inputs), whose soundness gate freezes such groups.",
            group=next(iter(bad)),
            max_diff=max(bad.values()),
        )
    spec.verification = record
