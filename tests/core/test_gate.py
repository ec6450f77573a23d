"""The soundness gate of ``infer_groups`` and the verified-spec requirement of merges."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxmerge
import fxmerge.infer.api  # built-in rules, registered before the table is copied
from fxmerge.gate import find_unsound_groups, require_sound
from fxmerge.infer.registry import RULES


def _wrong_flip_rules():
    """A rule table whose flip rule wrongly claims flip is element-wise (flip reverses the axis)."""
    table = RULES.copy()
    fxmerge.rule(torch.flip, "Tensor.flip", key="wrong_flip", table=table, replace=True)(
        lambda ctx, call: ctx.elementwise(call, [call.args[0]])
    )
    return table


def _live_init(model: nn.Module, seed: int = 0) -> None:
    """Deterministic weights with positive biases: no ReLU unit is dead on X, so every permutation shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


class Flipper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)
        _live_init(self)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)).flip(-1))


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


def test_gate_freezes_the_unsound_group_warns_and_reverifies():
    model = Flipper()
    unverified = fxmerge.infer_groups(model, X, rules=_wrong_flip_rules(), verify=False)
    assert unverified.verification is None
    with pytest.raises(fxmerge.InvarianceError):
        fxmerge.verify_invariance(model, unverified, X)
    with pytest.warns(fxmerge.UnsoundGroupWarning, match=r"1 inferred group\(s\) failed") as rec:
        spec = fxmerge.infer_groups(model, X, rules=_wrong_flip_rules())
    assert "b.weight[0]" in str(rec[0].message)
    assert len(spec.groups) == len(unverified.groups) - 1  # only the flipped group is frozen
    frozen = {(f.param, f.axis): f.reason for f in spec.coverage.frozen}
    assert frozen[("b.weight", 0)].startswith("failed verification")
    assert ("a.weight", 0) not in frozen  # the sound group survives
    assert spec.verification.frozen and spec.verification.forwards >= 3  # reference + one pass per trial
    fxmerge.verify_invariance(model, spec, X)


def test_gate_passes_sound_specs_silently():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = fxmerge.infer_groups(model, X)
    rec = spec.verification
    assert rec.dtype == "float64" and rec.frozen == [] and rec.max_diff <= rec.tolerance
    assert rec.tolerance == pytest.approx(1e-12 + 1e-6 * rec.scale)
    # the reference and one pass per trial, on the model's weights and again on jittered ones (determinism is
    # checked only on failure)
    assert rec.forwards == 2 * (1 + rec.trials) and rec.jittered == "checked"


def test_bisection_finds_exactly_the_bad_groups():
    model = Flipper()
    spec = fxmerge.infer_groups(model, X, rules=_wrong_flip_rules(), verify=False)
    bad, record = find_unsound_groups(model, spec, X, jitter=False)
    assert [spec.group(g).size for g in bad] == [6] and all(d > 1e-3 for d in bad.values())
    assert record.forwards <= 2 + 2 * 3  # reference, one determinism check (a trial failed), one pass per bisection step


def test_merge_refuses_an_unverified_unsound_spec():
    model = Flipper()
    bad = fxmerge.infer_groups(model, X, rules=_wrong_flip_rules(), verify=False)
    other = Flipper()
    with pytest.raises(fxmerge.InvarianceError, match="not sound for this model"):
        fxmerge.merge([model, other], method="average", spec=bad, example_inputs=X)


def test_json_spec_is_verified_before_use():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = fxmerge.PermutationSpec.from_json(fxmerge.infer_groups(model, X).to_json())
    assert spec.verification is None
    require_sound(model, spec, X)
    assert spec.verification is not None and spec.verification.max_diff <= spec.verification.tolerance


class Float32Constant(nn.Module):
    """Builds a float32 tensor in forward: a float64 copy of the model cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        scale = torch.full((8,), 0.5)  # always float32
        return self.b(torch.relu(self.a(x)) * scale.to(torch.float32).expand(x.shape[0], 8).float()).float()


def test_verification_falls_back_to_float32():
    model = Float32Constant()
    report = fxmerge.verify_invariance(model, fxmerge.infer_groups(model, X), X)
    spec = fxmerge.infer_groups(model, X)
    assert spec.verification.dtype in ("float32", "float64")
    assert report.dtype in ("float32", "float64") and report.tolerance >= 1e-6 * report.scale


class Noisy(nn.Module):
    """Fresh noise in eval mode: every permutation check fails, and the failure is blamed on the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + torch.randn(x.shape[0], 3)


def test_nondeterministic_forward_is_named():
    with pytest.raises(fxmerge.InvarianceError, match=r"not deterministic.*verify=False"):
        fxmerge.infer_groups(Noisy(), X)
    assert fxmerge.infer_groups(Noisy(), X, verify=False).verification is None


class TwoHeads(nn.Module):
    """Outputs a hidden feature map (free with free_outputs=True) and a logit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return {"features": h.view(x.shape[0], 3, 2), "logits": self.c(h)}


def test_free_outputs_are_compared_after_permuting_them():
    model = TwoHeads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        free = fxmerge.infer_groups(model, X, free_outputs=True)
    pinned = fxmerge.infer_groups(model, X)
    assert [g.size for g in pinned.groups] == [8]  # outputs pinned: only the first hidden layer
    assert sorted(g.size for g in free.groups) == [2, 6, 8]  # free: the viewed features and logits too
    assert free.verification.max_diff <= free.verification.tolerance
    back = fxmerge.PermutationSpec.from_json(free.to_json())
    assert back.output_layouts == free.output_layouts and back.output_floats == [True, True]


class MaskedFlipper(Flipper):
    """Flipper whose first output column is masked to -inf, as masked logits are."""

    def forward(self, x):
        return super().forward(x).masked_fill(torch.tensor([True, False, False]), float("-inf"))


def test_gate_sees_through_infinite_outputs():
    """An -inf in the outputs once made the tolerance infinite, so every group passed: the unsound flipped group
    must still be caught, and the sound one kept."""
    with pytest.warns(fxmerge.UnsoundGroupWarning, match=r"1 inferred group\(s\) failed"):
        spec = fxmerge.infer_groups(MaskedFlipper(), X, rules=_wrong_flip_rules())
    frozen = {(f.param, f.axis): f.reason for f in spec.coverage.frozen}
    assert frozen[("b.weight", 0)].startswith("failed verification")
    assert ("a.weight", 0) not in frozen
    sound = fxmerge.infer_groups(MaskedFlipper(), X)  # the built-in flip rule: nothing to freeze
    fxmerge.verify_invariance(MaskedFlipper(), sound, X)


class NaNColumn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * torch.tensor([float("nan"), 1.0, 1.0], dtype=x.dtype)


def test_nan_outputs_are_a_clear_error_not_frozen_groups():
    with pytest.raises(fxmerge.InvarianceError, match=r"output 0 \(shape \(5, 3\)\) contains NaN in 5 of 15"):
        fxmerge.infer_groups(NaNColumn(), X)


class MutedFlipper(Flipper):
    """The flip sits in a residual branch scaled by a zero-initialised gamma (as in zero_init_last ResNets)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(6))
        self.skip = nn.Linear(8, 6)
        _live_init(self.skip, seed=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        branch = torch.relu(self.b(h)).flip(-1) * self.gamma
        return self.c(self.skip(h) + branch)


def test_gate_jitters_parameters_so_a_muted_branch_cannot_hide_a_missing_constraint():
    model = MutedFlipper()
    unverified = fxmerge.infer_groups(model, X, rules=_wrong_flip_rules(), verify=False)
    bad, _ = find_unsound_groups(model, unverified, X, jitter=False)
    assert bad == {}  # on the model's own weights the branch contributes exactly zero: the flaw is invisible
    with pytest.warns(fxmerge.UnsoundGroupWarning, match=r"1 inferred group\(s\) failed"):
        spec = fxmerge.infer_groups(model, X, rules=_wrong_flip_rules())
    frozen = {(f.param, f.axis): f.reason for f in spec.coverage.frozen}
    assert frozen[("b.weight", 0)].startswith("failed verification")
    assert ("a.weight", 0) not in frozen
    assert torch.equal(model.gamma, torch.zeros(6))  # the jitter works on a copy


class SqrtScale(nn.Module):
    """A parameter under a square root: a jittered copy would give NaN, so that stage is skipped, not failed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.var = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * torch.sqrt(self.var))


def test_jittered_stage_is_skipped_when_the_jittered_copy_gives_nan():
    spec = fxmerge.infer_groups(SqrtScale(), X)
    assert [g.size for g in spec.groups] == [8]
    assert spec.verification.jittered.startswith("skipped: the model's output 0")
