"""The ViT head analysis of examples/digits_norm_study.py: the head rotation is an exact symmetry, and the head
overlap measures what it claims (1 for identical heads)."""

from __future__ import annotations

import copy

import torch

from tests.merge.test_digits_example import load_example


def _vit(seed: int) -> torch.nn.Module:
    dc = load_example("digits_common")
    model = dc.make_model("vit", 16, seed=seed).double().eval()
    with torch.no_grad():  # move the biases off zero so the rotation has to carry them too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    return model


def test_rotate_heads_preserves_the_function_and_aligns_a_rotated_copy() -> None:
    ns = load_example("digits_norm_study")
    a, b = _vit(0), _vit(1)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rotated = ns.rotate_heads(a, b, x)
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), b(x), rtol=0, atol=1e-10)
    assert not torch.allclose(rotated.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    # a copy of ``a`` with a random orthogonal matrix inside head 0's value dims is rotated back onto ``a``
    copy_a = copy.deepcopy(a)
    d = 16 // ns.VIT_HEADS
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    attn = copy_a.blocks[0].attn
    with torch.no_grad():
        rows = slice(32, 32 + d)
        attn.qkv.weight[rows] = q @ attn.qkv.weight[rows]
        attn.qkv.bias[rows] = q @ attn.qkv.bias[rows]
        attn.proj.weight[:, :d] = attn.proj.weight[:, :d] @ q.T
    back = ns.rotate_heads(a, copy_a, x)
    torch.testing.assert_close(back.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight, rtol=0, atol=1e-8)
    torch.testing.assert_close(back.blocks[0].attn.proj.weight, a.blocks[0].attn.proj.weight, rtol=0, atol=1e-8)


def test_head_overlap_is_one_for_identical_heads_and_lower_for_other_models() -> None:
    ns = load_example("digits_norm_study")
    a, b = _vit(0), _vit(1)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    same = ns.head_overlap([a, copy.deepcopy(a)], x)
    assert all(abs(v["across"] - 1.0) < 1e-12 for v in same.values())
    other = ns.head_overlap([a, b], x)
    for block, v in other.items():
        assert 0.0 < v["across"] < 1.0 and 0.0 < v["within"] < 1.0, (block, v)
