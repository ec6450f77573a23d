"""Zoo: group inference on real architectures (random init, nothing downloaded), verified by invariance.

For each model the test also asserts a lower bound on what is permutable, so a regression that silently
freezes everything fails. The bounds follow from the architecture:

* CNNs: every conv/linear output channel set that is not a model output is a group (residual stages share
  one), so nearly all weight tensors (>= 99% of elements) carry a group.
* transformers: the residual stream, every MLP hidden layer and the attention heads (with per-head inner
  groups) are groups; only token-indexed tables (vocab rows, positions) and the output head's rows freeze.
"""

from __future__ import annotations

import random

import pytest
import torch

import fxmerge
from fxmerge.testing.zoo import ZOO, build

# name: (frontends, min groups, min fraction of parameter elements in tensors with a permutable axis)
EXPECT: dict[str, tuple[tuple[str, ...], int, float]] = {
    "mlp": (("fx", "export"), 3, 0.99),  # 3 hidden layers
    "resnet20a": (("fx", "export"), 10, 0.99),  # 3 stage streams + 9 block-internal (option-A pads link stages)
    "vgg_flatten": (("fx", "export"), 3, 0.99),  # flatten -> Linear keeps the conv channel group (x 64 positions)
    "unet_small": (("fx", "export"), 40, 0.99),  # GroupNorm(4): 4-block outer groups with per-group inner groups
    "nanogpt": (("fx", "export"), 21, 0.99),  # stream + per layer: heads, 4 q/k inner, 4 v inner, MLP
    "tiny_llama": (("fx", "export"), 11, 0.99),  # stream + per layer: kv heads, q-in-group, 2 v inner, MLP
    "resnet18": (("fx", "export"), 12, 0.99),  # 4 stage streams + 8 block-internal
    "resnet50": (("fx", "export"), 37, 0.99),  # 4 streams + 2 per bottleneck (16 blocks) + stem
    "vgg11_bn": (("fx", "export"), 10, 0.99),  # 8 conv + 2 hidden linear
    "mobilenet_v2": (("fx", "export"), 25, 0.99),
    "mobilenet_v3_small": (("fx", "export"), 27, 0.99),
    "efficientnet_b0": (("fx", "export"), 40, 0.99),
    "densenet121": (("fx", "export"), 120, 0.99),  # concat chains split into per-layer parts
    "googlenet": (("fx", "export"), 57, 0.99),
    "shufflenet_v2_x0_5": (("fx", "export"), 30, 0.99),  # channel shuffle forces shared inner terms
    "squeezenet1_0": (("fx", "export"), 25, 0.99),
    "resnext50_32x4d": (("fx",), 500, 0.99),  # grouped conv: 32 blocks with per-block inner groups
    "regnet_y_400mf": (("fx",), 40, 0.99),
    "convnext_tiny": (("fx",), 20, 0.99),
    "vit_small": (("fx", "export"), 12, 0.98),  # MHA leaf (fx) or its decomposition (export)
    "swin_t": (("export",), 20, 0.9),
    "timm_vit_tiny": (("fx", "export"), 10, 0.98),
    "timm_convnext_atto": (("fx",), 10, 0.99),
    "timm_resnetv2_50x1_bit": (("fx",), 30, 0.99),
    "timm_mixer_s16_224": (("fx",), 4, 0.95),
    "timm_mobilevit_xxs": (("export",), 10, 0.9),
    "bert_model": (("export",), 8, 0.8),  # returns hidden states: the (frozen) output pins the residual stream
    "gpt2_lm_head": (("export",), 8, 0.9),
    "llama_causal_lm": (("export",), 8, 0.9),
    "t5_model": (("export",), 8, 0.9),
    "vit_model": (("export",), 8, 0.75),  # returns hidden states + pooler: the stream is pinned by the output
}

CASES = [(n, fe) for n, (fes, _, _) in EXPECT.items() for fe in fes]
MAX_SINGLE = 12  # groups checked one by one (a seeded sample); all groups are also checked in chunks


def test_expectations_cover_the_zoo():
    assert set(EXPECT) == set(ZOO)


@pytest.mark.parametrize(("name", "frontend"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_zoo_groups_are_invariant(name: str, frontend: str):
    model, inputs = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = fxmerge.infer_groups(model, inputs, frontend=frontend)
    _, min_groups, min_frac = EXPECT[name]
    cov = spec.coverage
    assert len(spec) >= min_groups, str(cov)
    assert cov.permutable_fraction >= min_frac, str(cov)
    ids = [g.id for g in spec.groups]
    sample = sorted(random.Random(0).sample(ids, min(MAX_SINGLE, len(ids))))
    report = fxmerge.verify_invariance(model, spec, inputs, groups=sample)
    assert max(report.per_group.values()) <= 1e-9 + 1e-6 * max(report.scale, 1.0)
    fxmerge.verify_invariance(model, spec, inputs, batch=32, seed=1)
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(before[k], v), k


def test_swin_fx_reports_every_unsupported_op():
    model, inputs = build("swin_t")
    with pytest.raises(fxmerge.UnsupportedOpsError) as err:
        fxmerge.infer_groups(model, inputs, frontend="fx")
    msg = str(err.value)
    assert "shifted_window_attention" in msg and "@fxmerge.rule" in msg
    assert len(err.value.records) >= 2


def test_free_outputs_unpins_the_stream():
    model, inputs = build("bert_model")
    pinned = fxmerge.infer_groups(model, inputs)
    free = fxmerge.infer_groups(model, inputs, free_outputs=True)
    assert free.coverage.permutable_fraction > pinned.coverage.permutable_fraction
    assert free.coverage.permutable_fraction >= 0.99
