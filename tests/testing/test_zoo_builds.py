"""Every zoo entry builds, runs, is deterministic in its seed, leaves global RNG alone and captures."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fxmerge.errors import ConfigError
from fxmerge.testing import zoo

NAMES = sorted(zoo.ZOO)


def _forward(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return zoo.output_tensors(zoo.call(model, inputs))


def _rng_snapshot() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


# Entries that take seconds of CPU to build twice, export and run in float64 (measured): their determinism and
# capture checks run in the slow tier; every entry still builds and runs in the default tier.
CHEAP = {"mlp", "resnet20a", "vgg_flatten", "unet_small", "nanogpt", "tiny_llama", "vit_small",
         "bert_model", "gpt2_lm_head", "llama_causal_lm", "t5_model", "vit_model"}
TIERED = [name if name in CHEAP else pytest.param(name, marks=pytest.mark.slow) for name in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_runs_and_leaves_global_rng_alone(name: str) -> None:
    before = _rng_snapshot()
    model, inputs = zoo.build(name, seed=0)
    after = _rng_snapshot()
    assert torch.equal(before[0], after[0]), "build touched torch's global RNG"
    assert before[1] == after[1] and np.array_equal(before[2], after[2])

    assert not any(module.training for module in model.modules()), "model must be in eval mode"
    assert zoo.split_inputs(inputs)[0][0].shape[0] == 2
    out = _forward(model, inputs)
    assert out and all(torch.isfinite(tensor).all() for tensor in out)
    # No weight the constructor left constant stays constant: every parameter influences the output.
    constant = [n for n, p in model.named_parameters() if p.numel() > 1 and p.min() == p.max()]
    assert not constant


@pytest.mark.parametrize("name", TIERED)
def test_entry_is_deterministic_in_its_seed(name: str) -> None:
    model, inputs = zoo.build(name, seed=0)
    again_model, again_inputs = zoo.build(name, seed=0)
    out, again = _forward(model, inputs), _forward(again_model, again_inputs)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    del again_model

    other_model, other_inputs = zoo.build(name, seed=1)
    assert not torch.equal(zoo.split_inputs(other_inputs)[0][0], zoo.split_inputs(inputs)[0][0])
    pairs = zip(model.parameters(), other_model.parameters(), strict=True)
    assert not any(torch.equal(p, q) for p, q in pairs if p.numel() > 1)
    # Different weights on the same inputs give different outputs.
    other = _forward(other_model, inputs)
    assert all(not torch.allclose(a, b) for a, b in zip(out, other, strict=True) if a.is_floating_point())


@pytest.mark.parametrize("name", TIERED)
def test_entry_captures_with_its_frontend_and_runs_in_float64(name: str) -> None:
    entry = zoo.ZOO[name]
    model, inputs = zoo.build(name, seed=3)
    reference = _forward(model, inputs)
    args, kwargs = zoo.split_inputs(inputs)
    if entry.frontend in ("fx", "auto"):
        traced = torch.fx.symbolic_trace(model)
        for a, b in zip(_forward(traced, inputs), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if entry.frontend in ("export", "auto"):
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, strict=False)
        exported = zoo.output_tensors(program.module()(*args, **kwargs))
        for a, b in zip(exported, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    out64 = _forward(model.double(), zoo.cast_inputs(inputs, torch.float64))
    for a, b in zip(out64, reference, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a.float(), b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_mobilevit_and_swin_frontends_are_export() -> None:
    assert zoo.ZOO["timm_mobilevit_xxs"].frontend == "export"
    model, _ = zoo.build("timm_mobilevit_xxs")
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(model)
    # swin_t traces under fx, but only through torchvision's opaque fx-wrapped helpers.
    swin, _ = zoo.build("swin_t")
    targets = {getattr(node.target, "__name__", "") for node in torch.fx.symbolic_trace(swin).graph.nodes}
    assert "shifted_window_attention" in targets


def test_unknown_name_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown zoo model 'resnet1000'.*mlp"):
        zoo.build("resnet1000")


def test_registry_fields_are_valid() -> None:
    assert len(zoo.ZOO) == 31
    for name, entry in zoo.ZOO.items():
        assert entry.name == name
        assert entry.frontend in {"fx", "export", "auto"}
        assert entry.source in {"hand", "torchvision", "timm", "transformers"}
        assert entry.notes
    assert {e.name for e in zoo.ZOO.values() if e.source == "transformers"} == {
        "bert_model", "gpt2_lm_head", "llama_causal_lm", "t5_model", "vit_model"
    }


def test_input_helpers() -> None:
    ids, pixels = torch.arange(4).view(2, 2), torch.ones(2, 3)
    args, kwargs = zoo.split_inputs((ids, {"decoder_input_ids": ids}))
    assert args == (ids,) and kwargs == {"decoder_input_ids": ids}
    assert zoo.split_inputs((ids, pixels)) == ((ids, pixels), {})
    cast = zoo.cast_inputs((ids, pixels, {"p": pixels}), torch.float64)
    assert cast[0].dtype == torch.int64 and cast[1].dtype == torch.float64 and cast[2]["p"].dtype == torch.float64
    assert pixels.dtype == torch.float32  # the caller's tensors are untouched
    nested = zoo.output_tensors({"a": pixels, "b": (ids, [pixels]), "c": None})
    assert len(nested) == 3 and nested[1] is ids


def test_hand_models_structure() -> None:
    gpt, _ = zoo.build("nanogpt")
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    llama, _ = zoo.build_tiny_llama(torch.Generator().manual_seed(0), n_layers=32)
    assert len(llama.layers) == 32
    attn = llama.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16 and attn.n_rep == 2
    assert llama.lm_head.weight is not llama.embed_tokens.weight
    assert not any("inv_freq" in key for key in llama.state_dict())
    wide, inputs = zoo.build_resnet20a(torch.Generator().manual_seed(0), width=2)
    assert [wide.layers[i].conv1.out_channels for i in (0, 3, 6)] == [32, 64, 128]
    assert wide(*inputs).shape == (2, 10)


def test_rmsnorm_matches_hand_computation() -> None:
    norm = zoo.RMSNorm(4, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # rms = sqrt(25 / 4) = 2.5
    expected = torch.tensor([[3.0 / 2.5, 2 * 4.0 / 2.5, 0.0, 0.0]])
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)


def test_option_a_shortcut_matches_slicing_and_padding() -> None:
    model = zoo.ResNet20A()
    shortcut = model.layers[3].shortcut  # first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    y = shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
