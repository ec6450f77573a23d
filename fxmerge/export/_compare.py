"""Numeric comparison of exported outputs against PyTorch.

An element passes when ``|got - want| <= atol + rtol * |want|`` (``numpy.allclose`` semantics); NaN matches
NaN and an infinity matches the same infinity. The reported relative difference is the largest
``|got - want| / |want|`` over elements with ``|want| > atol`` (smaller references are judged by atol alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fxmerge.errors import ExportError


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one comparison run (example inputs or one random batch)."""

    label: str
    batch_size: int | None
    max_abs_diff: float
    max_rel_diff: float
    worst_output: str
    passed: bool


def compare_outputs(
    names: Sequence[str],
    got: Sequence[np.ndarray],
    want: Sequence[torch.Tensor],
    *,
    atol: float,
    rtol: float,
    label: str,
    batch_size: int | None,
) -> CheckResult:
    """Compare ``got`` (exported program) to ``want`` (PyTorch) output by output."""
    if len(got) != len(want):
        raise ExportError(
            f"{label}: the exported model returns {len(got)} outputs but PyTorch returns {len(want)} "
            f"({', '.join(names)})."
        )
    results = [
        (name, *_diff(name, np.asarray(actual), expected, atol, rtol, label))
        for name, actual, expected in zip(names, got, want, strict=True)
    ]
    failing = [r for r in results if not r[3]]
    worst = max(failing or results, key=lambda r: r[1])
    return CheckResult(
        label=label,
        batch_size=batch_size,
        max_abs_diff=max(r[1] for r in results),
        max_rel_diff=max(r[2] for r in results),
        worst_output=worst[0],
        passed=not failing,
    )


def _diff(
    name: str, actual: np.ndarray, expected: torch.Tensor, atol: float, rtol: float, label: str
) -> tuple[float, float, bool]:
    want = expected.detach().to("cpu", torch.float64).numpy()
    if actual.shape != want.shape:
        raise ExportError(
            f"{label}: output {name!r} has shape {tuple(actual.shape)} in the exported model but "
            f"{tuple(want.shape)} in PyTorch. If only dim 0 differs, the export fixed the batch size: "
            "pass dynamic_batch=False or remove the batch-size dependence from the model."
        )
    got = actual.astype(np.float64)
    if got.size == 0:
        return 0.0, 0.0, True
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - want)
    diff[np.isnan(got) & np.isnan(want)] = 0.0
    diff[np.isinf(got) & (got == want)] = 0.0
    diff[np.isnan(diff)] = np.inf
    scale = np.abs(np.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0))
    ok = bool(np.all(diff <= atol + rtol * scale))
    significant = scale > atol
    rel = float((diff[significant] / scale[significant]).max()) if significant.any() else 0.0
    return float(diff.max()), rel, ok
