"""Contractions (linear, matmul, einsum), convolutions and embeddings."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.infer.context import LETTERS, TV, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.ir.dims import Dims
from fxmerge.ir.terms import product

_BATCH = LETTERS[:20]


def _linear(ctx: RuleContext, x: TV, w: TV, b: TV | None, out) -> Dims:
    if w.ndim != 2:
        ctx.freeze(x, "linear with a non-matrix weight")
        ctx.freeze(w, "linear with a non-matrix weight")
        return ctx.fixed(out.shape)
    lead = _BATCH[: x.ndim - 1]
    ops = [(x, lead + "Y"), (w, "ZY")]
    if b is not None:
        ops.append((b, "Z"[: b.ndim] if b.ndim else ""))
    return ctx.link(ops, lead + "Z", out.shape)


@rule(nn.Linear, key="linear")
def linear_module(ctx: RuleContext, call: Call):
    return _linear(ctx, call.arg(0, "input"), call.param("weight"), call.param("bias"), call.out)


@rule(F.linear, *torch_forms("linear"), key="linear")
def linear(ctx: RuleContext, call: Call):
    return _linear(ctx, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None), call.out)


@rule(nn.Bilinear, F.bilinear, *torch_forms("bilinear"), key="bilinear")
def bilinear(ctx: RuleContext, call: Call):
    """y_k = x1 W_k x2 + b_k."""
    if call.module is not None:
        x1, x2, w, b = call.arg(0), call.arg(1), call.param("weight"), call.param("bias")
    else:
        x1, x2, w, b = call.arg(0), call.arg(1), call.arg(2, "weight"), call.arg(3, "bias", None)
    lead = _BATCH[: x1.ndim - 1]
    ops = [(x1, lead + "X"), (x2, lead + "Y"), (w, "ZXY")] + ([(b, "Z")] if b is not None else [])
    return ctx.link(ops, lead + "Z", call.out.shape)


def _matmul_letters(a: TV, b: TV, out_ndim: int) -> tuple[str, str, str]:
    """Letters for torch.matmul semantics with broadcasting batch dims."""
    n_batch = max(a.ndim - 2, b.ndim - 2, 0)
    batch = _BATCH[:n_batch]
    la = "K" if a.ndim == 1 else batch[n_batch - (a.ndim - 2) :] + "NK"
    lb = "K" if b.ndim == 1 else batch[n_batch - (b.ndim - 2) :] + "KM"
    lo = batch + ("N" if a.ndim > 1 else "") + ("M" if b.ndim > 1 else "")
    assert len(lo) == out_ndim
    return la, lb, lo


@rule(*torch_forms("matmul", "mm", "bmm", "mv", "dot", "inner", "vdot"), operator.matmul, key="matmul")
def matmul(ctx: RuleContext, call: Call):
    a, b = call.arg(0, "input"), call.arg(1, "other")
    la, lb, lo = _matmul_letters(a, b, call.out.ndim)
    return ctx.link([(a, la), (b, lb)], lo, call.out.shape)


@rule(*torch_forms("addmm", "baddbmm", "addbmm", "addmv", "addr"), key="addmm")
def addmm(ctx: RuleContext, call: Call):
    """bias + a @ b (HF Conv1D is addmm with the weight stored as [in, out])."""
    bias, a, b = call.arg(0, "input"), call.arg(1), call.arg(2)
    if call.key == "addmm" and call.node.target in _ADDBMM:
        ctx.freeze(a, "addbmm sums over the batch")
    if a.ndim == 1 and b.ndim == 1:  # addr: outer product
        ops = [(a, "N"), (b, "M")]
        lo = "NM"
    else:
        la, lb, lo = _matmul_letters(a, b, call.out.ndim if call.out.ndim == max(a.ndim, b.ndim) else a.ndim)
        ops = [(a, la), (b, lb)]
    if call.out.ndim != len(lo):  # addbmm reduces the batch
        lo = lo[-call.out.ndim :]
    ops.append((bias, lo[len(lo) - bias.ndim :]))
    return ctx.link(ops, lo, call.out.shape)


_ADDBMM = {torch.addbmm, getattr(torch.ops.aten, "addbmm", None)}


@rule(torch.einsum, *torch_forms("einsum"), key="einsum")
def einsum(ctx: RuleContext, call: Call):
    eq = call.arg(0, "equation")
    ops = call.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    terms = lhs.split(",")
    n_ell = max((o.ndim - len(t.replace("...", "")) for o, t in zip(ops, terms, strict=True) if "..." in t), default=0)
    ell = "".join(chr(0x100 + i) for i in range(n_ell))
    pairs = []
    for o, t in zip(ops, terms, strict=True):
        k = o.ndim - len(t.replace("...", ""))
        pairs.append((o, t.replace("...", ell[n_ell - k :])))
    if not _:
        rhs = ell + "".join(sorted(c for c in set(lhs.replace(",", "").replace(".", "")) if lhs.count(c) == 1))
    rhs = rhs.replace("...", ell)
    for o, letters in pairs:
        if len(set(letters)) != len(letters):
            ctx.freeze(o, "einsum with a repeated index (diagonal/trace)")
    return ctx.link(pairs, rhs, call.out.shape)


def _conv(ctx: RuleContext, x: TV, w: TV, b: TV | None, groups: int, out: torch.Tensor, transposed: bool) -> Dims:
    """Convolution: channels link through the weight; spatial axes are fixed."""
    n_spatial = w.ndim - 2
    cx = 1 if x.ndim == n_spatial + 2 else 0
    for i in range(cx + 1, x.ndim):
        ctx.freeze_axis(x, i, "convolution mixes neighbouring positions")
    for i in range(2, w.ndim):
        ctx.freeze_axis(w, i, "convolution kernel taps")
    out_t = _conv_channels(ctx, x.dims[cx], w, groups, transposed)
    ctx.mark_contracted(w, 0 if transposed else 1)
    if b is not None:
        ctx.unify(out_t, b.dims[0])
    dims = list(ctx.fixed(out.shape))
    dims[cx] = out_t
    if cx == 1:
        dims[0] = x.dims[0] if x.shape[0] == out.shape[0] else dims[0]
    return tuple(dims)


def _conv_channels(ctx: RuleContext, cin, w: TV, groups: int, transposed: bool):
    """Link input channels with the weight and return the output channel term.

    Weight layout: ``[Cout, Cin/g, k...]`` (``[Cin, Cout/g, k...]`` when transposed). The axis holding all
    channels splits into ``g`` blocks, each with its own inner term; the per-group axis is one term shared
    by every group, because a single weight axis serves all of them.
    """
    full_t, per_group_t = ctx.plain(w.dims[0]), ctx.plain(w.dims[1])
    if groups == 1:
        if transposed:
            ctx.unify(cin, full_t)
            return per_group_t
        ctx.unify(cin, per_group_t)
        return full_t
    g_term, _ = ctx.solver.as_product(full_t, groups, ctx.why)
    shared = product(g_term, [per_group_t] * groups)
    if transposed:
        ctx.unify(cin, full_t)
        return shared
    ctx.unify(cin, shared)
    return full_t


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, key="conv")
def conv_module(ctx: RuleContext, call: Call):
    m = call.module
    return _conv(ctx, call.arg(0, "input"), call.param("weight"), call.param("bias"), m.groups, call.out, False)


@rule(F.conv1d, F.conv2d, F.conv3d, *torch_forms("conv1d", "conv2d", "conv3d"), key="conv")
def conv(ctx: RuleContext, call: Call):
    groups = int(call.arg(6, "groups", 1))
    return _conv(ctx, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None), groups, call.out, False)


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, key="conv_transpose")
def conv_transpose_module(ctx: RuleContext, call: Call):
    m = call.module
    return _conv(ctx, call.arg(0, "input"), call.param("weight"), call.param("bias"), m.groups, call.out, True)


@rule(
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    *torch_forms("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    key="conv_transpose",
)  # fmt: skip
def conv_transpose(ctx: RuleContext, call: Call):
    groups = int(call.arg(6, "groups", 1))
    return _conv(ctx, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None), groups, call.out, True)


@rule(*torch_forms("convolution", "_convolution"), key="conv")
def convolution(ctx: RuleContext, call: Call):
    """aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)."""
    transposed = bool(call.arg(6, "transposed"))
    groups = int(call.arg(8, "groups"))
    return _conv(ctx, call.arg(0), call.arg(1), call.arg(2, "bias", None), groups, call.out, transposed)


def _embedding(ctx: RuleContext, ids: TV, w: TV, out) -> Dims:
    ctx.freeze_axis(w, 0, "embedding rows are indexed by token ids")
    lead = _BATCH[: ids.ndim]
    return ctx.link([(ids, lead), (w, "VE")], lead + "E", out.shape)


@rule(nn.Embedding, key="embedding")
def embedding_module(ctx: RuleContext, call: Call):
    return _embedding(ctx, call.arg(0, "input"), call.param("weight"), call.out)


@rule(F.embedding, key="embedding")
def embedding(ctx: RuleContext, call: Call):
    return _embedding(ctx, call.arg(0, "input"), call.arg(1, "weight"), call.out)


@rule(*[t for t in torch_forms("embedding") if t is not F.embedding], key="embedding")
def aten_embedding(ctx: RuleContext, call: Call):
    """aten.embedding(weight, indices, ...) has the arguments the other way round."""
    w, ids = call.arg(0, "weight"), call.arg(1, "indices")
    if isinstance(w, TV) and isinstance(ids, TV) and w.value.is_floating_point() and not ids.value.is_floating_point():
        return _embedding(ctx, ids, w, call.out)
    return _embedding(ctx, w, ids, call.out)
