"""The merge engine's correctness test on real architectures: a model merged with a permuted copy of itself is
the model.

For every model: float64, non-degenerate random weights (norm affine parameters drawn from U[0.5, 1.5] /
U[-0.5, 0.5], every parameter a constructor left constant — zero biases, zero-init layers, layer-scale gammas —
redrawn, BatchNorm running statistics estimated on the data and then jittered, so that no unit is dead or a copy
of another), ``B = spec.apply(A, spec.random_perms(...))`` with **every** group of the inferred spec permuted
(nested GQA groups, shared inner groups and fused per-head layouts included), and
``merge([A, B], method=...)`` must compute A: max relative output error <= 1e-6 (float32 statistics inside
Hugging Face RMSNorm/rotary code already move a permuted copy by ~1e-7).

``act_align``, ``mudsc`` and ``zipit`` are exact on every model. ``rebasin`` (weight matching by coordinate
descent from the identity, no data) is asserted where it converges; ``REBASIN_XFAIL`` lists, with the reason,
the models where it stops in a local optimum.

Data: image batches are low-frequency random images at random per-sample scales (white noise averages out in
pooled features, making every squeeze-excitation unit of a deep CNN nearly constant across samples); token
batches are uniform over the vocabulary. The example inputs are the first data batch, so a ``torch.export``
capture is made once per model and reused.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxmerge
from fxmerge.capture.trace import split_inputs
from fxmerge.testing import zoo

RTOL = 1e-6
DATA_METHODS = ["act_align", "mudsc", "zipit"]
N_BATCHES, BATCH = 3, 8

_TEXT = {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": False}
_DECODER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "max_position_embeddings": 64, **_TEXT}  # fmt: skip


def _hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], tuple[nn.Module, str]]:
    def build() -> tuple[nn.Module, str]:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg), "tokens"

    return build


def _tv(factory: str, **kwargs: Any) -> Callable[[], tuple[nn.Module, str]]:
    def build() -> tuple[nn.Module, str]:
        import torchvision.models as tvm

        return getattr(tvm, factory)(weights=None, **kwargs), "images"

    return build


def _efficientnet() -> tuple[nn.Module, str]:
    """torchvision's EfficientNet (MBConv, squeeze-excitation, stochastic depth) with three small stages."""
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    stages = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2), MBConvConfig(4, 5, 2, 24, 32, 1)]
    return EfficientNet(stages, dropout=0.0, num_classes=10, last_channel=64), "images"


def _convnext() -> tuple[nn.Module, str]:
    """torchvision's ConvNeXt (7x7 depthwise, channels-last LayerNorm, layer scale) with three small stages."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 1)]
    return ConvNeXt(stages, num_classes=10), "images"


def _timm(name: str, **kwargs: Any) -> Callable[[], tuple[nn.Module, str]]:
    def build() -> tuple[nn.Module, str]:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), "images"

    return build


def _timm_mixer() -> tuple[nn.Module, str]:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64), "images"


def _zoo(name: str) -> Callable[[], tuple[nn.Module, str]]:
    def build() -> tuple[nn.Module, str]:
        model, inputs = zoo.build(name, 0)
        return model, "images" if inputs[0].is_floating_point() else "tokens"

    return build


BUILDERS: dict[str, Callable[[], tuple[nn.Module, str]]] = {
    # Hugging Face decoders and encoders (torch.export)
    "gpt_neox": _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", rotary_pct=0.5, **_DECODER),  # fused qkv per head
    "t5": _hf("T5Model", "T5Config", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              decoder_start_token_id=0, **_TEXT),  # relative attention bias: one head order for all layers
    "phi3": _hf("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, attn_implementation="sdpa",
                **_DECODER),  # fused qkv_proj and gate_up_proj, GQA
    "gemma": _hf("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=1, head_dim=16, attn_implementation="sdpa",
                 **_DECODER),  # one kv head: its dims are shared by every query head
    "llama_sdpa": _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, attn_implementation="sdpa",
                      **_DECODER),  # GQA: kv heads x query heads x head dims
    "llama_eager": _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, attn_implementation="eager",
                       **_DECODER),  # GQA through repeat_kv
    "qwen2": _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, attn_implementation="sdpa", **_DECODER),
    "bert": _hf("BertModel", "BertConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=32, **_TEXT),
    "gpt2": _zoo("gpt2_lm_head"),  # Conv1D (transposed weights), tied lm_head
    # torchvision / timm
    "mnasnet0_5": _tv("mnasnet0_5", num_classes=10),  # versioned load_state_dict hook
    "resnet18": _tv("resnet18", num_classes=10),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", num_classes=10),  # SE, hardswish
    "efficientnet": _efficientnet,
    "convnext": _convnext,
    "shufflenet_v2_x0_5": _zoo("shufflenet_v2_x0_5"),  # channel shuffle
    "squeezenet1_0": _zoo("squeezenet1_0"),  # fire-module concat
    "vit_small": _zoo("vit_small"),  # nn.MultiheadAttention leaf
    "timm_vit": _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),  # fused qkv reshape + unbind
    "timm_convnext": _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 24, 32, 48)),  # F.layer_norm
    "timm_mixer": _timm_mixer,  # token-mixing MLP
    "hf_vit": _zoo("vit_model"),
}  # fmt: skip
# full-size zoo models: 20 s to 3 min each on a CPU; run with FXMERGE_RECOVERY_HEAVY=1
HEAVY: dict[str, Callable[[], tuple[nn.Module, str]]] = {
    "mobilenet_v2": _zoo("mobilenet_v2"),
    "googlenet": _zoo("googlenet"),  # multi-branch inception concat
    "regnet_y_400mf": _zoo("regnet_y_400mf"),  # grouped conv + SE
    "densenet121": _zoo("densenet121"),  # growing concat chains
    "resnext50": _zoo("resnext50_32x4d"),  # grouped conv: 32 blocks with a shared inner group
    "efficientnet_b0": _zoo("efficientnet_b0"),
    "swin_t": _zoo("swin_t"),
    "timm_resnetv2": _zoo("timm_resnetv2_50x1_bit"),  # GroupNorm(32)
}
FAST = ["gpt_neox", "t5", "phi3", "gemma", "llama_sdpa", "mnasnet0_5", "convnext", "vit_small"]
SLOW = [name for name in BUILDERS if name not in FAST]
BUILDERS.update(HEAVY)
# models on which weight matching (coordinate descent from the identity) stops in a local optimum, with why
REBASIN_XFAIL: dict[str, str] = {}


# ------------------------------------------------------------------------------------------------ the cases


def _images(example: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Low-frequency random images (4x4 noise upsampled, plus a little white noise) at random scales."""
    n, c, h, w = example.shape
    low = F.interpolate(torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64), size=(h, w), mode="bilinear")
    scale = torch.exp(torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64))
    return scale * (low + 0.3 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64))


def _batches(model: nn.Module, kind: str, g: torch.Generator) -> list[Any]:
    if kind == "images":
        return [_images(torch.empty(BATCH, 3, 32, 32), g) for _ in range(N_BATCHES)]
    vocab = model.config.vocab_size if hasattr(model, "config") else model.get_input_embeddings().num_embeddings
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, vocab, (BATCH, 8), generator=g)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            out.append({"input_ids": ids, "decoder_input_ids": torch.randint(0, vocab, (BATCH, 6), generator=g)})
        else:
            out.append(ids)
    return out


def _example(batch: Any) -> tuple:
    """Example inputs of the batch's own structure (a dict batch is the keyword inputs), so that the graph
    exported for inference also runs the statistics."""
    return (batch,)


def _redraw(model: nn.Module, data: list[Any], g: torch.Generator) -> None:
    """Non-degenerate weights: norm affine parameters U[0.5, 1.5] (weights) / U[-0.5, 0.5] (biases), constant
    parameters (zero biases, zero-init layers, layer-scale gammas) U[-0.5, 0.5], BatchNorm running statistics
    estimated on ``data`` then jittered (mean +- 0.5 std, variance x U[0.5, 1.5])."""
    with torch.no_grad():
        for mod in model.modules():
            norm = "norm" in type(mod).__name__.lower()
            for name, p in mod.named_parameters(recurse=False):
                if norm and p.ndim == 1:
                    low = 0.5 if name in ("weight", "scale", "gamma") else -0.5
                    p.copy_(low + torch.rand(p.shape, generator=g, dtype=p.dtype))
                elif p.numel() > 1 and bool(p.min() == p.max()):
                    p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the data
        bn.train()
    with torch.no_grad():
        for batch in data:
            args, kwargs = split_inputs(_example(batch))
            model(*args, **kwargs)
        for bn in bns:
            bn.eval()
            std = bn.running_var.sqrt()
            bn.running_mean.add_((torch.rand(std.shape, generator=g, dtype=std.dtype) - 0.5) * std)
            bn.running_var.mul_(0.5 + torch.rand(std.shape, generator=g, dtype=std.dtype))


class Case:
    """Model A, its permuted copy B, the data and A's reference outputs."""

    def __init__(self, name: str) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, kind = BUILDERS[name]()
        g = torch.Generator().manual_seed(1)
        self.model = model.double().eval()
        self.data = _batches(self.model, kind, g)
        _redraw(self.model, self.data, g)
        self.example = _example(self.data[0])
        self.spec = fxmerge.infer_groups(self.model, self.example)
        assert len(self.spec) > 0
        self.perms = self.spec.random_perms(torch.Generator().manual_seed(2))
        self.permuted = self.spec.apply(self.model, self.perms)
        self.reference = _outputs(self.model, self.data)

    def error(self, model: nn.Module) -> float:
        """Max over outputs of max |out - ref| / max |ref|."""
        return max(
            float((x - y).abs().max()) / max(float(y.abs().max()), 1e-30)
            for out, ref in zip(_outputs(model, self.data), self.reference, strict=True)
            for x, y in zip(out, ref, strict=True)
        )


def _outputs(model: nn.Module, data: list[Any]) -> list[list[torch.Tensor]]:
    out = []
    with torch.no_grad():
        for batch in data:
            args, kwargs = split_inputs(_example(batch))
            out.append([t for t in zoo.output_tensors(model(*args, **kwargs)) if t.is_floating_point()])
    return out


@functools.cache
def case(name: str) -> Case:
    return Case(name)


def recovery_error(name: str, method: str) -> float:
    c = case(name)
    result = fxmerge.merge([c.model, c.permuted], method=method, data=c.data, example_inputs=c.example, spec=c.spec,
                           progress=False, reset_bn=False)  # fmt: skip
    assert result.report["identity_groups"] == [], "every group is carried by a merge space"
    return c.error(result.model)


# ------------------------------------------------------------------------------------------------ the tests


def _check(name: str, method: str) -> None:
    c = case(name)
    moved = c.error(c.permuted)
    assert moved <= RTOL, f"the permuted copy is not the same function ({moved:.3g}): the spec is unsound"
    err = recovery_error(name, method)
    assert err <= RTOL, f"{method} on {name}: merged outputs differ from the model's by {err:.3g} (relative)"


def _params(names: list[str], slow: bool) -> list:
    out = []
    for name in names:
        for method in [*DATA_METHODS, "rebasin"]:
            marks = [pytest.mark.slow] if slow else []
            if method == "rebasin" and name in REBASIN_XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=REBASIN_XFAIL[name]))
            out.append(pytest.param(name, method, marks=marks, id=f"{name}-{method}"))
    return out


@pytest.mark.parametrize(("name", "method"), _params(FAST, slow=False))
def test_merge_with_permuted_copy_computes_the_model(name: str, method: str) -> None:
    _check(name, method)


@pytest.mark.parametrize(("name", "method"), _params(SLOW, slow=True))
def test_merge_with_permuted_copy_computes_the_model_slow(name: str, method: str) -> None:
    _check(name, method)


@pytest.mark.skipif(not os.environ.get("FXMERGE_RECOVERY_HEAVY"), reason="full-size zoo models: FXMERGE_RECOVERY_HEAVY=1")
@pytest.mark.parametrize(("name", "method"), _params(list(HEAVY), slow=True))
def test_merge_with_permuted_copy_computes_the_model_heavy(name: str, method: str) -> None:
    _check(name, method)


def test_averaging_does_not_recover() -> None:
    """The permutation is not trivial: plain averaging of A and B is far from A."""
    assert recovery_error("llama_sdpa", "average") > 1e-2


def test_sample_axes_that_carry_a_group_are_made_permutation_invariant() -> None:
    """Statistics sort a probe's grouped non-unit axes jointly: any permutation of them gives the same features
    (the token-mixing units of an MLP-Mixer see the channels in each model's own order)."""
    from fxmerge.stats.probes import invariant_over

    t = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(0))
    joint = torch.randperm(6 * 4, generator=torch.Generator().manual_seed(1))
    moved = t.permute(0, 2, 1, 3).reshape(2, 3, 24)[..., joint].reshape(2, 3, 6, 4).permute(0, 2, 1, 3)
    assert torch.equal(invariant_over(t, (1, 3)), invariant_over(moved, (1, 3)))
    assert torch.equal(invariant_over(t, ()), t)
