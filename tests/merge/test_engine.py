"""The merge engine: registered methods, typed options, the incremental weight similarity against a brute-force
reference, the fixed-point stop, aligned models and interpolation, and the import graph."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.errors import MergeError, MergeInputError
from fxmerge.match import align
from fxmerge.merge import (
    MergeOptions,
    MuDSC,
    Problem,
    Rebasin,
    Solution,
    ZipIt,
    register_method,
    resolve_method,
)
from fxmerge.merge.engine import identity_transforms
from fxmerge.merge.methods import _REGISTRY
from fxmerge.merge.spaces import find_spaces
from fxmerge.merge.transform import transform_param
from fxmerge.merge.wsim import WeightSimilarity

GEN = torch.Generator().manual_seed(0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = h + torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    m = Net().double().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return m


X = torch.randn(4, 3, 8, 8, generator=GEN, dtype=torch.float64)
DATA = [torch.randn(16, 3, 8, 8, generator=GEN, dtype=torch.float64) for _ in range(3)]


def _permuted(model: nn.Module) -> nn.Module:
    spec = fxmerge.infer_groups(model, X)
    return spec.apply(model, spec.random_perms(torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------------------ methods


def test_names_resolve_to_objects_with_their_settings() -> None:
    assert resolve_method("mudsc", alpha=0.3, matcher="zip") == MuDSC(alpha=0.3, matcher="zip")
    assert resolve_method("zipit", zip_alpha=0.2) == ZipIt(alpha=0.2)  # the flat YAML/CLI name is an alias
    assert resolve_method(Rebasin(max_sweeps=3)) == Rebasin(max_sweeps=3)
    with pytest.raises(
        MergeInputError, match=r"unknown merge option 'alpha'.*it is a setting of zipit, wzip, mudsc"
    ):
        resolve_method("rebasin", alpha=0.5)
    with pytest.raises(MergeInputError, match="unknown method 'mudcs' \\(did you mean 'mudsc'\\?\\)"):
        resolve_method("mudcs")
    with pytest.raises(MergeInputError, match="next to a method object"):
        resolve_method(MuDSC(), alpha=0.2)


def test_an_option_that_does_not_apply_is_an_error_not_dropped() -> None:
    a, b = _net(0), _net(1)
    with pytest.raises(MergeInputError, match="unknown merge option 'max_sweeps'"):
        fxmerge.merge([a, b], method="average", example_inputs=X, max_sweeps=2, progress=False)
    with pytest.raises(MergeInputError, match="both as keywords and in options="):
        fxmerge.merge([a, b], method="average", example_inputs=X, seed=1, options=MergeOptions())


def test_a_user_method_registers_and_runs_through_merge() -> None:
    @register_method("keep_model_0_order")
    @dataclass(frozen=True)
    class KeepOrder:
        needs_data: ClassVar[bool] = False
        one_to_one: ClassVar[bool] = True

        def solve(self, problem: Problem) -> Solution:
            return Solution(dict(problem.init))

    try:
        a, b = _net(0), _net(1)
        mine = fxmerge.merge(
            [a, b], method="keep_model_0_order", example_inputs=X, progress=False, reset_bn=False
        )
        avg = fxmerge.merge([a, b], method="average", example_inputs=X, progress=False, reset_bn=False)
        for (k, v), w in zip(mine.model.state_dict().items(), avg.model.state_dict().values(), strict=True):
            torch.testing.assert_close(v, w, rtol=0, atol=1e-15, msg=k)
        with pytest.raises(ValueError, match="already registered"):
            register_method("keep_model_0_order")(ZipIt)
    finally:
        _REGISTRY.pop("keep_model_0_order", None)


def test_average_needs_no_spec_and_is_the_hand_average() -> None:
    a, b = _net(0), _net(1)
    res = fxmerge.merge([a, b], method="average", example_inputs=X, progress=False, reset_bn=False)
    assert res.spec is None and res.report["groups"] == 0
    for k, v in res.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a.state_dict()[k] + b.state_dict()[k]) / 2, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------- weight similarity


def _reference_corr(spec, space, states, tr, slots=None) -> torch.Tensor:
    """The definition: per model, each unit's entries over every slot (neighbours transformed), Pearson."""
    vecs = []
    for m, st in enumerate(states):
        cols = []
        for slot in space.slots if slots is None else slots:
            w = transform_param(spec, slot.param, st[slot.param].double(), m, len(states), tr, skip=space.key)
            w = w.narrow(slot.axis, slot.offset, space.size * slot.unit).movedim(slot.axis, 0)
            cols.append(w.reshape(space.size, -1))
        vecs.append(torch.cat(cols, dim=1))
    x = torch.cat(vecs)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T


@pytest.mark.parametrize("cross_only", [True, False])
def test_incremental_similarity_matches_the_definition_as_transforms_change(cross_only: bool) -> None:
    a, b = _net(0), _net(1)
    spec = fxmerge.infer_groups(a, X)
    spaces, _ = find_spaces(spec)
    states = [m.state_dict() for m in (a, b)]
    ws = WeightSimilarity(spec, spaces, states, kind="corr", cross_only=cross_only, cache_bytes=1 << 30)
    tr = identity_transforms(spaces, 2)
    keys = list(spaces)
    for step in range(3):  # evaluate, move one neighbour, evaluate again (cached parts must be refreshed)
        for k in keys:
            got = ws(k, tr).double()
            want = _reference_corr(spec, spaces[k], states, tr)
            c = spaces[k].size
            torch.testing.assert_close(got[:c, c:], want[:c, c:], rtol=0, atol=1e-5)
            if not cross_only:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            else:
                assert float(got[:c, :c].abs().max()) == 0.0  # within-model blocks are not computed
        moved = keys[step % len(keys)]
        perm = torch.randperm(spaces[moved].size, generator=torch.Generator().manual_seed(step))
        sim = torch.zeros(2 * len(perm), 2 * len(perm), dtype=torch.float64)
        sim[torch.arange(len(perm)), len(perm) + perm] = 1.0
        tr[moved] = align(sim + sim.T, [len(perm)] * 2)


def _neighbours(spec, space) -> set:
    """Per slot: the other spaces on its parameter (what its transformed values depend on)."""
    from fxmerge.merge.spaces import occurrences

    return {
        slot: {k for lay in spec.axes[slot.param] for k, _, _ in occurrences(lay) if k != space.key}
        for slot in space.slots
    }


def _deep_mlp(seed: int, depth: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 32), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 3)).double().eval()


XM = torch.randn(8, 6, generator=GEN, dtype=torch.float64)


def test_similarity_on_ready_neighbours_reads_only_their_slots() -> None:
    a, b = _deep_mlp(0, 2), _deep_mlp(1, 2)
    spec = fxmerge.infer_groups(a, XM)
    spaces, _ = find_spaces(spec)
    states = [m.state_dict() for m in (a, b)]
    ws = WeightSimilarity(spec, spaces, states, kind="corr", cross_only=False)
    tr = identity_transforms(spaces, 2)
    partial = 0
    keys = list(spaces)
    for i, (key, space) in enumerate(spaces.items()):
        deps = _neighbours(spec, space)
        ready = frozenset(keys[:i])  # as in the greedy sweep: the spaces before this one are solved
        slots = [s for s in space.slots if deps[s] <= ready] or space.slots
        partial += len(slots) < len(space.slots)
        torch.testing.assert_close(ws(key, tr, ready).double(), _reference_corr(spec, space, states, tr, slots),
                                   rtol=0, atol=1e-5)  # fmt: skip
        everything = frozenset(k for d in deps.values() for k in d)
        torch.testing.assert_close(ws(key, tr, everything).double(), _reference_corr(spec, space, states, tr),
                                   rtol=0, atol=1e-5)  # fmt: skip
    assert partial  # the net has spaces whose similarity drops neighbour-dependent slots


@pytest.mark.parametrize("start", ["forward", "identity"])
def test_both_starts_recover_a_permuted_deep_model(start: str) -> None:
    a, x = _deep_mlp(3), XM
    spec = fxmerge.infer_groups(a, x)
    b = spec.apply(a, spec.random_perms(torch.Generator().manual_seed(4)))
    res = fxmerge.merge([a, b], method=Rebasin(start=start), example_inputs=x, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), a(x), rtol=0, atol=1e-10)
    if start == "forward":  # the greedy sweep solves every layer from already matched inputs: one check sweep
        assert res.report["sweeps"] == 2 and res.report["sweep_changes"][1] == 0


def test_weight_matching_stops_at_a_fixed_point_and_recovers_the_model() -> None:
    a = _net(0)
    b = _permuted(a)
    res = fxmerge.merge([a, b], method="rebasin", example_inputs=X, progress=False, reset_bn=False)
    changes = res.report["sweep_changes"]
    assert changes[-1] == 0 and all(c > 0 for c in changes[:-1]) and res.report["sweeps"] == len(changes)
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- alignment, interpolation


def test_aligned_models_compute_their_inputs_and_interpolation_walks_between_them() -> None:
    a, b = _net(0), _net(1)
    res = fxmerge.merge([a, b], method="mudsc", matcher="align", data=DATA, example_inputs=X, progress=False,
                        reset_bn=False)
    al = res.aligned_models
    with torch.no_grad():
        for model, aligned in zip((a, b), al, strict=True):
            torch.testing.assert_close(aligned(X), model(X), rtol=0, atol=1e-10)
        torch.testing.assert_close(res.interpolate(0.0, reset_bn=False)(X), a(X), rtol=0, atol=1e-10)
        torch.testing.assert_close(res.interpolate(1.0, reset_bn=False)(X), b(X), rtol=0, atol=1e-10)
    mid = res.interpolate(0.5, reset_bn=False).state_dict()
    for k, v in res.model.state_dict().items():  # the merge of a one-to-one method is the midpoint
        if v.is_floating_point():
            torch.testing.assert_close(mid[k], v, rtol=0, atol=1e-12, msg=k)
    seen = []
    curve = res.interpolation_curve(
        lambda m: seen.append(m) or float(m(X).square().mean()), ts=(0.0, 0.5, 1.0)
    )
    assert [p["t"] for p in curve] == [0.0, 0.5, 1.0] and len(seen) == 3
    stats = res.interpolate(0.5, data=DATA).bn1.running_mean  # BN statistics re-estimated on the data
    assert not torch.allclose(stats, mid["bn1.running_mean"])
    with pytest.raises(MergeInputError, match="t must be in"):
        res.interpolate(1.5)


def test_zipping_has_no_aligned_models() -> None:
    a, b = _net(0), _net(1)
    res = fxmerge.merge([a, b], method="zipit", data=DATA, example_inputs=X, progress=False)
    with pytest.raises(MergeError, match="one-to-one"):
        res.interpolate(0.5)


# --------------------------------------------------------------------------------------- imports


def test_merge_and_hetero_do_not_import_each_others_entry_points() -> None:
    code = "import sys, fxmerge.merge.api; print('fxmerge.hetero.api' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"  # merge() loads the hetero path only when asked for it
    hetero = Path(fxmerge.__file__).parent / "hetero"
    for path in hetero.glob(
        "*.py"
    ):  # hetero builds on the engine (problem, methods, result), never on merge()
        assert "fxmerge.merge.api" not in path.read_text(), path.name
