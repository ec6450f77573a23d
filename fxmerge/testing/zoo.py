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
import torch.nn.functional as F
from torch import nn

from fxmerge.errors import ConfigError, FxmergeError


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


class MLP(nn.Module):
    """Three hidden ReLU layers with bias."""

    def __init__(self, in_dim: int = 24, hidden: int = 32, out_dim: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)
        self.fc3, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.out(F.relu(self.fc3(x)))


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels on both sides."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        identity = stride == 1 and in_planes == planes
        self.shortcut = nn.Sequential() if identity else _ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20A(nn.Module):
    """CIFAR ResNet-20 with option-A (parameter-free) shortcuts; stage widths 16, 32, 64 times ``width``."""

    def __init__(self, width: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        planes = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        blocks, in_planes = [], planes[0]
        for stage, stage_planes in enumerate(planes):
            for index in range(3):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_BasicBlockA(in_planes, stage_planes, stride))
                in_planes = stage_planes
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


class VGGFlatten(nn.Module):
    """conv/BN/ReLU/maxpool stages, then flatten (C x H x W) -> Linear -> ReLU -> Linear."""

    def __init__(self, widths: tuple[int, ...] = (16, 32), hidden: int = 64, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        spatial = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(nn.Linear(channels * spatial * spatial, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _GNBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(4, out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.GroupNorm(4, out_ch), nn.SiLU(),
        )


class UNetSmall(nn.Module):
    """Two-level UNet: GroupNorm(4) blocks, ConvTranspose2d upsampling, ``torch.cat`` skip connections."""

    def __init__(self, in_ch: int = 3, base: int = 16, out_ch: int = 3) -> None:
        super().__init__()
        self.enc1, self.enc2 = _GNBlock(in_ch, base), _GNBlock(base, 2 * base)
        self.mid = _GNBlock(2 * base, 4 * base)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = _GNBlock(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.dec1 = _GNBlock(2 * base, base)
        self.head = nn.Conv2d(base, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        mid = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(mid), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class _CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), _CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(n_embd, 4 * n_embd), "c_proj": nn.Linear(4 * n_embd, n_embd)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT: token + position embeddings, pre-LN blocks with fused ``c_attn``, ``lm_head`` tied to ``wte``."""

    def __init__(self, vocab_size: int = 64, block_size: int = 16, n_layer: int = 2, n_head: int = 4, n_embd: int = 32):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "h": nn.ModuleList(_GPTBlock(n_embd, n_head) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(n_embd),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].to(self.inv_freq.dtype) * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, slen, head_dim = hidden.shape
    hidden = hidden[:, :, None, :, :].expand(batch, kv_heads, n_rep, slen, head_dim)
    return hidden.reshape(batch, kv_heads * n_rep, slen, head_dim)


class _LlamaAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim, self.n_rep = dim // n_heads, n_heads // n_kv_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = _repeat_kv(k, self.n_rep), _repeat_kv(v, self.n_rep)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class _LlamaBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(dim), RMSNorm(dim)
        self.self_attn = _LlamaAttention(dim, n_heads, n_kv_heads)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    """Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU MLP, untied ``lm_head``."""

    def __init__(
        self, n_layers: int = 2, vocab_size: int = 64, dim: int = 32, n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 64
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(_LlamaBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm, self.rotary = RMSNorm(dim), _Rotary(dim // n_heads)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


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
