"""Compatibility sweep: every torchvision family, every timm module and 69 Hugging Face architectures
(85 runs: the causal-LM decoders run with both sdpa and eager attention).

Each model runs in its own process with a time limit, through these stages (float64 unless said otherwise):

1. ``infer_groups(strict=True)`` and ``infer_groups(strict=False)``: exception, number of groups, frontend;
2. ``verify_invariance(model, spec, x, batch=16)`` on the non-strict spec. Weights are random but NOT
   degenerate: norm gammas / running variances are drawn from U[0.5, 1.5], betas / running means from
   U[-0.5, 0.5], and every other constant tensor (zero-init gammas, layer scales, zero-init output
   projections, zero biases) is re-drawn, so a wrong group moves the outputs;
3. the permutable fraction of parameter elements and the number of frozen axes without a reason (must be 0);
4. self-merge recovery (models up to 15M parameters): ``B = spec.apply(A, spec.random_perms(...))`` over every
   group the merge engine carries (``identity_groups`` are kept at the identity by design, see
   docs/design.md), then ``merge([A, B], method=...)`` with ``reset_bn=False`` for ``act_align`` and
   ``rebasin``; the relative output error ``max|merged(x) - A(x)| / max(1, max|A(x)|)`` over the data batches
   passes at <= 1e-6. A model whose float64 forward fails (a kernel without a float64 CPU implementation:
   ``torch.nn.functional.grouped_mm`` in Hugging Face MoE experts) runs this stage on a float32 copy and
   passes at <= 1e-4 (``merge_dtype`` / ``recovery_tol`` in its record, said in its row);
5. ``export_onnx`` of the merged model (float32, models under 30M parameters), checked in onnxruntime within
   ``atol = 1e-4 * max(1, max|output|)`` (float32 rounding scales with the outputs); where
   the default ``dynamo`` exporter fails, ``exporter="trace"`` (whose file fxmerge also checks on inputs that
   take other branches) is tried and the row says ``ok (trace)`` with the dynamo exporter's error.

Results are kept in ``docs/results/compatibility.json``, a tracked file (one record per model, written
atomically as each model finishes; a partial run replaces the records of the models it ran and keeps every
other one; ``--cache PATH`` points elsewhere), and ``docs/compatibility.md`` is regenerated from it after every
run, so the page never holds more than the committed results behind it::

    python benchmarks/zoo_sweep.py --family all --timeout 180           # the whole sweep (hours on 1 core)
    python benchmarks/zoo_sweep.py --slice representative               # ~15 models, one per family/pattern
    python benchmarks/zoo_sweep.py --rerun-failed                       # only models that are not green
    python benchmarks/zoo_sweep.py --family timm --resume               # models not run yet through --stages
    python benchmarks/zoo_sweep.py --only llama --family hf             # a substring of the model key
    python benchmarks/zoo_sweep.py --report-only                        # regenerate the doc from the cache
    python benchmarks/zoo_sweep.py --list                               # print the model keys and exit

The file holds the list of commands run (``commands``, rendered at the top of the page), the library versions
of the latest run, the timm catalog and the records; a record's ``trace`` / ``merge_trace`` keeps only its
last ``TRACE_CHARS`` characters. Records marked ``"reconstructed"`` were rebuilt from the page itself after an
earlier, untracked cache was lost: they hold only what the page showed (see ``--report-only``'s header).

``run_model(key)`` runs the stages in-process and returns the record (used by tests/core/test_zoo_sweep.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "docs" / "results" / "compatibility.json"  # tracked: the data behind docs/compatibility.md
TRACE_CHARS = 800  # the tail of a traceback kept in the tracked cache
OUT = ROOT / "docs" / "compatibility.md"
MERGE_MAX_PARAMS = 15_000_000  # self-merge recovery only up to this size
ONNX_MAX_PARAMS = 30_000_000  # ONNX export only below this size
RECOVERY_TOL = 1e-6
# models with a kernel that has no float64 CPU implementation (the grouped matmul of Hugging Face MoE experts)
# run the merge stage in float32; the relative error then passes at fxmerge.verify's float32 tolerance
RECOVERY_TOL_F32 = 1e-4
IMG = 64  # default image side
SEQ = 8  # default sequence length
FAMILIES = ("torchvision", "timm", "hf")
CNN_OR_VIT = {"cnn", "vit"}


# ------------------------------------------------------------------------------------------------ catalog


@dataclass(frozen=True)
class Entry:
    """One swept model. ``key`` is ``family/name``; ``kind`` is cnn | vit | text | seq2seq | multimodal."""

    key: str
    family: str
    kind: str
    pattern: str  # what the model exercises (for the representative slice and the table)


# torchvision: one (smallest) model per classification family: (family, factory, image side, kwargs, kind)
TORCHVISION: list[tuple[str, str, int, dict[str, Any], str]] = [
    ("resnet", "resnet18", IMG, {}, "cnn"),
    ("resnext", "resnext50_32x4d", IMG, {}, "cnn"),
    ("wide_resnet", "wide_resnet50_2", IMG, {}, "cnn"),
    ("vgg", "vgg11", IMG, {}, "cnn"),
    ("alexnet", "alexnet", IMG, {}, "cnn"),
    ("squeezenet", "squeezenet1_1", IMG, {}, "cnn"),
    ("densenet", "densenet121", IMG, {}, "cnn"),
    # 128 px: at 64 px inception 5 runs on 2x2 maps, where branch 4's 3x3/s1 max-pool makes every position equal
    # and the activation correlations tie exactly (act_align then cannot tell units apart)
    ("googlenet", "googlenet", 128, {"aux_logits": False, "init_weights": True}, "cnn"),
    ("inception_v3", "inception_v3", 80, {"aux_logits": False, "init_weights": True}, "cnn"),
    ("mobilenet_v2", "mobilenet_v2", IMG, {}, "cnn"),
    ("mobilenet_v3", "mobilenet_v3_small", IMG, {}, "cnn"),
    ("mnasnet", "mnasnet0_5", IMG, {}, "cnn"),
    ("shufflenet_v2", "shufflenet_v2_x0_5", IMG, {}, "cnn"),
    ("efficientnet", "efficientnet_b0", IMG, {}, "cnn"),
    ("efficientnet_v2", "efficientnet_v2_s", IMG, {}, "cnn"),
    ("regnet", "regnet_y_400mf", IMG, {}, "cnn"),
    ("convnext", "convnext_tiny", IMG, {}, "cnn"),
    ("vit", "vit_b_16", IMG, {"image_size": IMG}, "vit"),
    ("swin", "swin_t", IMG, {}, "vit"),
    ("swin_v2", "swin_v2_t", IMG, {}, "vit"),
    ("maxvit", "maxvit_t", 224, {}, "vit"),
]
TV_INDEX = {factory: (fam, size, kwargs, kind) for fam, factory, size, kwargs, kind in TORCHVISION}

_TEXT = {"vocab_size": 128, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": False}
_ENC = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    **_TEXT,
}
_DEC = {**_ENC, "num_key_value_heads": 2}
_VIS = {
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
# Hugging Face: name -> (model_type, head, inputs, config kwargs, pattern). MoE models run with the default
# experts implementation ("grouped_mm": torch._grouped_mm, no float64 CPU kernel, no permutation rule); a config
# entry "experts_implementation": "eager" selects the per-expert loop, which neither frontend can capture
# (data-dependent control flow). head: "base" = AutoModel,
# "lm" = AutoModelForCausalLM (swept with attn_implementation sdpa AND eager); inputs: tokens | seq2seq |
# pixels | clip | whisper.
HF: dict[str, tuple[str, str, str, dict[str, Any], str]] = {
    "bert": ("bert", "base", "tokens", _ENC, "post-LN encoder"),
    "roberta": (
        "roberta",
        "base",
        "tokens",
        {**_ENC, "pad_token_id": 1},
        "post-LN encoder, offset positions",
    ),
    "distilbert": (
        "distilbert",
        "base",
        "tokens",
        {
            "dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "hidden_dim": 128,
            "max_position_embeddings": 64,
            "vocab_size": 128,
            "pad_token_id": 0,
        },
        "post-LN encoder",
    ),
    "albert": (
        "albert",
        "base",
        "tokens",
        {**_ENC, "embedding_size": 32},
        "shared layers, embedding projection",
    ),
    "electra": ("electra", "base", "tokens", {**_ENC, "embedding_size": 32}, "embedding projection"),
    "deberta_v2": (
        "deberta-v2",
        "base",
        "tokens",
        {
            **_ENC,
            "relative_attention": True,
            "position_buckets": 16,
            "max_relative_positions": 32,
            "pos_att_type": ["p2c", "c2p"],
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
        },
        "disentangled relative attention",
    ),
    "gpt2": (
        "gpt2",
        "lm",
        "tokens",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, **_TEXT},
        "Conv1D fused qkv, tied lm_head",
    ),
    "gpt_neox": (
        "gpt_neox",
        "lm",
        "tokens",
        {**_ENC, "rotary_pct": 0.25},
        "fused interleaved qkv, partial rotary",
    ),
    "llama": ("llama", "lm", "tokens", _DEC, "GQA, RoPE, RMSNorm, SwiGLU"),
    "mistral": ("mistral", "lm", "tokens", {**_DEC, "sliding_window": None}, "GQA"),
    "qwen2": ("qwen2", "lm", "tokens", _DEC, "GQA, qkv bias"),
    "qwen3": ("qwen3", "lm", "tokens", {**_DEC, "head_dim": 16}, "GQA, qk-norm"),
    "gemma": (
        "gemma",
        "lm",
        "tokens",
        {**_DEC, "head_dim": 16, "num_key_value_heads": 1},
        "MQA, (1 + w) RMSNorm, scaled embedding",
    ),
    "phi": ("phi", "lm", "tokens", {**_ENC, "partial_rotary_factor": 0.5}, "parallel block, partial rotary"),
    "phi3": ("phi3", "lm", "tokens", _DEC, "fused qkv_proj, fused gate_up_proj"),
    "mixtral": (
        "mixtral",
        "lm",
        "tokens",
        {**_DEC, "num_local_experts": 4, "num_experts_per_tok": 2},
        "sparse MoE (top-2 of 4)",
    ),
    "qwen2_moe": (
        "qwen2_moe",
        "lm",
        "tokens",
        {
            **_DEC,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
        },
        "MoE + gated shared expert",
    ),
    "olmo": ("olmo", "lm", "tokens", _DEC, "non-parametric LayerNorm"),
    "falcon": (
        "falcon",
        "lm",
        "tokens",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, **_TEXT},
        "multi-query fused qkv, parallel attention",
    ),
    "opt": (
        "opt",
        "lm",
        "tokens",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 128,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 64,
            **_TEXT,
        },
        "learned offset positions",
    ),
    "stablelm": ("stablelm", "lm", "tokens", {**_DEC, "partial_rotary_factor": 0.25}, "partial rotary, GQA"),
    "persimmon": (
        "persimmon",
        "lm",
        "tokens",
        {**_ENC, "partial_rotary_factor": 0.5, "qk_layernorm": True},
        "partial rotary, qk LayerNorm, fused qkv",
    ),
    "t5": (
        "t5",
        "base",
        "seq2seq",
        {
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
            **_TEXT,
        },
        "encoder-decoder, relative bias, RMS norm",
    ),
    "bart": (
        "bart",
        "base",
        "seq2seq",
        {
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "max_position_embeddings": 64,
            "decoder_start_token_id": 0,
            **_TEXT,
        },
        "encoder-decoder, cross attention",
    ),
    "vit": ("vit", "base", "pixels", _VIS, "ViT encoder, cls token, pooler"),
    "deit": ("deit", "base", "pixels", _VIS, "cls + distillation tokens"),
    "swin": (
        "swin",
        "base",
        "pixels",
        {
            "image_size": 32,
            "patch_size": 2,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 4],
            "window_size": 4,
        },
        "shifted windows, patch merging",
    ),
    "convnext": (
        "convnext",
        "base",
        "pixels",
        {"image_size": 32, "num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1]},
        "depthwise conv, layer scale",
    ),
    "clip": (
        "clip",
        "base",
        "clip",
        {
            "text_config": {**_ENC, "projection_dim": 32},
            "vision_config": {**_VIS, "projection_dim": 32},
            "projection_dim": 32,
        },
        "two towers, projections, logit scale",
    ),
    "whisper": (
        "whisper",
        "base",
        "whisper",
        {
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "num_mel_bins": 16,
            "max_source_positions": 8,
            "max_target_positions": 16,
            "decoder_start_token_id": 0,
            **_TEXT,
        },
        "conv front-end, encoder-decoder",
    ),
}

_AUDIO = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "conv_dim": [32, 32, 32],
    "conv_stride": [5, 2, 2],
    "conv_kernel": [10, 3, 3],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}
# more architectures, one per distinct pattern (small configs where the config takes them, else the defaults)
HF.update({
    "xlm_roberta": ("xlm-roberta", "base", "tokens", {**_ENC, "pad_token_id": 1}, "RoBERTa family, offset positions"),
    "megatron_bert": ("megatron-bert", "base", "tokens", _ENC, "pre-LN BERT"),
    "mobilebert": ("mobilebert", "base", "tokens", _ENC, "bottlenecks, stacked FFNs, NoNorm"),
    "convbert": ("convbert", "base", "tokens", {**_ENC, "embedding_size": 32}, "span-based dynamic convolution"),
    "squeezebert": ("squeezebert", "base", "tokens", {**_ENC, "embedding_size": 64}, "grouped 1x1 conv1d layers"),
    "ibert": ("ibert", "base", "tokens", {**_ENC, "pad_token_id": 1}, "integer-BERT ops in float mode"),
    "rembert": ("rembert", "base", "tokens", {**_ENC, "input_embedding_size": 32, "output_embedding_size": 32},
                "decoupled input/output embeddings"),
    "nystromformer": ("nystromformer", "base", "tokens", _ENC, "Nystrom attention (exact at short length)"),
    "layoutlm": ("layoutlm", "base", "tokens", _ENC, "2-D position embeddings"),
    "markuplm": ("markuplm", "base", "tokens", _ENC, "xpath embeddings"),
    "xlnet": ("xlnet", "base", "tokens", {"d_model": 64, "n_layer": 2, "n_head": 4, "d_inner": 128, **_TEXT},
              "two-stream relative attention"),
    "ctrl": ("ctrl", "base", "tokens", {"n_embd": 64, "n_layer": 2, "n_head": 4, "dff": 128, "n_positions": 64,
                                          **_TEXT}, "pre-LN decoder, sinusoidal positions"),
    "bloom": ("bloom", "base", "tokens", {"hidden_size": 64, "n_layer": 2, "n_head": 4, **_TEXT}, "ALiBi, fused qkv"),
    "mpt": ("mpt", "base", "tokens", {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, **_TEXT},
            "ALiBi, fused Wqkv, no biases"),
    "gpt_bigcode": ("gpt_bigcode", "base", "tokens", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                                        **_TEXT}, "multi-query attention"),
    "starcoder2": ("starcoder2", "base", "tokens", {**_DEC, "sliding_window": None}, "GQA, LayerNorm, biases"),
    "cohere": ("cohere", "base", "tokens", _DEC, "parallel block, bias-free LayerNorm"),
    "granite": ("granite", "base", "tokens", _DEC, "scaled embeddings / residuals"),
    "olmo2": ("olmo2", "base", "tokens", _DEC, "post-norm blocks, qk-norm over all heads"),
    "qwen3_moe": ("qwen3_moe", "base", "tokens", {**_DEC, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                                  "moe_intermediate_size": 32}, "MoE, qk-norm"),
    "mamba": ("mamba", "base", "tokens", {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 8, **_TEXT},
              "selective state space"),
    "rwkv": ("rwkv", "base", "tokens", {"hidden_size": 64, "num_hidden_layers": 2, "attention_hidden_size": 64,
                                        "intermediate_size": 128, "context_length": 64, **_TEXT}, "time-mix recurrence"),
    "dinov2": ("dinov2", "base", "pixels", _VIS, "layer scale, interpolated positions"),
    "beit": ("beit", "base", "pixels", _VIS, "relative position bias, layer scale"),
    "swinv2": ("swinv2", "base", "pixels", {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1],
                                            "num_heads": [2, 4], "window_size": 4}, "cosine attention, log-spaced CPB"),
    "segformer": ("segformer", "base", "pixels", {"image_size": 64}, "overlapping patches, reduced-key attention"),
    "pvt_v2": ("pvt_v2", "base", "pixels", {"image_size": 64}, "spatial-reduction attention, depthwise FFN"),
    "levit": ("levit", "base", "pixels", {"image_size": 64}, "BN attention, subsampling attention"),
    "cvt": ("cvt", "base", "pixels", {"image_size": 64}, "conv projections in attention"),
    "poolformer": ("poolformer", "base", "pixels", {"image_size": 64, "depths": [1, 1, 1, 1]},
                   "pooling token mixer, GroupNorm(1)"),
    "mobilevit": ("mobilevit", "base", "pixels", {"image_size": 64}, "conv + transformer over unfolded patches"),
    "focalnet": ("focalnet", "base", "pixels", {"image_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1]},
                 "focal modulation"),
    "resnet_hf": ("resnet", "base", "pixels", {"image_size": 64, "depths": [1, 1, 1, 1]}, "bottleneck ResNet"),
    "regnet_hf": ("regnet", "base", "pixels", {"image_size": 64, "depths": [1, 1, 1, 1]}, "grouped conv, SE"),
    "bit": ("bit", "base", "pixels", {"image_size": 64, "depths": [1, 1, 1, 1]}, "weight-standardised conv, GroupNorm"),
    "efficientnet_hf": ("efficientnet", "base", "pixels", {"image_size": 64}, "MBConv, SE, depthwise"),
    "wav2vec2": ("wav2vec2", "base", "audio", _AUDIO, "conv feature encoder, weight-norm grouped positional conv"),
    "hubert": ("hubert", "base", "audio", _AUDIO, "conv feature encoder, weight-norm positional conv"),
    "wavlm": ("wavlm", "base", "audio", _AUDIO, "gated relative position bias"),
})  # fmt: skip

# the representative slice: one model per family and per pattern (residual, concat, grouped/depthwise, SE,
# shuffle, windows, fused qkv, GQA, MoE, partial rotary, encoder-decoder, two towers)
REPRESENTATIVE = [
    "torchvision/resnet18",
    "torchvision/densenet121",
    "torchvision/mobilenet_v3_small",
    "torchvision/shufflenet_v2_x0_5",
    "torchvision/convnext_tiny",
    "torchvision/swin_t",
    "timm/vision_transformer",
    "timm/efficientnet",
    "timm/regnet",
    "timm/byobnet",
    "hf/bert",
    "hf/llama[sdpa]",
    "hf/llama[eager]",
    "hf/gpt_neox[sdpa]",
    "hf/mixtral[sdpa]",
    "hf/t5",
    "hf/clip",
]


def hf_keys() -> list[tuple[str, str]]:
    out = []
    for name, (_, head, inputs, _, _) in HF.items():
        kind = {"pixels": "vit", "tokens": "text", "audio": "audio"}.get(
            inputs, "seq2seq" if inputs != "clip" else "multimodal"
        )
        if name in ("convnext", "resnet_hf", "regnet_hf", "bit", "efficientnet_hf", "poolformer", "focalnet"):
            kind = "cnn"
        if head == "lm":
            out += [(f"hf/{name}[sdpa]", kind), (f"hf/{name}[eager]", kind)]
        else:
            out.append((f"hf/{name}", kind))
    return out


# ---- timm: pick the smallest model of every module (parameter count on the meta device, 10 classes)

_SIZE_WORDS = [
    "atto",
    "femto",
    "pico",
    "zepto",
    "nano",
    "xxxs",
    "xxs",
    "tiny",
    "xs",
    "mini",
    "small",
    "s",
    "t",
    "b0",
    "m",
    "base",
    "b",
]
_BIG = re.compile(r"(large|huge|giant|gigantic|xlarge|_xl|448|512|384|_l_|_h_|_g_|_e_|enormous)")


def _name_rank(name: str) -> tuple:
    tokens = re.split(r"[_.\-]", name)
    word = min(
        (i for i, w in enumerate(_SIZE_WORDS) for t in tokens if t == w or t.startswith(w + "0")),
        default=len(_SIZE_WORDS),
    )
    nums = [int(n) for n in re.findall(r"\d+", name)]
    return (bool(_BIG.search(name)), word, nums[:1] or [999], len(name))


def timm_catalog(
    progress: bool = True, per_module: int = 5, modules: list[str] | None = None
) -> dict[str, Any]:
    """``{module: {"model": name | None, "params": n, "candidates": k, "error": str}}`` for every timm module
    (or the listed ones): the smallest of the ``per_module`` candidates ranked first by their names."""
    import timm
    import torch

    out: dict[str, dict[str, Any]] = {}
    for module in modules or timm.list_modules():
        ranked = sorted(timm.list_models(module=module), key=_name_rank)
        small = [n for n in ranked if not _BIG.search(n)] or ranked  # skip obviously large variants
        names = small[:per_module]
        best: tuple[int, str] | None = None
        errors = []
        for name in names:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False, num_classes=10)
                n = sum(p.numel() for p in model.parameters())
                if best is None or n < best[0]:
                    best = (n, name)
            except Exception as e:
                errors.append(f"{name}: {type(e).__name__}: {_first_line(e)}")
        out[module] = {
            "model": best[1] if best else None,
            "params": best[0] if best else 0,
            "candidates": len(names),
            "error": "; ".join(errors[:3]) if best is None else "",
        }
        if progress:
            print(f"  timm {module}: {out[module]['model']} ({out[module]['params'] / 1e6:.2f}M)", flush=True)
    return out


# ------------------------------------------------------------------------------------------- model builders


def _reinit(model: Any, seed: int) -> None:
    """Non-degenerate random weights: norm affines and running stats from the documented ranges, every other
    constant tensor (zero-init layers, layer scales, zero biases) re-drawn."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype))

    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower() or hasattr(module, "running_mean")
            for name, t in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)
            ):
                if t is None or not t.is_floating_point() or id(t) in done or t.numel() == 0:
                    continue
                done.add(id(t))
                if is_norm and name in ("weight", "gamma", "scale", "running_var"):
                    uniform(t, 0.5, 1.5)
                elif is_norm and name in ("bias", "beta", "running_mean"):
                    uniform(t, -0.5, 0.5)
                elif t.numel() >= 2 and bool(t.min() == t.max()):  # constant: zero-init, ones, layer scale
                    if t.ndim >= 2:
                        fan_in = t[0].numel()
                        t.copy_(
                            torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                            / math.sqrt(fan_in)
                        )
                    elif "bias" in name or float(t.flatten()[0]) == 0.0:
                        uniform(t, -0.2, 0.2)
                    else:
                        uniform(t, 0.5, 1.5)


def _images(g: Any, size: int, batch: int = 2) -> Any:
    import torch

    return torch.randn(batch, 3, size, size, generator=g)


def build(
    key: str, catalog: dict[str, Any] | None = None, seed: int = 0
) -> tuple[Any, tuple, Callable[[Any], Any], dict]:
    """``(model, example_inputs, make_batch, info)``: eval-mode float32 model with non-degenerate weights, its
    example inputs (tuple convention of ``fxmerge.testing.zoo``), ``make_batch(generator)`` drawing one data
    batch (tensor or dict of keyword inputs), and ``{"model": name, "input": description}``."""
    import torch

    family, _, name = key.partition("/")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if family == "torchvision":
        import torchvision.models as tvm

        _, size, kwargs, _ = TV_INDEX[name]
        model = getattr(tvm, name)(weights=None, num_classes=10, **kwargs)
        x = _images(g, size)
        make = lambda gen: _images(gen, size, 4)  # noqa: E731
        info = {"model": name, "input": f"2x3x{size}x{size}"}
    elif family == "timm":
        model, x, size, tname = _build_timm(name, catalog or {})
        make = lambda gen: _images(gen, size, 4)  # noqa: E731
        info = {"model": tname, "input": f"2x3x{size}x{size}"}
    elif family == "hf":
        model, x, make, info = _build_hf(name, g)
    else:
        raise ValueError(f"unknown family in {key!r}")
    model.eval()
    _reinit(model, seed + 1)
    return model, (x,), make, info


def _build_timm(module: str, catalog: dict[str, Any]) -> tuple[Any, Any, int, str]:
    import timm
    import torch

    entry = catalog.get(module) or timm_catalog(progress=False, modules=[module]).get(module) or {}
    name = entry.get("model")
    if not name:
        raise RuntimeError(f"no model of timm module {module!r} could be built: {entry.get('error', '?')}")
    default = timm.get_pretrained_cfg(name)
    default_size = int(default.input_size[-1]) if default is not None and default.input_size else 224
    # 112 = 8 x 14 = 7 x 16: patch-14 models (deepseek_vit: 546 px by default, where one float64 forward of its
    # 412M parameters takes minutes) reject 64 and 96
    attempts = [
        ({"img_size": IMG}, IMG),
        ({}, IMG),
        ({"img_size": 96}, 96),
        ({}, 96),
        ({"img_size": 112}, 112),
    ]
    attempts.append(({}, default_size))
    errors = []
    for kwargs, size in attempts:
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            x = _images(torch.Generator().manual_seed(0), size)
            with torch.no_grad():
                model(x)
            return model, x, size, name
        except Exception as e:
            errors.append(f"{kwargs or ''}@{size}: {type(e).__name__}: {_first_line(e)}")
    raise RuntimeError(f"timm {name}: no input size works: " + " | ".join(errors[-2:]))


def _build_hf(name: str, g: Any) -> tuple[Any, Any, Callable[[Any], Any], dict]:
    import torch
    import transformers as tf

    base, _, attn = name.partition("[")
    attn = attn.rstrip("]")
    model_type, head, inputs, config, _ = HF[base]
    config = dict(config)
    experts = config.pop("experts_implementation", None)
    cfg = tf.AutoConfig.for_model(model_type, **config)
    auto = tf.AutoModelForCausalLM if head == "lm" else tf.AutoModel
    kwargs = {"attn_implementation": attn} if attn else {}
    if experts:
        kwargs["experts_implementation"] = experts
    model = auto.from_config(cfg, **kwargs)
    vocab = config.get("vocab_size", 128)

    def tokens(gen: Any, batch: int, length: int = SEQ) -> Any:
        return torch.randint(1, vocab, (batch, length), generator=gen)

    def batch_of(gen: Any, batch: int) -> dict[str, Any]:
        if inputs == "tokens":
            return {"input_ids": tokens(gen, batch)}
        if inputs == "seq2seq":
            return {"input_ids": tokens(gen, batch), "decoder_input_ids": tokens(gen, batch, 6)}
        if inputs == "pixels":
            return {"pixel_values": _images(gen, config["image_size"], batch)}
        if inputs == "clip":
            return {"input_ids": tokens(gen, batch), "pixel_values": _images(gen, _VIS["image_size"], batch)}
        if inputs == "audio":
            return {"input_values": torch.randn(batch, 1600, generator=gen)}
        if inputs == "whisper":
            feats = torch.randn(
                batch, config["num_mel_bins"], 2 * config["max_source_positions"], generator=gen
            )
            return {"input_features": feats, "decoder_input_ids": tokens(gen, batch, 6)}
        raise ValueError(inputs)

    x = batch_of(g, 2)
    desc = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in x.items())
    return model, x, lambda gen: batch_of(gen, 4), {"model": type(model).__name__, "input": desc}


# ------------------------------------------------------------------------------------------------ stages


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {_first_line(e)}"


def _outputs(model: Any, batch: Any) -> list[Any]:
    import torch

    from fxmerge.testing import zoo

    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return [t for t in zoo.output_tensors(out) if t.is_floating_point()]


def _merge_precision(model: Any, x: tuple, data: list[Any], batches: list[Any], rec: dict[str, Any]) -> tuple:
    """``(model, example_inputs, data)`` for the merge stage: the float64 ones when the model runs in float64,
    else a float32 copy (recorded in ``rec``: ``merge_dtype``, why, and the float32 ``recovery_tol``)."""
    import torch

    from fxmerge.testing import zoo

    try:
        _outputs(model, data[0])
        return model, x, data
    except Exception as e64:
        why = _err(e64)
    model32 = copy.deepcopy(model).float()
    data32 = [zoo.cast_inputs((bt,), torch.float32)[0] for bt in batches]
    _outputs(model32, data32[0])  # float32 fails too: the stage's error is this one
    rec.update({"merge_dtype": "float32", "merge_dtype_why": why, "recovery_tol": RECOVERY_TOL_F32})
    return model32, zoo.cast_inputs(x, torch.float32), data32


def onnx_atol(model: Any, x: tuple) -> float:
    """``export_onnx``'s absolute tolerance scaled to the float32 outputs: ``1e-4 * max(1, max|model(x)|)``.
    Random non-degenerate weights can drive outputs to the thousands (timm hardcorenas_b: ~3000), where float32
    rounding alone moves them by ~1e-5 of that scale (float32 vs float64 PyTorch), and onnxruntime's float32
    kernels by as much again; the default ``atol=1e-4`` would then fail a faithful file."""
    return 1e-4 * max([1.0] + [float(t.abs().max()) for t in _outputs(model, x[0]) if t.numel()])


def recovery_tol(rec: dict[str, Any]) -> float:
    return float(rec.get("recovery_tol", RECOVERY_TOL))


def rel_error(model: Any, reference: Any, data: list[Any]) -> float:
    """``max |model - reference| / max(1, max |reference|)`` over every output tensor of every batch."""
    diff, scale = 0.0, 1.0
    for batch in data:
        for a, b in zip(_outputs(model, batch), _outputs(reference, batch), strict=True):
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(b.abs().max()))
    return diff / scale


def run_model(
    key: str,
    catalog: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    save: Callable[[dict], None] | None = None,
    stages: tuple[str, ...] = ("merge", "onnx"),
    methods: tuple[str, ...] = ("act_align", "rebasin"),
) -> dict:
    """Run every stage on ``key`` and return its record; ``save(record)`` is called after each stage."""
    import torch

    import fxmerge
    from fxmerge.testing import zoo

    rec = record if record is not None else {}
    rec.update({"key": key, "family": key.split("/")[0], "stage": "build", "errors": {}})
    rec["stages"] = sorted(stages)
    save = save or (lambda r: None)

    def stage(name: str) -> None:
        rec["stage"] = name
        rec.setdefault("timings", {})
        save(rec)

    t0 = time.perf_counter()
    try:
        model, x, make_batch, info = build(key, catalog)
    except Exception as e:
        rec["errors"]["build"] = _err(e)
        rec["trace"] = traceback.format_exc()[-3000:]
        rec["stage"] = "done"
        return rec
    rec.update(info)
    rec["params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model = model.double()
    x = zoo.cast_inputs(x, torch.float64)
    rec["timings"] = {"build": time.perf_counter() - t0}

    # 1. group inference, strict and not
    spec = None
    for strict in (True, False):
        label = "strict" if strict else "nonstrict"
        stage(f"infer_{label}")
        t = time.perf_counter()
        try:
            s = fxmerge.infer_groups(model, x, strict=strict)
            rec[f"{label}_ok"] = True
            rec[f"{label}_groups"] = len(s)
            rec["frontend"] = s.coverage.frontend
            if not strict:
                spec = s
        except Exception as e:
            rec[f"{label}_ok"] = False
            rec["errors"][f"infer_{label}"] = _err(e)
            if not strict:
                rec["trace"] = traceback.format_exc()[-3000:]
        rec["timings"][f"infer_{label}"] = time.perf_counter() - t
    if spec is None:
        rec["stage"] = "done"
        return rec

    # 3. coverage
    cov = spec.coverage
    rec["permutable"] = cov.n_permutable_elements / cov.n_elements if cov.n_elements else 0.0
    rec["n_frozen"] = len(cov.frozen)
    rec["frozen_no_reason"] = sum(1 for f in cov.frozen if not str(f.reason).strip())
    rec["unsupported"] = sorted({u.target for u in cov.unsupported})

    # 2. soundness
    stage("verify")
    t = time.perf_counter()
    try:
        fxmerge.verify_invariance(model, spec, x, batch=16)
        rec["sound"] = True
    except Exception as e:
        rec["sound"] = False
        rec["errors"]["verify"] = _err(e)
        rec["verify_group"] = getattr(e, "group", None)
        if rec["verify_group"] is not None:
            grp = spec.group(rec["verify_group"])
            rec["verify_members"] = [f"{m.param}[{m.axis}]" for m in list(grp.members)[:4]]
    rec["timings"]["verify"] = time.perf_counter() - t

    # 4. self-merge recovery (act_align, then ONNX of its result, then rebasin: the slowest stage runs last so
    # that its timeout loses nothing else)
    merged, b, data = None, None, []
    skip = ""
    if "merge" not in stages:
        skip = "-"
    elif len(spec) == 0:
        skip = "skipped: no groups"
    elif rec["params"] > MERGE_MAX_PARAMS:
        skip = "skipped: size"
    else:
        stage("merge")
        try:
            from fxmerge.merge.spaces import find_spaces

            stuck = find_spaces(spec)[1]
        except Exception:
            stuck = set()
        carried = [gr.id for gr in spec.groups if gr.id not in stuck]
        rec["identity_groups"] = len(stuck)
        gen = torch.Generator().manual_seed(1)
        batches = [make_batch(gen) for _ in range(3)]
        data = [zoo.cast_inputs((bt,), torch.float64)[0] for bt in batches]
        try:
            model, x, data = _merge_precision(model, x, data, batches, rec)
            b = spec.apply(model, spec.random_perms(torch.Generator().manual_seed(2), carried))
            average = fxmerge.merge(
                [model, b], method="average", example_inputs=x, spec=spec, reset_bn=False, progress=False
            )
            rec["moved"] = rel_error(average.model, model, data)
            for m in (model, b):  # the eager runs above filled eval-mode caches (LeViT): train() clears them
                m.train()
                m.eval()
        except Exception as e:
            rec["errors"]["permute"] = _err(e)

    def recover(method: str) -> Any:
        if skip:
            if skip != "-":
                rec[method] = skip
            return None
        if b is None:
            rec[method] = "n/a"
            return None
        stage(f"merge_{method}")
        t = time.perf_counter()
        result = None
        try:
            result = fxmerge.merge(
                [model, b],
                method=method,
                data=data,
                example_inputs=x,
                spec=spec,
                reset_bn=False,
                progress=False,
            )
            rec[method] = rel_error(result.model, model, data)
        except Exception as e:
            rec[method] = "error"
            rec["errors"][f"merge_{method}"] = _err(e)
            rec.setdefault("merge_trace", traceback.format_exc()[-3000:])
        rec["timings"][f"merge_{method}"] = time.perf_counter() - t
        return None if result is None else result.model

    if "act_align" in methods:
        merged = recover("act_align")

    # 5. ONNX
    if "onnx" in stages and rec["params"] >= ONNX_MAX_PARAMS:
        rec["onnx"] = "skipped: size"
    elif "onnx" in stages:
        stage("onnx")
        t = time.perf_counter()
        target = copy.deepcopy(merged if merged is not None else model).float()  # .float() is in place
        target.train()  # clears eval-mode caches filled in float64 by the merge stage (LeViT)
        target.eval()
        rec["onnx_of"] = "merged" if merged is not None else "original"
        with tempfile.TemporaryDirectory() as tmp:
            x32, path = zoo.cast_inputs(x, torch.float32), os.path.join(tmp, "m.onnx")
            atol = onnx_atol(target, x32)
            rec["onnx_atol"] = atol
            try:
                fxmerge.export_onnx(target, x32, path, atol=atol)
                rec["onnx"] = "ok"
            except Exception as e:
                rec["onnx"] = "error"
                rec["errors"]["onnx"] = _err(e)
            if rec["onnx"] == "error":
                try:
                    fxmerge.export_onnx(target, x32, path, exporter="trace", atol=atol)
                    rec["onnx"] = "ok (trace)"
                    rec["onnx_dynamo_error"] = rec["errors"].pop("onnx")
                except Exception as e:
                    rec["errors"]["onnx_trace"] = _err(e)
        rec["timings"]["onnx"] = time.perf_counter() - t

    if "rebasin" in methods:
        recover("rebasin")
    rec["stage"] = "done"
    save(rec)
    return rec


# ------------------------------------------------------------------------------------------------- status


def red_stages(rec: dict[str, Any]) -> list[str]:
    """Stages that failed a target (strict mode and rebasin are reported, not targets; rebasin runs last, so a
    timeout there leaves every target stage measured)."""
    if rec.get("timeout") and rec.get("stage") == "merge_rebasin" and "onnx" in rec:
        return _red(rec)
    if rec.get("timeout"):
        return [f"timeout({rec.get('stage', '?')})"] + [s for s in _red(rec) if s != "build"]
    return _red(rec)


def _red(rec: dict[str, Any]) -> list[str]:
    if "build" in rec.get("errors", {}):
        return ["build"]
    out = []
    if rec.get("crash"):
        out.append("crash")
    if rec.get("nonstrict_ok") is False:
        out.append("infer")
    if rec.get("sound") is False:
        out.append("unsound")
    if rec.get("frozen_no_reason"):
        out.append("reason")
    aa = rec.get("act_align")
    if (isinstance(aa, float) and aa > recovery_tol(rec)) or aa in ("error", "n/a"):
        out.append("act_align")
    if rec.get("onnx") == "error":
        out.append("onnx")
    return out


def status(rec: dict[str, Any]) -> str:
    red = red_stages(rec)
    return "red: " + ", ".join(red) if red else "green"


# ------------------------------------------------------------------------------------------------- runner


def load_cache(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"results": {}, "timm_catalog": None}


def _slim(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` with its tracebacks cut to their last ``TRACE_CHARS`` characters (the cache is tracked)."""
    return {
        k: (v[-TRACE_CHARS:] if k in ("trace", "merge_trace") and isinstance(v, str) else v)
        for k, v in rec.items()
    }


def dumps_cache(cache: dict[str, Any]) -> str:
    """JSON with sorted keys, one line per model record and per timm catalog entry (a re-run model is a
    one-line diff)."""

    def one(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    parts = []
    for key in sorted(cache):
        value = cache[key]
        if key in ("results", "timm_catalog") and isinstance(value, dict) and value:
            recs = value if key == "timm_catalog" else {k: _slim(r) for k, r in value.items()}
            body = ",\n".join(f"  {one(k)}: {one(recs[k])}" for k in sorted(recs))
            parts.append(f" {one(key)}: {{\n{body}\n }}")
        elif isinstance(value, list) and value:
            body = ",\n".join(f"  {one(v)}" for v in value)
            parts.append(f" {one(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {one(key)}: {one(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


_SAVE_LOCK = threading.Lock()


def save_cache(path: Path, cache: dict[str, Any]) -> None:
    """Write ``cache`` atomically (a temporary file next to ``path``, then renamed over it; ``--jobs`` threads
    take turns)."""
    with _SAVE_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(dumps_cache(cache))
        tmp.replace(path)


def all_entries(catalog: dict[str, Any]) -> list[Entry]:
    out = [
        Entry(f"torchvision/{factory}", "torchvision", kind, fam) for fam, factory, _, _, kind in TORCHVISION
    ]
    for key, kind in hf_keys():
        base = key.split("/")[1].partition("[")[0]
        out.append(Entry(key, "hf", kind, HF[base][4]))
    for module, info in sorted(catalog.items()):
        out.append(
            Entry(f"timm/{module}", "timm", "vit" if _is_vit(module) else "cnn", info.get("model") or "-")
        )
    return out


_VIT_WORDS = (
    "vit",
    "deit",
    "beit",
    "cait",
    "swin",
    "xcit",
    "eva",
    "former",
    "coat",
    "convit",
    "crossvit",
    "davit",
    "hiera",
    "levit",
    "maxxvit",
    "mvit",
    "nest",
    "pit",
    "pvt",
    "tnt",
    "twins",
    "volo",
    "gcvit",
    "focalnet",
    "mixer",
    "sequencer",
    "tiny_vit",
    "visformer",
    "vitamin",
    "iformer",
)


def _is_vit(module: str) -> bool:
    return any(w in module for w in _VIT_WORDS)


def worker_main(
    key: str,
    result_path: str,
    catalog_path: str,
    stages: tuple[str, ...] = ("merge", "onnx"),
    methods: tuple[str, ...] = ("act_align", "rebasin"),
) -> None:
    import torch

    torch.set_num_threads(1)
    catalog = json.loads(Path(catalog_path).read_text()) if catalog_path else {}

    def save(rec: dict) -> None:
        tmp = result_path + ".tmp"
        Path(tmp).write_text(json.dumps(rec, default=str))
        os.replace(tmp, result_path)

    rec: dict[str, Any] = {}
    try:
        run_model(key, catalog, rec, save, stages=stages, methods=methods)
    except BaseException as e:
        rec["crash"] = _err(e)
        rec["trace"] = traceback.format_exc()[-3000:]
    save(rec)


def run_one(
    key: str,
    timeout: float,
    catalog_path: str,
    stages: str = "merge,onnx",
    methods: str = "act_align,rebasin",
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [
            "nice",
            "-n",
            "10",
            sys.executable,
            __file__,
            "--_worker",
            key,
            "--_result",
            result,
            "--_catalog",
            catalog_path,
            "--stages",
            stages,
            "--methods",
            methods,
        ]
        t = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
        rec = json.loads(Path(result).read_text()) if os.path.exists(result) else {"key": key, "errors": {}}
        rec["wall"] = time.perf_counter() - t
        rec["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if timed_out:
            rec["timeout"] = timeout
        elif proc.returncode != 0 and rec.get("stage") != "done":
            rec["crash"] = f"exit status {proc.returncode}: " + (out or "").strip()[-300:]
        return rec


def stages_done(rec: dict[str, Any]) -> set[str]:
    """The optional stages ``rec`` went through (older records, written before ``stages`` was kept, are read
    off their fields)."""
    if "stages" in rec:
        return set(rec["stages"])
    done = set()
    if "act_align" in rec or "rebasin" in rec:
        done.add("merge")
    if "onnx" in rec:
        done.add("onnx")
    return done


def fill_size_skips(rec: dict[str, Any], stages: set[str]) -> bool:
    """Complete a finished record of a model too large for every stage in ``stages`` (what ``run_model`` would
    write for it: ``skipped: size``) without running it again; True when ``rec`` now covers ``stages``."""
    wanted = stages - stages_done(rec)
    finished = rec.get("stage") == "done" and not rec.get("timeout") and not rec.get("crash")
    if not wanted or not finished or "sound" not in rec:
        return not wanted
    params = rec.get("params", 0)
    if ("merge" in wanted and params <= MERGE_MAX_PARAMS) or ("onnx" in wanted and params < ONNX_MAX_PARAMS):
        return False
    if "merge" in wanted:
        rec["act_align"] = rec["rebasin"] = "skipped: size"
    if "onnx" in wanted:
        rec["onnx"] = "skipped: size"
    rec["stages"] = sorted(stages_done(rec) | wanted)
    return True


def select(entries: list[Entry], args: argparse.Namespace, cache: dict[str, Any]) -> list[Entry]:
    if args.family != "all":
        entries = [e for e in entries if e.family == args.family]
    if args.slice == "representative":
        entries = [e for e in entries if e.key in REPRESENTATIVE]
    if args.only:
        entries = [e for e in entries if any(s in e.key for s in args.only.split(","))]
    if args.exclude:
        entries = [e for e in entries if not any(s in e.key for s in args.exclude.split(","))]
    done = cache["results"]
    if args.rerun_failed:
        entries = [e for e in entries if e.key not in done or status(done[e.key]) != "green"]
    elif args.resume:  # missing, or run without one of the requested stages (e.g. an earlier --stages none)
        wanted = {x for x in args.stages.split(",") if x != "none"}
        entries = [e for e in entries if e.key not in done or not fill_size_skips(done[e.key], wanted)]
    if args.smallest_first:  # by the parameter count of an earlier run (unknown: last)
        entries.sort(key=lambda e: done.get(e.key, {}).get("params") or math.inf)
    return entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--only", help="comma-separated substrings of the model key (e.g. 'resnet,hf/llama')")
    p.add_argument("--exclude", help="comma-separated substrings of model keys to leave out")
    p.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    p.add_argument("--slice", choices=["all", "representative"], default="all")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per model (default 180)")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel (default 1)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--rerun-failed", action="store_true", help="only models that are missing or not green")
    p.add_argument(
        "--resume",
        action="store_true",
        help="only models not in the cache yet, or cached without one of --stages (a model too large for "
        "those stages gets 'skipped: size' without running again)",
    )
    p.add_argument("--report-only", action="store_true", help="regenerate --out from the cache and exit")
    p.add_argument("--list", action="store_true", help="print the selected model keys and exit")
    p.add_argument(
        "--smallest-first", action="store_true", help="run the models by size (as cached), smallest first"
    )
    p.add_argument(
        "--stages", default="merge,onnx",
        help="optional stages after infer + verify: 'merge,onnx' (default), 'onnx', 'merge' or 'none'",
    )  # fmt: skip
    p.add_argument(
        "--methods",
        default="act_align,rebasin",
        help="self-merge methods of the merge stage: 'act_align,rebasin' (default) or 'act_align' (rebasin is "
        "reported, not a target, and the slowest stage)",
    )
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_catalog", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        stages = tuple(x for x in args.stages.split(",") if x != "none")
        worker_main(args._worker, args._result, args._catalog, stages, tuple(args.methods.split(",")))
        return 0

    cache = load_cache(args.cache)
    command = "python benchmarks/zoo_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.report_only:
        if not cache["results"]:
            print(f"no results in {args.cache}: nothing to report", file=sys.stderr)
            return 1
        write_report(cache, args.out, _commands(cache) or [command], args.cache)
        print(f"wrote {args.out} from {args.cache}")
        return 0
    if not cache.get("timm_catalog") and args.family in ("timm", "all"):
        print("choosing the smallest model of every timm module (meta device) ...", flush=True)
        cache["timm_catalog"] = timm_catalog()
        save_cache(args.cache, cache)
    catalog = cache.get("timm_catalog") or {}
    entries = select(all_entries(catalog), args, cache)
    if args.list:
        print("\n".join(e.key for e in entries))
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(catalog, f)
        catalog_path = f.name
    kinds = {e.key: e for e in entries}
    print(f"{len(entries)} models, timeout {args.timeout:.0f} s, {args.jobs} job(s)", flush=True)

    def one(entry: Entry) -> None:
        rec = run_one(entry.key, args.timeout, catalog_path, args.stages, args.methods)
        rec["kind"], rec["pattern"] = kinds[entry.key].kind, kinds[entry.key].pattern
        cache["results"][entry.key] = rec
        cache["libraries"] = _libraries()
        save_cache(args.cache, cache)
        errs = "; ".join(f"{k}: {v}" for k, v in rec.get("errors", {}).items())[:200]
        print(f"[{rec.get('wall', 0):6.1f}s] {entry.key:45s} {status(rec)}  {errs}", flush=True)

    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, entries))
    finally:
        os.unlink(catalog_path)
        if not args.only and args.slice == "all" and args.family == "all" and not args.rerun_failed:
            cache["commands"] = [command]
        elif command not in _commands(cache):
            cache["commands"] = [*_commands(cache), command]
        save_cache(args.cache, cache)
        write_report(cache, args.out, _commands(cache), args.cache)
        print(f"wrote {args.out} from {args.cache}")
    return 0


# ------------------------------------------------------------------------------------------------- report


def _fmt_err(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1e}"
    return "-" if v is None else str(v)


def _timed_out_in(rec: dict[str, Any], stage: str) -> str | None:
    return "timeout" if rec.get("timeout") and rec.get("stage") == stage else None


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, float) else "-"


def _ok(v: Any) -> str:
    return {True: "yes", False: "**no**", None: "-"}.get(v, str(v))


# Diagnoses of rows that are not green, written by whoever investigated them (shown after the measured reason;
# a row that turns green hides its note). Keep them to what was measured.
DIAGNOSES: dict[str, str] = {
    "timm/byoanet": "halonet_h1 builds only at its 256 px default (64, 96 and 112 px fail), so it runs with a "
    "1500 s limit (build, infer and verify ~135 s, act_align ~195 s, ONNX ~180 s on a loaded 2-core machine); "
    "the ONNX failure is torch.onnx's, not the merge's: the unmerged model exported by the dynamo exporter also "
    "disagrees with PyTorch (max abs diff 25.8 on the example inputs) and the trace exporter fails on it; "
    "fxmerge's check refuses to write the file",
    "timm/deepseek_vit": "cost, not a hotspot (cProfile of infer_groups): 412M parameters at 546 px, where one "
    "float64 forward takes minutes on one core and inference runs ~7 (capture, the gate's reference and "
    "permuted passes); at 112 px one forward takes 12 s and infer_groups(strict=False) 170 s, all of it linear "
    "in the model (forwards, parameter permutation and copies)",
}


def _reason(rec: dict[str, Any]) -> str:
    parts = []
    if rec.get("timeout"):
        parts.append(f"timed out after {rec['timeout']:.0f} s in stage {rec.get('stage')}")
    if rec.get("crash"):
        parts.append(f"crash: {rec['crash']}")
    for stage_name, msg in rec.get("errors", {}).items():
        if stage_name == "infer_strict":
            continue  # the unsupported ops are listed below
        if stage_name == "verify" and rec.get("verify_members"):
            msg += f" (members {', '.join(rec['verify_members'])})"
        parts.append(f"{stage_name}: {msg}")
    if rec.get("onnx_dynamo_error"):
        parts.append(f"onnx by the trace exporter, the dynamo one fails: {rec['onnx_dynamo_error']}")
    if rec.get("frozen_no_reason"):
        parts.append(f"{rec['frozen_no_reason']} frozen axes without a reason")
    if rec.get("unsupported"):
        parts.append(
            "ops without a rule (frozen): "
            + ", ".join(f"`{u}`" for u in rec["unsupported"][:6])
            + (" ..." if len(rec["unsupported"]) > 6 else "")
        )
    if rec.get("merge_dtype"):
        parts.insert(
            0,
            f"merge stage in {rec['merge_dtype']} (float64 forward fails: {rec.get('merge_dtype_why', '?')}), "
            f"recovery passes at <= {recovery_tol(rec):g}",
        )
    for m in ("act_align", "rebasin"):
        if isinstance(rec.get(m), float) and rec[m] > recovery_tol(rec):
            parts.append(f"{m} recovers with error {rec[m]:.1e}")
    note = DIAGNOSES.get(rec.get("key", "")) if red_stages(rec) else None
    text = "; ".join(parts)[:600] + (f"; diagnosis: {note}" if note else "")
    return text.replace("|", "\\|").replace("\n", " ")


def _commands(cache: dict[str, Any]) -> list[str]:
    """The runs whose results the cache holds, in order (older caches kept one ``command``)."""
    return list(cache.get("commands") or ([cache["command"]] if cache.get("command") else []))


def _libraries() -> dict[str, str]:
    return {pkg: _version(pkg) for pkg in ("torch", "torchvision", "timm", "transformers")}


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _reconstructed_note(recs: list[dict[str, Any]]) -> list[str]:
    rebuilt = [r for r in recs if r.get("reconstructed")]
    if not rebuilt:
        return []
    sources = sorted({str(r["reconstructed"]) for r in rebuilt if isinstance(r["reconstructed"], str)})
    return [
        f"{len(rebuilt)} of the {len(recs)} records were reconstructed from this page "
        + (f"({'; '.join(sources)}) " if sources else "")
        + "after the untracked cache they came from was lost; they hold only what the page showed (no timings, "
        "no strict-mode error messages, parameter counts to 0.01M, the frozen-axis count as one total). A "
        "re-run of a model replaces its record.",
        "",
    ]


def write_report(cache: dict[str, Any], out: Path, commands: list[str], cache_path: Path = CACHE) -> None:
    results = cache["results"]
    catalog = cache.get("timm_catalog") or {}
    entries = [e for e in all_entries(catalog) if e.key in results]
    recs = [results[e.key] | {"kind": e.kind, "pattern": e.pattern} for e in entries]
    libs = {**_libraries(), **(cache.get("libraries") or {})}
    lines = [
        "# Compatibility",
        "",
        "<!-- generated by benchmarks/zoo_sweep.py; do not edit by hand -->",
        "",
        "Generated by `benchmarks/zoo_sweep.py` (do not edit by hand) from the runs below, in order (a later "
        "run replaces the records of the models it ran; each model ran in its own process, one at a time):",
        "",
        "```bash\n" + "\n".join(commands) + "\n```",
        "",
        f"Regenerate this page from the cache (`{_display_path(cache_path)}`, tracked: one record per model, "
        f"a partial run replaces only the records of the models it ran) with "
        f"`python benchmarks/zoo_sweep.py --report-only`; re-run only the models that are not green with "
        f"`python benchmarks/zoo_sweep.py --rerun-failed`. Library: torch {libs['torch']}, torchvision "
        f"{libs['torchvision']}, timm {libs['timm']}, transformers {libs['transformers']}.",
        "",
        *_reconstructed_note(recs),
        "Every model is random-initialised from its config (nothing downloaded) with non-degenerate weights "
        "(norm gammas and running variances in U[0.5, 1.5], betas and running means in U[-0.5, 0.5], every "
        "zero-init or constant tensor re-drawn) and run in float64 through: `infer_groups` (strict and "
        f"non-strict), `verify_invariance(batch=16)` on the non-strict spec, self-merge recovery (models up to "
        f"{MERGE_MAX_PARAMS / 1e6:.0f}M parameters: B = A with every carried group randomly permuted, "
        f"`merge([A, B], reset_bn=False)`, relative output error `max|merged - A| / max(1, max|A|)` over 3 "
        f"batches, pass at <= {RECOVERY_TOL:g}; a model whose float64 forward fails, i.e. a kernel without a "
        f"float64 CPU implementation such as the grouped matmul of Hugging Face MoE experts, runs this stage in "
        f"float32 and passes at <= {RECOVERY_TOL_F32:g}, said in its row) and ONNX export of the merged model in "
        f"float32 (models under "
        f"{ONNX_MAX_PARAMS / 1e6:.0f}M parameters; onnxruntime must match PyTorch within "
        "`atol = 1e-4 * max(1, max|output|)`, `rtol = 1e-3`) with the default dynamo exporter, or where that one fails "
        "with `exporter='trace'`, which fxmerge also checks on inputs that take other branches (`ok (trace)`, the "
        "dynamo error in the row). A model is **green** when non-strict inference finishes, the "
        "spec is sound, every frozen axis has a reason, act_align recovers A and the ONNX export verifies; "
        "strict-mode failures (an op without a rule) and rebasin recovery are reported, not targets.",
        "",
    ]
    lines += _summary(recs, cache.get("lost_totals") or {})
    lines += ["", "## Models", ""]
    for family in FAMILIES:
        rows = [r for r in recs if r["family"] == family]
        if not rows:
            continue
        lines += [
            f"### {family}",
            "",
            "| model | params | input | frontend | strict | non-strict (groups) | sound | permutable % "
            "| act_align err | rebasin err | onnx | status | reason |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            name = r["key"].split("/", 1)[1]
            model = r.get("model", "")
            label = f"{name} (`{model}`)" if family == "timm" else name
            params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
            ns = (
                f"{_ok(r.get('nonstrict_ok'))} ({r.get('nonstrict_groups', '-')})"
                if "nonstrict_ok" in r
                else "-"
            )
            lines.append(
                f"| {label} | {params} | {r.get('input', '-')} | {r.get('frontend', '-')} | "
                f"{_ok(r.get('strict_ok'))} | {ns} | {_ok(r.get('sound'))} | {_pct(r.get('permutable'))} | "
                f"{_fmt_err(r.get('act_align'))} | {_fmt_err(r.get('rebasin', _timed_out_in(r, 'merge_rebasin')))} | {_fmt_err(r.get('onnx'))} | "
                f"{status(r)} | {_reason(r)} |"
            )
        lines.append("")
    out.write_text("\n".join(lines))


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return "?"


def _frozen_axes(specs: list[dict[str, Any]], lost: dict[str, Any]) -> tuple[int, int]:
    """``(frozen axes, models whose count is unknown)``. Reconstructed records have no per-model count; the
    total over them (``lost_totals["n_frozen"]``: ``{"total", "keys"}``) is added while every one of those
    models still holds its reconstructed record (once one is re-run, the old total cannot be split)."""
    frozen = sum(r.get("n_frozen", 0) for r in specs)
    unknown = {r["key"] for r in specs if "n_frozen" not in r}
    old = lost.get("n_frozen") or {}
    if unknown and old and set(old.get("keys", [])) == unknown:
        return frozen + int(old["total"]), 0
    return frozen, len(unknown)


def _summary(recs: list[dict[str, Any]], lost: dict[str, Any] | None = None) -> list[str]:
    lines = [
        "## Summary",
        "",
        "| family | models | green | red | build failed | infer | unsound | no reason "
        "| act_align | onnx | timeout | merge skipped (size) | onnx skipped (size) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in (*FAMILIES, "total"):
        rows = [r for r in recs if family == "total" or r["family"] == family]
        if not rows:
            continue
        reds = [red_stages(r) for r in rows]

        def count(stage: str, reds: list[list[str]] = reds) -> int:
            return sum(any(s == stage or s.startswith(stage + "(") for s in red) for red in reds)

        lines.append(
            f"| {family} | {len(rows)} | {sum(not r for r in reds)} | {sum(bool(r) for r in reds)} | "
            f"{count('build')} | {count('infer')} | {count('unsound')} | {count('reason')} | {count('act_align')} | "
            f"{count('onnx')} | {count('timeout')} | "
            f"{sum(r.get('act_align') == 'skipped: size' for r in rows)} | "
            f"{sum(r.get('onnx') == 'skipped: size' for r in rows)} |"
        )
    lines += ["", "## Targets (issue #12)", "", "| target | measured | met |", "|---|---|---|"]
    built = [r for r in recs if "build" not in r.get("errors", {})]
    specs = [r for r in built if "sound" in r]
    unsound = [r for r in specs if r["sound"] is False]
    lines.append(
        f"| 0 unsound specs | {len(unsound)} unsound of {len(specs)} verified | {_met(not unsound)} |"
    )

    def finish_rate(family: str) -> tuple[int, int]:
        rows = [r for r in recs if r["family"] == family]
        if family == "hf":  # per architecture: every attention implementation must finish
            archs: dict[str, bool] = {}
            for r in rows:
                arch = r["key"].partition("[")[0]
                archs[arch] = archs.get(arch, True) and r.get("nonstrict_ok") is True
            return sum(archs.values()), len(archs)
        return sum(r.get("nonstrict_ok") is True for r in rows), len(rows)

    for family, need in (("torchvision", 1.0), ("hf", 1.0), ("timm", 0.95)):
        ok, n = finish_rate(family)
        if n:
            what = {"torchvision": "torchvision families", "hf": "HF architectures", "timm": "timm modules"}[
                family
            ]
            lines.append(
                f"| `infer_groups(strict=False)` finishes on >= {100 * need:.0f}% of {what} | "
                f"{ok}/{n} ({100 * ok / n:.1f}%) | {_met(ok >= need * n)} |"
            )
    for kind, what in (("cnn", "CNNs"), ("vit", "vision transformers")):
        fr = [
            r["permutable"] for r in specs if r.get("kind") == kind and isinstance(r.get("permutable"), float)
        ]
        if fr:
            med = statistics.median(fr)
            lines.append(
                f"| median permutable fraction >= 0.95 on {what} | {med:.3f} over {len(fr)} models "
                f"| {_met(med >= 0.95)} |"
            )
    noreason = sum(r.get("frozen_no_reason", 0) for r in specs)
    frozen, uncounted = _frozen_axes(specs, lost or {})
    lines.append(
        f"| every frozen axis has a reason | {noreason} of {frozen} frozen axes without one"
        + (f" ({uncounted} reconstructed models without a frozen-axis count)" if uncounted else "")
        + f" | {_met(noreason == 0)} |"
    )
    eligible = [r for r in specs if r.get("params", 0) <= MERGE_MAX_PARAMS and r.get("nonstrict_ok")]
    aa = [r for r in eligible if isinstance(r.get("act_align"), float) and r["act_align"] <= recovery_tol(r)]
    f32 = sum(r.get("merge_dtype") == "float32" for r in eligible)
    lines.append(
        f"| act_align self-merge recovery <= {RECOVERY_TOL:g} on 100% of models up to "
        f"{MERGE_MAX_PARAMS / 1e6:.0f}M params | {len(aa)}/{len(eligible)} "
        f"({100 * len(aa) / max(1, len(eligible)):.1f}%)"
        + (f"; {f32} of them in float32 at <= {RECOVERY_TOL_F32:g} (no float64 kernel)" if f32 else "")
        + f" | {_met(len(aa) == len(eligible))} |"
    )
    rb = [r for r in eligible if isinstance(r.get("rebasin"), float) and r["rebasin"] <= recovery_tol(r)]
    ran = [r for r in eligible if "rebasin" in r or _timed_out_in(r, "merge_rebasin")]
    lines.append(
        f"| rebasin recovery rate (reported) | {len(rb)}/{len(ran)} of the models it ran on "
        f"({100 * len(rb) / max(1, len(ran)):.1f}%; not run on {len(eligible) - len(ran)} of the "
        f"{len(eligible)} eligible models: `--methods act_align`) | - |"
    )
    strict = [r for r in built if r.get("strict_ok") is True]
    lines.append(
        f"| strict inference (reported) | {len(strict)}/{len(built)} models have a rule for every op | - |"
    )
    missing = [m for m, info in (_catalog_errors(recs)).items() if info]
    if missing:
        lines += ["", "timm modules where no model could be built: " + ", ".join(missing)]
    return lines


def _catalog_errors(recs: list[dict[str, Any]]) -> dict[str, str]:
    return {
        r["key"]: r["errors"]["build"]
        for r in recs
        if r["family"] == "timm" and "build" in r.get("errors", {})
    }


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


if __name__ == "__main__":
    sys.exit(main())
