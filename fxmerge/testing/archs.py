"""Hypothesis strategies that generate small random architectures as ``(nn.Module, example_inputs)``.

Every strategy first draws a frozen *spec* (plain ints, bools and strings plus a seed) and then builds the module
from it with :func:`build_spec`, so a model is a pure function of its spec: hypothesis can shrink it, and a failing
example can be rebuilt from its printed spec. Weights and inputs come from a ``torch.Generator`` seeded with
``spec.seed``; the global RNG is untouched. Models are in eval mode; inputs have batch 2 and are tiny.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from fxmerge.testing.hand_models import RMSNorm
from fxmerge.testing.zoo import seeded

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "none": nn.Identity}


@dataclass(frozen=True)
class MLPSpec:
    """A random MLP: ``widths`` are the hidden sizes."""

    in_dim: int
    widths: tuple[int, ...]
    out_dim: int
    act: str
    bias: bool
    layer_norm: bool
    seed: int


@dataclass(frozen=True)
class CNNSpec:
    """A random CNN. Each block is a tuple whose first item names its kind:

    ``("conv", out, kernel, groups, norm, act)``, ``("residual", mid, kernel, groups, norm, act)``,
    ``("concat", out_a, out_b, norm, act)``, ``("pool", "max" | "avg")``. ``norm`` is 0 (none), -1 (BatchNorm)
    or a GroupNorm group count.
    """

    in_ch: int
    size: int
    stem: int
    blocks: tuple[tuple, ...]
    head: str  # "gap" | "flatten"
    classes: int
    seed: int


@dataclass(frozen=True)
class TransformerSpec:
    """A random decoder/encoder stack over token ids with a learned position embedding and an LM head."""

    vocab: int
    seq_len: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    fused_qkv: bool
    pre_ln: bool
    sdpa: bool
    causal: bool
    tied: bool
    norm: str  # "layer" | "rms"
    mlp: str  # "gelu" | "swiglu"
    seed: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _norm(kind: int, channels: int) -> nn.Module:
    if kind == -1:
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(kind, channels) if kind > 0 else nn.Identity()


def _unit(c_in: int, c_out: int, kernel: int, groups: int, norm: int, act: str) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=norm == 0)
    return nn.Sequential(conv, _norm(norm, c_out), _ACTS[act]())


class _Residual(nn.Module):
    def __init__(self, channels: int, mid: int, kernel: int, groups: int, norm: int, act: str) -> None:
        super().__init__()
        self.body = nn.Sequential(_unit(channels, mid, kernel, groups, norm, act), _unit(mid, channels, 1, 1, 0, "none"))
        self.act = _ACTS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class _Concat(nn.Module):
    def __init__(self, c_in: int, out_a: int, out_b: int, norm: int, act: str) -> None:
        super().__init__()
        self.a, self.b = _unit(c_in, out_a, 3, 1, norm, act), _unit(c_in, out_b, 1, 1, 0, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class _RandomMLP(nn.Sequential):
    def __init__(self, spec: MLPSpec) -> None:
        layers: list[nn.Module] = []
        dims = (spec.in_dim, *spec.widths)
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out, bias=spec.bias), _ACTS[spec.act]()]
            if spec.layer_norm:
                layers.append(nn.LayerNorm(d_out))
        layers.append(nn.Linear(dims[-1], spec.out_dim))
        super().__init__(*layers)


class _RandomCNN(nn.Module):
    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        self.stem = _unit(spec.in_ch, spec.stem, 3, 1, 0, "relu")
        blocks: list[nn.Module] = []
        channels, size = spec.stem, spec.size
        for block in spec.blocks:
            kind, args = block[0], block[1:]
            if kind == "conv":
                blocks.append(_unit(channels, *args))
                channels = args[0]
            elif kind == "residual":
                blocks.append(_Residual(channels, *args))
            elif kind == "concat":
                blocks.append(_Concat(channels, *args))
                channels = args[0] + args[1]
            else:
                blocks.append(nn.MaxPool2d(2) if args[0] == "max" else nn.AvgPool2d(2))
                size //= 2
        self.blocks = nn.Sequential(*blocks)
        self.gap = spec.head == "gap"
        features = channels if self.gap else channels * size * size
        self.head = nn.Linear(features, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.gap else torch.flatten(x, 1)
        return self.head(x)


class _Attention(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        dim, q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.spec, self.sizes = spec, [q_dim, kv_dim, kv_dim]
        if spec.fused_qkv:
            self.qkv = nn.Linear(dim, q_dim + 2 * kv_dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, q_dim), nn.Linear(dim, kv_dim), nn.Linear(dim, kv_dim)
        self.out = nn.Linear(q_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.sizes, dim=-1) if s.fused_qkv else (self.q(x), self.k(x), self.v(x))
        q = q.view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        if s.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=s.n_kv_heads != s.n_heads)
        else:
            rep = s.n_heads // s.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = q @ k.transpose(-2, -1) / math.sqrt(s.head_dim)
            if s.causal:
                mask = torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            y = scores.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class _Block(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        dim = spec.n_heads * spec.head_dim
        norm = nn.LayerNorm if spec.norm == "layer" else RMSNorm
        self.pre_ln, self.swiglu = spec.pre_ln, spec.mlp == "swiglu"
        self.norm1, self.norm2, self.attn = norm(dim), norm(dim), _Attention(spec)
        self.fc_in = nn.Linear(dim, (2 if self.swiglu else 1) * spec.mlp_hidden)
        self.fc_out = nn.Linear(spec.mlp_hidden, dim)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc_out(F.silu(gate) * up)
        return self.fc_out(F.gelu(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.norm1(x))
            return x + self._mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self._mlp(x))


class _RandomTransformer(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        dim = spec.n_heads * spec.head_dim
        self.tok, self.pos = nn.Embedding(spec.vocab, dim), nn.Embedding(spec.seq_len, dim)
        self.blocks = nn.Sequential(*(_Block(spec) for _ in range(spec.n_layers)))
        self.norm = nn.LayerNorm(dim) if spec.norm == "layer" else RMSNorm(dim)
        self.lm_head = nn.Linear(dim, spec.vocab, bias=False)
        if spec.tied:
            self.lm_head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.lm_head(self.norm(self.blocks(self.tok(ids) + self.pos(pos))))


def build_spec(spec: MLPSpec | CNNSpec | TransformerSpec) -> tuple[nn.Module, tuple]:
    """Build ``(model, example_inputs)`` from a spec; the same spec always gives the same weights and inputs."""
    generator = torch.Generator().manual_seed(spec.seed)
    if isinstance(spec, MLPSpec):
        return seeded(generator, lambda: _RandomMLP(spec)), (torch.randn(2, spec.in_dim, generator=generator),)
    if isinstance(spec, CNNSpec):
        image = torch.randn(2, spec.in_ch, spec.size, spec.size, generator=generator)
        return seeded(generator, lambda: _RandomCNN(spec)), (image,)
    ids = torch.randint(0, spec.vocab, (2, spec.seq_len), generator=generator)
    return seeded(generator, lambda: _RandomTransformer(spec)), (ids,)


_SEEDS = st.integers(0, 2**31 - 1)


def mlp_specs() -> st.SearchStrategy[MLPSpec]:
    """Random MLP specs: 1-4 hidden layers of width 1-24, random activation, bias and LayerNorm."""
    return st.builds(
        MLPSpec,
        in_dim=st.integers(1, 12),
        widths=st.lists(st.integers(1, 24), min_size=1, max_size=4).map(tuple),
        out_dim=st.integers(1, 6),
        act=st.sampled_from(sorted(_ACTS)),
        bias=st.booleans(),
        layer_norm=st.booleans(),
        seed=_SEEDS,
    )


def _draw_norm(draw: st.DrawFn, channels: int) -> int:
    kind = draw(st.sampled_from(["none", "bn", "gn"]))
    if kind == "gn":
        return draw(st.sampled_from(_divisors(channels)))
    return -1 if kind == "bn" else 0


def _draw_block(draw: st.DrawFn, channels: int, size: int) -> tuple:
    kinds = ["conv", "depthwise", "residual", "concat"] + (["pool"] if size % 2 == 0 and size >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    act = draw(st.sampled_from(sorted(_ACTS)))
    if kind == "pool":
        return ("pool", draw(st.sampled_from(["max", "avg"])))
    if kind == "depthwise":
        return ("conv", channels, 3, channels, _draw_norm(draw, channels), act)
    if kind == "concat":
        out_a, out_b = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        return ("concat", out_a, out_b, _draw_norm(draw, out_a), act)
    groups = draw(st.sampled_from(_divisors(channels)))
    out = groups * draw(st.integers(1, max(1, 16 // groups)))
    kernel = draw(st.sampled_from([1, 3]))
    return (kind, out, kernel, groups, _draw_norm(draw, out), act)


@st.composite
def cnn_specs(draw: st.DrawFn) -> CNNSpec:
    """Random CNN specs: 1-5 blocks mixing grouped/depthwise convs, residual adds, concat branches, BN/GN, pooling."""
    in_ch, size, stem = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8])), draw(st.integers(1, 12))
    blocks, channels, spatial = [], stem, size
    for _ in range(draw(st.integers(1, 5))):
        block = _draw_block(draw, channels, spatial)
        blocks.append(block)
        if block[0] == "conv":
            channels = block[1]
        elif block[0] == "concat":
            channels = block[1] + block[2]
        elif block[0] == "pool":
            spatial //= 2
    head = draw(st.sampled_from(["gap", "flatten"]))
    return CNNSpec(in_ch, size, stem, tuple(blocks), head, draw(st.integers(1, 6)), draw(_SEEDS))


@st.composite
def transformer_specs(draw: st.DrawFn) -> TransformerSpec:
    """Random transformer specs: heads, GQA ratio, fused/separate qkv, pre/post norm, SDPA or manual softmax."""
    n_kv_heads = draw(st.integers(1, 3))
    n_heads = n_kv_heads * draw(st.integers(1, 3))
    return TransformerSpec(
        vocab=draw(st.integers(2, 16)),
        seq_len=draw(st.integers(1, 6)),
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=draw(st.sampled_from([2, 4, 6, 8])),
        mlp_hidden=draw(st.integers(1, 24)),
        fused_qkv=draw(st.booleans()),
        pre_ln=draw(st.booleans()),
        sdpa=draw(st.booleans()),
        causal=draw(st.booleans()),
        tied=draw(st.booleans()),
        norm=draw(st.sampled_from(["layer", "rms"])),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])),
        seed=draw(_SEEDS),
    )


def mlps() -> st.SearchStrategy[tuple[nn.Module, tuple]]:
    """Random MLPs as ``(model, (x,))`` with ``x`` of shape ``[2, in_dim]``."""
    return mlp_specs().map(build_spec)


def cnns() -> st.SearchStrategy[tuple[nn.Module, tuple]]:
    """Random CNNs as ``(model, (image,))`` with ``image`` of shape ``[2, in_ch, size, size]``."""
    return cnn_specs().map(build_spec)


def transformers() -> st.SearchStrategy[tuple[nn.Module, tuple]]:
    """Random token-level transformers as ``(model, (ids,))`` with ``ids`` of shape ``[2, seq_len]``."""
    return transformer_specs().map(build_spec)


def architectures() -> st.SearchStrategy[tuple[nn.Module, tuple]]:
    """One of :func:`mlps`, :func:`cnns` or :func:`transformers`."""
    return st.one_of(mlps(), cnns(), transformers())
