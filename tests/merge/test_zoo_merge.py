"""Every kind of zoo model merges end to end: two random initialisations, activation alignment on random
data, the merged model runs, is finite, has the parents' output shape and differs from both parents.

Exactness is tested elsewhere (identity recovery); this sweep guards the plumbing (capture frontends,
structured spaces, probe points, BN reset) across torchvision, timm and Hugging Face graphs.
"""

from __future__ import annotations

import pytest
import torch

import fxmerge
from fxmerge.testing import zoo

FAST = ["unet_small", "nanogpt", "tiny_llama", "resnet18", "shufflenet_v2_x0_5", "squeezenet1_0", "vit_small"]
SLOW = ["mobilenet_v3_small", "googlenet", "timm_convnext_atto", "bert_model", "gpt2_lm_head"]


def _batches(inputs: tuple, n: int, size: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for x in inputs:
            if not isinstance(x, torch.Tensor):
                batch.append(x)
            elif x.is_floating_point():
                batch.append(torch.randn((size, *x.shape[1:]), generator=g, dtype=x.dtype))
            else:
                batch.append(torch.randint(0, int(x.max()) + 1, (size, *x.shape[1:]), generator=g, dtype=x.dtype))
        out.append(tuple(batch) if len(batch) > 1 else batch[0])
    return out


def _first_tensor(out):
    return zoo.output_tensors(out)[0]


def _check(name: str) -> None:
    a, inputs = zoo.build(name, 0)
    b, _ = zoo.build(name, 1)
    if any(isinstance(x, dict) for x in inputs):
        pytest.skip("keyword-input models are covered by the export tests")
    data = _batches(inputs, 2, 4, seed=0)
    res = fxmerge.merge([a, b], method="act_align", data=data, example_inputs=inputs, progress=False)
    with torch.no_grad():
        out, ref_a, ref_b = (_first_tensor(zoo.call(m.eval(), inputs)) for m in (res.model, a, b))
    assert out.shape == ref_a.shape
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref_a) and not torch.equal(out, ref_b)
    assert res.report["spaces"] > 0


@pytest.mark.parametrize("name", FAST)
def test_zoo_model_merges(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_zoo_model_merges_slow(name):
    _check(name)
