"""A registry of small, randomly initialised models that the permutation-inference passes are tested on.

Every entry builds ``(model, example_inputs)`` from a ``torch.Generator``: the model is in eval mode and the inputs
are tiny (batch 2, 32x32 images or 8-token sequences), so a float64 forward runs quickly on a CPU. Nothing is
downloaded.

Example-input convention: ``example_inputs`` is a tuple of positional arguments. When the model also needs
keyword arguments, they are the LAST element of the tuple, as a ``dict`` (only ``t5_model`` does this: it takes
``decoder_input_ids``). Use :func:`split_inputs` / :func:`call` rather than ``model(*inputs)``.

Determinism: third-party constructors draw their initial weights from torch's global RNG, so every builder runs
them inside ``torch.random.fork_rng()`` seeded from the generator; the caller's global RNG state is untouched.
After construction, every parameter the constructor left constant (zero biases, unit norm weights, zero-init
heads, 1e-6 layer-scale gammas) and every BatchNorm running statistic is re-drawn from the generator, so that each
weight has a visible effect on the output; a permutation bug then shows up as an output change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxmerge.errors import ConfigError, FxmergeError
from fxmerge.testing.hand_models import MLP, NanoGPT, ResNet20A, RMSNorm, TinyLlama, UNetSmall, VGGFlatten

__all__ = [
    "MLP",
    "ZOO",
    "NanoGPT",
    "RMSNorm",
    "ResNet20A",
    "TinyLlama",
    "UNetSmall",
    "VGGFlatten",
    "ZooEntry",
    "build",
    "call",
    "cast_inputs",
    "output_tensors",
    "seeded",
    "split_inputs",
]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: a builder plus the frontend it is expected to capture with."""

    name: str
    build: Callable[[torch.Generator], tuple[nn.Module, tuple]]
    frontend: str  # "fx" | "export" | "auto"
    source: str  # "hand" | "torchvision" | "timm" | "transformers"
    notes: str


def split_inputs(inputs: tuple) -> tuple[tuple, dict[str, Any]]:
    """Split example inputs into ``(args, kwargs)``: a trailing ``dict`` holds the keyword arguments."""
    if inputs and isinstance(inputs[-1], dict):
        return tuple(inputs[:-1]), dict(inputs[-1])
    return tuple(inputs), {}


def call(model: nn.Module, inputs: tuple) -> Any:
    """Run ``model`` on example inputs that follow this module's convention (see :func:`split_inputs`)."""
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


def cast_inputs(inputs: tuple, dtype: torch.dtype) -> tuple:
    """Return a copy of ``inputs`` with floating-point tensors cast to ``dtype`` (token ids are left alone)."""

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, dict):
            return {key: cast(item) for key, item in value.items()}
        return value

    return tuple(cast(value) for value in inputs)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor, tuple, list, dict or HF ``ModelOutput``) into its list of tensors."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in output_tensors(item)]
    return []


def seeded(generator: torch.Generator, constructor: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module with the global RNG forked and seeded from ``generator``, then jitter its constants.

    Returns the module in eval mode. The caller's global RNG state is unchanged.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = constructor()
    _jitter_constants(model, generator)
    return model.eval()


def _jitter_constants(model: nn.Module, generator: torch.Generator) -> None:
    tensors = [param for param in model.parameters() if param.is_floating_point()]
    tensors += [
        buf
        for name, buf in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var") and buf.is_floating_point()
    ]
    with torch.no_grad():
        for tensor in tensors:
            if tensor.numel() < 2 or tensor.min() != tensor.max():
                continue
            value = float(tensor.flatten()[0])
            noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
            if abs(value) <= 1e-3:
                tensor.copy_(0.2 * (noise - 0.5))
            else:
                tensor.copy_(value * (0.75 + 0.5 * noise))


def _images(generator: torch.Generator, size: int, channels: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(2, channels, size, size, generator=generator),)


def _tokens(generator: torch.Generator, vocab: int, length: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=generator)


# --------------------------------------------------------------------------------------------- hand-written


def build_mlp(generator: torch.Generator) -> tuple[nn.Module, tuple]:
    """Zoo builder for :class:`MLP`; input ``[2, 24]``."""
    return seeded(generator, MLP), (torch.randn(2, 24, generator=generator),)


def build_resnet20a(generator: torch.Generator, *, width: int = 1) -> tuple[nn.Module, tuple]:
    """Zoo builder for :class:`ResNet20A` with width multiplier ``width``; input ``[2, 3, 32, 32]``."""
    return seeded(generator, lambda: ResNet20A(width)), _images(generator, 32)


def build_vgg_flatten(generator: torch.Generator) -> tuple[nn.Module, tuple]:
    """Zoo builder for :class:`VGGFlatten`; input ``[2, 3, 32, 32]``."""
    return seeded(generator, VGGFlatten), _images(generator, 32)


def build_unet_small(generator: torch.Generator) -> tuple[nn.Module, tuple]:
    """Zoo builder for :class:`UNetSmall`; input ``[2, 3, 16, 16]``."""
    return seeded(generator, UNetSmall), _images(generator, 16)


def build_nanogpt(generator: torch.Generator) -> tuple[nn.Module, tuple]:
    """Zoo builder for :class:`NanoGPT`; input token ids ``[2, 8]``."""
    return seeded(generator, NanoGPT), (_tokens(generator, 64),)


def build_tiny_llama(generator: torch.Generator, *, n_layers: int = 2) -> tuple[nn.Module, tuple]:
    """Zoo builder for :class:`TinyLlama` with ``n_layers`` blocks; input token ids ``[2, 8]``."""
    return seeded(generator, lambda: TinyLlama(n_layers)), (_tokens(generator, 64),)


def _torchvision(factory: str, size: int, **kwargs: Any) -> Callable[[torch.Generator], tuple[nn.Module, tuple]]:
    def build_fn(generator: torch.Generator) -> tuple[nn.Module, tuple]:
        import torchvision.models as tvm

        constructor = getattr(tvm, factory)
        model = seeded(generator, lambda: constructor(weights=None, **kwargs))
        return model, _images(generator, size)

    return build_fn


def _torchvision_vit(generator: torch.Generator) -> tuple[nn.Module, tuple]:
    from torchvision.models.vision_transformer import VisionTransformer

    model = seeded(
        generator,
        lambda: VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
        ),
    )
    return model, _images(generator, 32)


def _timm(model_name: str, size: int, **kwargs: Any) -> Callable[[torch.Generator], tuple[nn.Module, tuple]]:
    def build_fn(generator: torch.Generator) -> tuple[nn.Module, tuple]:
        import timm

        model = seeded(generator, lambda: timm.create_model(model_name, pretrained=False, **kwargs))
        return model, _images(generator, size)

    return build_fn


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise FxmergeError(
            "this zoo entry needs the optional 'transformers' package; install it with `pip install fxmerge[hf]`"
        ) from exc
    return transformers


def _hf(model_cls: str, config_cls: str, inputs: str, **config: Any) -> Callable[[torch.Generator], tuple]:
    def build_fn(generator: torch.Generator) -> tuple[nn.Module, tuple]:
        tf = _import_transformers()
        cfg = getattr(tf, config_cls)(**config)
        model = seeded(generator, lambda: getattr(tf, model_cls)(cfg))
        if inputs == "pixels":
            return model, _images(generator, cfg.image_size)
        ids = _tokens(generator, cfg.vocab_size)
        if inputs == "seq2seq":
            return model, (ids, {"decoder_input_ids": _tokens(generator, cfg.vocab_size, length=6)})
        return model, (ids,)

    return build_fn


_TEXT = {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": False}
_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
_LLAMA = {"num_key_value_heads": 2, "max_position_embeddings": 64, **_BERT, **_TEXT}
_T5 = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, **_TEXT}
_TV, _TIMM, _HF = "torchvision", "timm", "transformers"

# (name, builder, frontend, source, notes): "auto" = both fx.symbolic_trace and torch.export capture it.
_TABLE: list[tuple[str, Callable[[torch.Generator], tuple[nn.Module, tuple]], str, str, str]] = [
    ("mlp", build_mlp, "auto", "hand", "3 hidden ReLU layers with bias; input [2, 24]"),
    ("resnet20a", build_resnet20a, "auto", "hand", "CIFAR ResNet-20, option-A shortcuts (::2 slice + channel F.pad)"),
    ("vgg_flatten", build_vgg_flatten, "auto", "hand", "conv/BN/ReLU/maxpool, flatten 32x8x8 -> Linear(2048, 64)"),
    ("unet_small", build_unet_small, "auto", "hand", "GroupNorm(4) blocks, ConvTranspose2d up, cat skips, 2 levels"),
    ("nanogpt", build_nanogpt, "auto", "hand", "fused c_attn + split, view heads, causal SDPA, tied lm_head"),
    ("tiny_llama", build_tiny_llama, "auto", "hand", "RMSNorm, GQA repeat_kv (4 q / 2 kv heads), RoPE, SwiGLU"),
    ("resnet18", _torchvision("resnet18", 32), "auto", _TV, "residual stream, 1x1 downsample"),
    ("resnet50", _torchvision("resnet50", 32), "auto", _TV, "bottleneck blocks"),
    ("vgg11_bn", _torchvision("vgg11_bn", 32), "auto", _TV, "adaptive 7x7 pool -> flatten -> Linear(25088); 133M params, needs >= 32px"),
    ("mobilenet_v2", _torchvision("mobilenet_v2", 32), "auto", _TV, "depthwise convs, inverted residuals"),
    ("mobilenet_v3_small", _torchvision("mobilenet_v3_small", 32), "auto", _TV, "SE broadcast mul, hardswish"),
    ("efficientnet_b0", _torchvision("efficientnet_b0", 32), "auto", _TV, "SE, stochastic depth (identity in eval)"),
    ("densenet121", _torchvision("densenet121", 32), "auto", _TV, "growing concat chains; needs >= 32px"),
    ("googlenet", _torchvision("googlenet", 32, aux_logits=False, init_weights=True), "auto", _TV, "multi-branch inception concat"),
    ("shufflenet_v2_x0_5", _torchvision("shufflenet_v2_x0_5", 32), "auto", _TV, "channel shuffle (view/transpose/reshape), chunk"),
    ("squeezenet1_0", _torchvision("squeezenet1_0", 32), "auto", _TV, "fire-module concat; needs >= 32px"),
    ("resnext50_32x4d", _torchvision("resnext50_32x4d", 32), "auto", _TV, "grouped conv (32 groups)"),
    ("regnet_y_400mf", _torchvision("regnet_y_400mf", 32), "auto", _TV, "grouped conv + SE"),
    ("convnext_tiny", _torchvision("convnext_tiny", 32), "auto", _TV, "7x7 depthwise, permute + LayerNorm, layer scale; needs >= 32px"),
    ("vit_small", _torchvision_vit, "auto", _TV, "VisionTransformer 32px/8, 2 layers, 4 heads; nn.MultiheadAttention leaf"),
    ("swin_t", _torchvision("swin_t", 32), "export", _TV, "fx captures opaque fx-wrapped helpers (shifted_window_attention...)"),
    ("timm_vit_tiny", _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8), "auto", _TIMM, "img 32 / patch 8; fused qkv reshape + unbind"),
    ("timm_convnext_atto", _timm("convnext_atto", 32), "auto", _TIMM, "F.layer_norm on get_attr weights; needs >= 32px"),
    ("timm_resnetv2_50x1_bit", _timm("resnetv2_50x1_bit", 32), "auto", _TIMM, "GroupNormAct(32), StdConv2d weight standardisation"),
    ("timm_mixer_s16_224", _timm("mixer_s16_224", 32, img_size=32), "auto", _TIMM, "img_size=32 -> 4 tokens; token-mixing Linear"),
    ("timm_mobilevit_xxs", _timm("mobilevit_xxs", 64), "export", _TIMM, "unfold/fold reshapes, fx TraceError; 64px avoids interpolate"),
    ("bert_model", _hf("BertModel", "BertConfig", "tokens", max_position_embeddings=32, **_BERT, **_TEXT), "export", _HF, "post-LN encoder, separate q/k/v"),
    ("gpt2_lm_head", _hf("GPT2LMHeadModel", "GPT2Config", "tokens", n_embd=64, n_layer=2, n_head=4, n_positions=32, **_TEXT), "export", _HF, "Conv1D (weight [in, out]) -> addmm, tied lm_head"),
    ("llama_causal_lm", _hf("LlamaForCausalLM", "LlamaConfig", "tokens", **_LLAMA), "export", _HF, "GQA (4 q / 2 kv heads), RoPE, RMSNorm"),
    ("t5_model", _hf("T5Model", "T5Config", "seq2seq", **_T5), "export", _HF, "encoder-decoder, relative bias; inputs end with {'decoder_input_ids': ...}"),
    ("vit_model", _hf("ViTModel", "ViTConfig", "pixels", image_size=32, patch_size=8, **_BERT), "export", _HF, "HF ViT encoder, cls token, pooler"),
]

ZOO: dict[str, ZooEntry] = {row[0]: ZooEntry(*row) for row in _TABLE}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """Build zoo model ``name`` with weights and inputs drawn from ``seed``.

    Returns ``(model, example_inputs)``: the model is in eval mode, the inputs follow the convention in the module
    docstring. Raises :class:`~fxmerge.errors.ConfigError` for an unknown name.
    """
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of: {', '.join(sorted(ZOO))}")
    generator = torch.Generator().manual_seed(seed)
    return ZOO[name].build(generator)
