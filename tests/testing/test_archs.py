"""The random-architecture strategies: generated models run, are deterministic in their spec and cover the
structures they advertise; the manual-attention and fused-qkv variants agree with SDPA / separate projections."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from torch import nn

from fxmerge.testing import archs

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
ALL_SPECS = st.one_of(archs.mlp_specs(), archs.cnn_specs(), archs.transformer_specs())


def _expected_shape(spec: archs.MLPSpec | archs.CNNSpec | archs.TransformerSpec) -> tuple[int, ...]:
    if isinstance(spec, archs.MLPSpec):
        return (2, spec.out_dim)
    if isinstance(spec, archs.CNNSpec):
        return (2, spec.classes)
    return (2, spec.seq_len, spec.vocab)


@SETTINGS
@given(ALL_SPECS)
def test_generated_models_run_trace_and_are_finite(spec) -> None:
    rng_before = torch.get_rng_state()
    model, inputs = archs.build_spec(spec)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        out = model(*inputs)
        traced = torch.fx.symbolic_trace(model)(*inputs)
    assert out.shape == _expected_shape(spec)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(traced, out, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(archs.architectures())
def test_architectures_strategy_yields_runnable_pairs(pair) -> None:
    model, inputs = pair
    assert isinstance(model, nn.Module) and isinstance(inputs, tuple)
    with torch.no_grad():
        assert torch.isfinite(model(*inputs)).all()


@SETTINGS
@given(ALL_SPECS)
def test_same_spec_same_model_other_seed_other_weights(spec) -> None:
    model, inputs = archs.build_spec(spec)
    again, again_inputs = archs.build_spec(spec)
    assert all(torch.equal(a, b) for a, b in zip(inputs, again_inputs, strict=True))
    state, again_state = model.state_dict(), again.state_dict()
    assert state.keys() == again_state.keys()
    assert all(torch.equal(state[key], again_state[key]) for key in state)
    with torch.no_grad():
        assert torch.equal(model(*inputs), again(*again_inputs))
    other, _ = archs.build_spec(dataclasses.replace(spec, seed=spec.seed + 1))
    pairs = zip(model.parameters(), other.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


def _find(strategy, predicate):
    """First generated example satisfying ``predicate`` (no shrinking: we only need a witness)."""
    return find(strategy, predicate, settings=settings(max_examples=2000, database=None, phases=[Phase.generate]))


def _conv_blocks_with_inputs(spec: archs.CNNSpec) -> list[tuple[int, tuple]]:
    """(input channels, block) for every "conv" block, by tracking channel counts through the spec."""
    channels, found = spec.stem, []
    for block in spec.blocks:
        if block[0] == "conv":
            found.append((channels, block))
            channels = block[1]
        elif block[0] == "concat":
            channels = block[1] + block[2]
    return found


def _modules(spec, cls):
    return [m for m in archs.build_spec(spec)[0].modules() if isinstance(m, cls)]


def test_cnn_specs_cover_grouped_depthwise_and_groupnorm() -> None:
    grouped = _find(archs.cnn_specs(), lambda s: any(1 < b[3] < c for c, b in _conv_blocks_with_inputs(s)))
    assert any(1 < c.groups < c.in_channels for c in _modules(grouped, nn.Conv2d))
    depthwise = _find(archs.cnn_specs(), lambda s: any(b[0] == "conv" and b[3] == b[1] > 2 for b in s.blocks))
    assert any(c.groups == c.in_channels == c.out_channels > 2 for c in _modules(depthwise, nn.Conv2d))
    norm_groups = _find(archs.cnn_specs(), lambda s: any(b[0] == "conv" and 1 < b[4] < b[1] for b in s.blocks))
    assert any(1 < g.num_groups < g.num_channels for g in _modules(norm_groups, nn.GroupNorm))
    batchnorm = _find(archs.cnn_specs(), lambda s: any(b[0] != "pool" and -1 in b for b in s.blocks))
    assert _modules(batchnorm, nn.BatchNorm2d)


def test_cnn_specs_cover_residual_concat_pool_and_flatten() -> None:
    spec = _find(
        archs.cnn_specs(),
        lambda s: s.head == "flatten" and {"residual", "concat", "pool"} <= {b[0] for b in s.blocks},
    )
    model, (image,) = archs.build_spec(spec)
    assert any(type(m).__name__ == "_Residual" for m in model.modules())
    assert any(type(m).__name__ == "_Concat" for m in model.modules())
    pools = sum(b[0] == "pool" for b in spec.blocks)
    spatial = spec.size // 2**pools
    assert model.head.in_features % (spatial * spatial) == 0
    assert model(image).shape == (2, spec.classes)


def test_transformer_specs_cover_gqa_variants() -> None:
    fused_gqa = _find(archs.transformer_specs(), lambda s: s.fused_qkv and s.sdpa and s.n_heads > s.n_kv_heads > 1)
    model, _ = archs.build_spec(fused_gqa)
    dim, kv = fused_gqa.n_heads * fused_gqa.head_dim, fused_gqa.n_kv_heads * fused_gqa.head_dim
    assert model.blocks[0].attn.qkv.weight.shape == (dim + 2 * kv, dim)
    tied = _find(archs.transformer_specs(), lambda s: s.tied and not s.pre_ln and s.norm == "rms")
    tied_model, _ = archs.build_spec(tied)
    assert tied_model.lm_head.weight is tied_model.tok.weight
    untied_model, _ = archs.build_spec(dataclasses.replace(tied, tied=False))
    assert untied_model.lm_head.weight is not untied_model.tok.weight


@SETTINGS
@given(archs.transformer_specs())
def test_manual_attention_matches_sdpa(spec) -> None:
    """Same spec and seed give the same weights, so the manual softmax path must reproduce SDPA (GQA, causal)."""
    sdpa, inputs = archs.build_spec(dataclasses.replace(spec, sdpa=True))
    manual, _ = archs.build_spec(dataclasses.replace(spec, sdpa=False))
    with torch.no_grad():  # float64: the two paths differ only by rounding
        torch.testing.assert_close(manual.double()(*inputs), sdpa.double()(*inputs), rtol=1e-9, atol=1e-10)


@SETTINGS
@given(archs.transformer_specs())
def test_fused_qkv_matches_separate_projections(spec) -> None:
    separate, inputs = archs.build_spec(dataclasses.replace(spec, fused_qkv=False))
    fused, _ = archs.build_spec(dataclasses.replace(spec, fused_qkv=True))
    state = {}
    for key, value in separate.state_dict().items():
        if ".attn.q." in key:
            k_key, v_key = key.replace(".attn.q.", ".attn.k."), key.replace(".attn.q.", ".attn.v.")
            stacked = [value, separate.state_dict()[k_key], separate.state_dict()[v_key]]
            state[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(stacked, dim=0)
        elif ".attn.k." not in key and ".attn.v." not in key:
            state[key] = value
    fused.load_state_dict(state)
    with torch.no_grad():  # float64: the fused and separate matmuls differ only by rounding
        torch.testing.assert_close(fused.double()(*inputs), separate.double()(*inputs), rtol=1e-9, atol=1e-10)


@SETTINGS
@given(archs.mlp_specs())
def test_mlp_matches_dense_computation(spec) -> None:
    model, (x,) = archs.build_spec(spec)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    norms = [m for m in model if isinstance(m, nn.LayerNorm)]
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "none": lambda t: t}[spec.act]
    h = x
    for i, linear in enumerate(linears[:-1]):
        h = h @ linear.weight.T + (linear.bias if spec.bias else 0.0)
        h = act(h)
        if spec.layer_norm:
            mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + norms[i].eps) * norms[i].weight + norms[i].bias
    expected = h @ linears[-1].weight.T + linears[-1].bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert len(linears) == len(spec.widths) + 1


@pytest.mark.parametrize("channels", [1, 6, 12])
def test_divisors_are_exact(channels: int) -> None:
    divisors = archs._divisors(channels)
    assert divisors == [d for d in range(1, channels + 1) if channels % d == 0]
    assert divisors[0] == 1 and divisors[-1] == channels
