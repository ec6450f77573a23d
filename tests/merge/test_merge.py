"""``fxmerge.merge``: exact recovery of permuted copies, averaging, group integrity, N = 3, determinism,
untouched inputs and error messages.

Recovery tests run in float64. ``B = P(A)`` (``P`` a random permutation of every group of the spec, nested
GQA groups included) is merged with ``A``: a correct matcher finds ``P^-1``, and the average of ``A`` and
``P^-1(B) = A`` is ``A`` itself, so the merged outputs equal A's up to float64 round-off (atol 1e-8).
Zipping two identical units also gives the unit back. The zoo-wide version of this test (transformers,
torchvision, timm) is ``tests/merge/test_recovery_zoo.py``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxmerge
from fxmerge.passes.bn import reset_bn_stats
from fxmerge.testing import zoo
from fxmerge.testing.archs import CNNSpec, build_spec

ATOL = 1e-8  # float64 round-off allowance, relative to the output scale
ALIGN = [("rebasin", {}), ("act_align", {}), ("mudsc", {"matcher": "align"})]
ZIP = [("zipit", {}), ("wzip", {}), ("mudsc", {"matcher": "zip"})]
ALL_METHODS = [("average", {}), *ALIGN, *ZIP]
# a CNN with a grouped conv (4 groups) feeding a dense conv: grouped-conv block structure without nesting
GROUPED_CNN = CNNSpec(
    in_ch=3,
    size=8,
    stem=8,
    blocks=(("conv", 16, 3, 4, 0, "relu"), ("conv", 12, 3, 1, 0, "relu")),
    head="gap",
    classes=5,
    seed=0,
)


def method_id(entry: tuple[str, dict[str, Any]]) -> str:
    method, options = entry
    return "-".join([method, *map(str, options.values())])


@dataclass(frozen=True)
class Case:
    """A float64 model, its example inputs and 4 batches of 32 inputs for statistics and comparisons."""

    model: nn.Module
    example_inputs: tuple
    data: list[torch.Tensor]


def _batches(
    example: torch.Tensor, vocab: int, seed: int, n_batches: int = 4, batch: int = 32
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        return [torch.randn(shape, generator=g, dtype=example.dtype) for _ in range(n_batches)]
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n_batches)]


def _case(model: nn.Module, example_inputs: tuple, vocab: int = 64) -> Case:
    model = model.double().eval()
    example_inputs = zoo.cast_inputs(example_inputs, torch.float64)
    return Case(model, example_inputs, _batches(example_inputs[0], vocab, seed=101))


def _resnet20a_8px(seed: int) -> tuple[nn.Module, tuple]:
    model, _ = zoo.build("resnet20a", seed)  # residual CNN with BatchNorm; 8x8 inputs keep it fast
    return model, (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


BUILDERS: dict[str, Callable[[int], tuple[nn.Module, tuple]]] = {
    "mlp": lambda seed: zoo.build("mlp", seed),
    "resnet20a": _resnet20a_8px,  # residual + BatchNorm + option-A pad shortcuts
    "vgg_flatten": lambda seed: zoo.build("vgg_flatten", seed),  # BatchNorm, flatten into Linear
    "unet_small": lambda seed: zoo.build("unet_small", seed),  # GroupNorm(4), concat skips
    "grouped_cnn": lambda seed: build_spec(GROUPED_CNN),  # grouped conv (seed ignored)
    "nanogpt": lambda seed: zoo.build("nanogpt", seed),  # fused qkv, 4 SDPA heads
    "vit_small": lambda seed: zoo.build("vit_small", seed),  # nn.MultiheadAttention leaf, 4 heads
    "tiny_llama": lambda seed: zoo.build("tiny_llama", seed),  # GQA: kv heads x query heads x head dims
}
RECOVERY_MODELS = list(BUILDERS)


@functools.cache
def case(name: str, seed: int = 0) -> Case:
    return _case(*BUILDERS[name](seed))


def outputs(model: nn.Module, data: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in data]


def max_diff(model: nn.Module, reference: nn.Module, data: list[torch.Tensor]) -> float:
    pairs = zip(outputs(model, data), outputs(reference, data), strict=True)
    return max(float((a - b).abs().max()) for a, b in pairs)


def scale(model: nn.Module, data: list[torch.Tensor]) -> float:
    return max(1.0, max(float(y.abs().max()) for y in outputs(model, data)))


def assert_recovers(model: nn.Module, c: Case) -> None:
    diff, tol = max_diff(model, c.model, c.data), ATOL * scale(c.model, c.data)
    assert diff <= tol, f"merged outputs differ from the original by {diff:.3g} (tolerance {tol:.1g})"


def merge(models: list[nn.Module], c: Case, method: str, **options: Any) -> fxmerge.MergeResult:
    options.setdefault("reset_bn", False)
    return fxmerge.merge(
        models, method=method, data=c.data, example_inputs=c.example_inputs, progress=False, **options
    )


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def permuted(name: str, seed: int = 3) -> nn.Module:
    """A copy of ``case(name)`` with every group permuted at random (a symmetry: same outputs)."""
    c = case(name)
    spec = fxmerge.infer_groups(c.model, c.example_inputs)
    assert len(spec), f"{name}: no permutation group"
    return spec.apply(c.model, spec.random_perms(torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("name", RECOVERY_MODELS)
def test_permuted_copy_is_a_different_point_with_the_same_function(name: str) -> None:
    """Precondition of the recovery tests: the permutation moves weights but keeps outputs, and averaging
    without matching does NOT give the model back (so recovery below is not trivial)."""
    c = case(name)
    b = permuted(name)
    moved = max(
        float((x - y).abs().max())
        for x, y in zip(state(c.model).values(), state(b).values(), strict=True)
        if x.is_floating_point()
    )
    assert moved > 1e-2
    assert_recovers(b, c)
    averaged = merge([c.model, b], c, "average").model
    diff = max_diff(averaged, c.model, c.data)
    assert diff > 1e-3 * scale(c.model, c.data), f"plain averaging already gives the model back ({diff:.3g})"


@pytest.mark.parametrize("entry", ALIGN, ids=method_id)
@pytest.mark.parametrize("name", RECOVERY_MODELS)
def test_align_methods_recover_a_permuted_copy(name: str, entry: tuple[str, dict]) -> None:
    c = case(name)
    method, options = entry
    result = merge([c.model, permuted(name)], c, method, **options)
    assert_recovers(result.model, c)


@pytest.mark.parametrize("entry", ZIP, ids=method_id)
@pytest.mark.parametrize("name", RECOVERY_MODELS)
def test_zip_methods_recover_a_permuted_copy(name: str, entry: tuple[str, dict]) -> None:
    """Zipping a model with its permuted copy pairs each unit with its twin (similarity 1, the maximum),
    so the merged model is the original."""
    c = case(name)
    method, options = entry
    result = merge([c.model, permuted(name)], c, method, **options)
    assert_recovers(result.model, c)


@pytest.mark.parametrize("name", RECOVERY_MODELS)
def test_every_group_is_carried_by_a_merge_space(name: str) -> None:
    """No group is left at the identity: nested GQA groups (kv heads x query heads x head dims), shared inner
    groups and fused per-head layouts are all matched, so every permutation above is recoverable."""
    c = case(name)
    result = merge([c.model, c.model], c, "average")
    assert result.report["identity_groups"] == []


def test_reset_bn_on_recovered_model_equals_reset_of_the_original() -> None:
    """With ``reset_bn=True`` the recovered weights get BatchNorm statistics re-estimated on ``data``:
    exactly what :func:`reset_bn_stats` gives for the original model."""
    c = case("resnet20a")
    result = merge([c.model, permuted("resnet20a")], c, "rebasin", reset_bn=True)
    expected = reset_bn_stats(c.model, c.data, progress=False)
    diff, changed = max_diff(result.model, expected, c.data), max_diff(expected, c.model, c.data)
    assert diff <= ATOL * scale(expected, c.data), f"differs from the reset original by {diff:.3g}"
    assert changed > 1e-3, "the reset did not change the outputs: the test would prove nothing"


# ----------------------------------------------------------------------------------------------- average


@pytest.mark.parametrize("name", ["mlp", "vgg_flatten", "nanogpt"])
def test_average_of_two_copies_is_the_model(name: str) -> None:
    c = case(name)
    result = merge([c.model, copy.deepcopy(c.model)], c, "average")
    for key, value in state(c.model).items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", ["mlp", "vgg_flatten", "nanogpt"])
@pytest.mark.parametrize("n_models", [2, 3])
def test_average_is_the_parameter_mean(name: str, n_models: int) -> None:
    models = [case(name, seed).model for seed in range(n_models)]
    result = merge(models, case(name), "average")
    states = [state(m) for m in models]
    for key, merged in result.model.state_dict().items():
        # floats: the mean; integer buffers (BatchNorm's num_batches_tracked): model 0's value
        expected = sum(s[key] for s in states) / n_models if merged.is_floating_point() else states[0][key]
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12, msg=key)


# --------------------------------------------------------------------------------------- group integrity


def groups_intact(detail: Any, n_models: int) -> bool:
    """Every original block (head / norm group) of every model lands in one merged block, and every
    merged block draws on at most one block per model."""
    unit = detail.size // detail.n_blocks
    merged_unit = detail.matching.width // detail.n_blocks
    for m in range(n_models):
        target = detail.matching.assignment(m)
        sources: dict[int, set[int]] = {}
        for u, t in enumerate(target.tolist()):
            if t >= 0:
                sources.setdefault(t // merged_unit, set()).add(u // unit)
        blocks_of = [
            set((target[b * unit : (b + 1) * unit] // merged_unit).tolist()) - {-1}
            for b in range(detail.n_blocks)
        ]
        if any(len(s) > 1 for s in sources.values()) or any(len(b) > 1 for b in blocks_of):
            return False
    return True


@pytest.mark.parametrize(
    "entry", [("mudsc", {"matcher": "align"}), ("mudsc", {"matcher": "zip"}), ("zipit", {})], ids=method_id
)
@pytest.mark.parametrize("name", ["nanogpt", "vit_small", "unet_small"])
def test_group_matching_never_splits_a_head_or_norm_group(name: str, entry: tuple[str, dict]) -> None:
    """Two independently initialised models: the final matching of every structured space (attention
    heads, GroupNorm groups) keeps each head/group whole."""
    c = case(name)
    method, options = entry
    result = merge([c.model, case(name, 1).model], c, method, **options)
    structured = [d for d in result.details.values() if d.n_blocks > 1]
    assert structured, "no structured (head / GroupNorm) space was merged"
    for detail in structured:
        assert groups_intact(detail, 2), detail.name


def test_report_lists_every_merge_space() -> None:
    """nanogpt has two structured spaces per layer (q/k heads and v heads, one outer head group): the
    per-space report must name both, not collapse them into one entry."""
    c = case("nanogpt")
    result = merge([c.model, case("nanogpt", 1).model], c, "rebasin")
    assert len(result.details) == result.report["spaces"]
    assert len(result.report["similarity"]) == result.report["spaces"]


# --------------------------------------------------------------------------------- N = 3, seeds, inputs


THREE_WAY = [
    ("rebasin", {}),
    ("act_align", {}),
    ("mudsc", {"matcher": "align"}),
    ("zipit", {"zip_alpha": 1.0}),
    ("mudsc", {"matcher": "zip", "zip_alpha": 1.0}),
]


@pytest.mark.parametrize("entry", THREE_WAY, ids=method_id)
@pytest.mark.parametrize("name", ["mlp", "nanogpt"])
def test_three_permuted_copies_recover_the_model(name: str, entry: tuple[str, dict]) -> None:
    """Three copies: align maps both onto the anchor. Zip uses ``zip_alpha=1``: with ZipIt's default decay
    (0.5) a merged twin pair's similarity to the third twin drops to 0.5, and the greedy may then merge the
    third copy elsewhere; without decay the third twin stays at similarity 1 and joins its pair."""
    c = case(name)
    method, options = entry
    result = merge([c.model, permuted(name, 3), permuted(name, 4)], c, method, **options)
    assert result.report["n_models"] == 3
    assert_recovers(result.model, c)


@pytest.mark.parametrize(
    "entry", [("mudsc", {"matcher": "align"}), ("mudsc", {"matcher": "zip"})], ids=method_id
)
def test_three_different_models_merge_to_a_finite_model(entry: tuple[str, dict]) -> None:
    models = [case("nanogpt", seed).model for seed in range(3)]
    method, options = entry
    result = merge(models, case("nanogpt"), method, **options)
    for key, value in result.model.state_dict().items():
        assert value.shape == models[0].state_dict()[key].shape, key
    assert all(bool(torch.isfinite(y).all()) for y in outputs(result.model, case("nanogpt").data))


@pytest.mark.parametrize(
    "entry", [("rebasin", {}), ("mudsc", {"matcher": "align"}), ("mudsc", {"matcher": "zip"})], ids=method_id
)
def test_same_seed_gives_identical_weights(entry: tuple[str, dict]) -> None:
    c = case("nanogpt")
    method, options = entry
    models = [c.model, case("nanogpt", 1).model]
    first, second = (merge(models, c, method, seed=7, **options) for _ in range(2))
    assert first.report["sweep_values"] == second.report["sweep_values"]
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


@pytest.mark.parametrize("entry", ALL_METHODS, ids=method_id)
def test_input_models_are_not_modified(entry: tuple[str, dict]) -> None:
    """Models in train mode with BatchNorm: a merge (with the BN reset) must not touch their weights,
    running statistics or train/eval flags."""
    models = [copy.deepcopy(case("vgg_flatten", seed).model).train() for seed in range(2)]
    models[1].features[1].eval()  # a mixed flag pattern must survive too
    before = [state(m) for m in models]
    flags = [[mod.training for mod in m.modules()] for m in models]
    method, options = entry
    merge(models, case("vgg_flatten"), method, reset_bn=True, **options)
    for m, saved, saved_flags in zip(models, before, flags, strict=True):
        for key, value in m.state_dict().items():
            assert torch.equal(value, saved[key]), key
        assert [mod.training for mod in m.modules()] == saved_flags


def test_every_data_format_gives_the_same_merge() -> None:
    """Tensors, (input, label) tuples, a DataLoader and dicts of keyword inputs are the same data."""
    c = case("mlp")
    models = [c.model, case("mlp", 1).model]
    x = torch.cat(c.data)
    labels = torch.zeros(len(x), dtype=torch.long)
    loader = DataLoader(TensorDataset(x, labels), batch_size=32)
    formats = [[(b, labels[:32]) for b in c.data], loader, [{"x": b} for b in c.data]]
    reference = merge(models, c, "mudsc", matcher="zip").model.state_dict()
    for data in formats:
        merged = fxmerge.merge(
            models, method="mudsc", matcher="zip", data=data, example_inputs=c.example_inputs, progress=False
        ).model.state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-12, msg=key)


# ------------------------------------------------------------------------------------------------ errors


def _nan_model() -> nn.Module:
    model = copy.deepcopy(case("mlp", 1).model)
    with torch.no_grad():
        model.fc2.weight[3, 1] = math.nan
    return model


def _inf_model() -> nn.Module:
    model = copy.deepcopy(case("mlp", 1).model)
    with torch.no_grad():
        model.fc3.bias[0] = math.inf
    return model


def _mlp_kwargs(**overrides: Any) -> dict[str, Any]:
    c = case("mlp")
    kwargs = {
        "models": [c.model, case("mlp", 1).model],
        "method": "mudsc",
        "data": c.data,
        "example_inputs": c.example_inputs,
        "progress": False,
    }
    kwargs.update(overrides)
    return kwargs


BAD_INPUTS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "one model": (lambda: _mlp_kwargs(models=[case("mlp").model]), r"at least 2 models"),
    "no list": (lambda: _mlp_kwargs(models=case("mlp").model), r"at least 2 models"),
    "non-module": (
        lambda: _mlp_kwargs(models=[case("mlp").model, case("mlp").model.state_dict()]),
        r"models\[1\] is a OrderedDict, not a torch.nn.Module",
    ),
    "other width": (
        lambda: _mlp_kwargs(models=[case("mlp").model, zoo.MLP(hidden=16).double()]),
        r"model 1 does not have model 0's architecture.*fc1.weight",
    ),
    "other architecture": (
        lambda: _mlp_kwargs(models=[case("mlp").model, case("vgg_flatten").model]),
        r"model 1 does not have model 0's architecture",
    ),
    "NaN weight": (
        lambda: _mlp_kwargs(models=[case("mlp").model, _nan_model()]),
        r"model 1 has NaN.*'fc2.weight'",
    ),
    "Inf bias": (
        lambda: _mlp_kwargs(models=[case("mlp").model, _inf_model()]),
        r"model 1 has NaN/Inf.*'fc3.bias'",
    ),
    "unknown method": (lambda: _mlp_kwargs(method="mean"), r"unknown method 'mean'; choose one of average"),
    "act_align without data": (lambda: _mlp_kwargs(method="act_align", data=None), r"'act_align' needs data"),
    "zipit without data": (lambda: _mlp_kwargs(method="zipit", data=None), r"'zipit' needs data"),
    "mudsc without data": (lambda: _mlp_kwargs(data=None), r"'mudsc' needs data"),
    "alpha > 1": (lambda: _mlp_kwargs(alpha=1.5), r"alpha=1.5: Input should be less than or equal to 1"),
    "alpha < 0": (lambda: _mlp_kwargs(alpha=-0.1), r"alpha=-0.1: Input should be greater than or equal to 0"),
    "alpha NaN": (lambda: _mlp_kwargs(alpha=math.nan), r"alpha=nan: Input should be a finite number"),
    "unknown matcher": (lambda: _mlp_kwargs(matcher="greedy"), r"matcher='greedy': Input should be 'align' or 'zip'"),
    "data not iterable": (lambda: _mlp_kwargs(data=5), r"data must be an iterable of batches"),
    "wrong batch shape": (
        lambda: _mlp_kwargs(data=[torch.randn(8, 10, dtype=torch.float64)]),
        r"batch does not fit the model",
    ),
    "wrong batch shape in (x, y) loader": (
        lambda: _mlp_kwargs(method="zipit", data=[(torch.randn(8, 10, dtype=torch.float64), torch.zeros(8))]),
        r"batch does not fit the model",
    ),
    "wrong batch shape, BN reset only": (
        lambda: {
            "models": [case("vgg_flatten").model, case("vgg_flatten", 1).model],
            "method": "average",
            "data": [torch.randn(4, 3, 16, 16, dtype=torch.float64)],
            "example_inputs": case("vgg_flatten").example_inputs,
            "progress": False,
        },
        r"batch",
    ),
    "empty data": (lambda: _mlp_kwargs(data=[]), r"data"),
}


@pytest.mark.parametrize("label", list(BAD_INPUTS))
def test_bad_input_raises_a_readable_merge_error(label: str) -> None:
    make_kwargs, pattern = BAD_INPUTS[label]
    kwargs = make_kwargs()
    models = kwargs.pop("models")
    with pytest.raises(fxmerge.MergeError, match=pattern) as info:
        fxmerge.merge(models, **kwargs)
    message = str(info.value)
    assert len(message) < 1200 and "Traceback" not in message, message


def test_wrong_example_inputs_raise_an_fxmerge_error() -> None:
    c = case("mlp")
    with pytest.raises(fxmerge.FxmergeError):
        fxmerge.merge(
            [c.model, case("mlp", 1).model],
            method="average",
            example_inputs=(torch.randn(2, 5, dtype=torch.float64),),
            progress=False,
        )
