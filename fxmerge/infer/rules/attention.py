"""Attention. ``scaled_dot_product_attention`` is an einsum over (batch..., head, query, key, dim) with
query/key dims tied per head and value dims carried to the output; GQA repeats each key/value head
over a group of query heads. ``nn.MultiheadAttention`` is a leaf whose rule builds the same structure
on its packed projection weights, so the user never passes ``num_heads``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fxmerge.infer.context import LETTERS, TV, Call, RuleContext
from fxmerge.infer.registry import rule, torch_forms
from fxmerge.ir.dims import AxisTerm, Dims, Lvl, make_joint
from fxmerge.ir.terms import Bcast, concat, product


def _repeat_heads(ctx: RuleContext, x: TV, rep: int) -> Dims:
    """Dims of ``x`` with each head repeated ``rep`` times (as ``repeat_kv`` does with expand+reshape)."""
    h = x.ndim - 3
    expanded: list[AxisTerm] = [*x.dims[: h + 1], Bcast(rep), *x.dims[h + 1 :]]
    shape = (*x.shape[: h + 1], rep, *x.shape[h + 1 :])
    new_shape = (*x.shape[:h], x.shape[h] * rep, *x.shape[h + 1 :])
    return ctx.reshape(tuple(expanded), shape, new_shape)


def sdpa_dims(ctx: RuleContext, q: TV, k: TV, v: TV, mask: TV | None, causal: bool, out_shape) -> Dims:
    nb = q.ndim - 3
    batch = LETTERS[:nb]
    kd, vd = k.dims, v.dims
    if q.ndim >= 3 and k.shape[-3] != q.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
        rep = q.shape[-3] // k.shape[-3]
        kd, vd = _repeat_heads(ctx, k, rep), _repeat_heads(ctx, v, rep)
    ops: list = [(q.dims, batch + "hlE"), (kd, batch + "hsE"), (vd, batch + "hsV")]
    if mask is not None:
        letters = batch + "hls"
        ops.append((mask, letters[len(letters) - mask.ndim :]))
    if causal:
        ctx.freeze_axis(q, q.ndim - 2, "causal attention depends on query positions")
        ctx.freeze_axis(k, k.ndim - 2, "causal attention depends on key positions")
    out = ctx.link(ops, batch + "hlV", out_shape)
    return _attention_output(ctx, q, vd, out, out_shape)


def _attention_output(ctx: RuleContext, q: TV, vd: Dims, out: Dims, out_shape) -> Dims:
    """Output head h is query head h, never a broadcast copy of a value head (GQA ``repeat_kv`` makes value
    heads constant along the repeat): rebuild the (head, value-dim) joint from the query's head term and the
    value heads' per-head terms."""
    h_ax, v_ax = len(out_shape) - 3, len(out_shape) - 1
    heads = ctx.alg.collapse(q.dims, [q.ndim - 3], ctx.why)
    vh = vd[len(vd) - 3]
    vdim = vd[len(vd) - 1]
    if isinstance(vh, Lvl) and isinstance(vdim, Lvl) and vh.joint is vdim.joint and (vh.k, vdim.k) == (0, 1):
        inners = ctx.alg.level_terms(vh.joint, 1, ctx.why)
    else:
        inners = [ctx.plain(vdim)] * out_shape[h_ax]
    root = product(heads, inners)
    axes = make_joint(root, (out_shape[h_ax], out_shape[v_ax]))
    new = list(out)
    new[h_ax], new[v_ax] = axes[0], axes[1]
    return ctx.normalize(tuple(new))


@rule(F.scaled_dot_product_attention, *torch_forms("scaled_dot_product_attention"), key="sdpa")
def sdpa(ctx: RuleContext, call: Call):
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    mask = call.arg(3, "attn_mask", None)
    causal = bool(call.arg(5, "is_causal", False))
    return sdpa_dims(ctx, q, k, v, mask if isinstance(mask, TV) else None, causal, call.out.shape)


@rule(
    *torch_forms("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"),
    key="sdpa",
)  # fmt: skip
def sdpa_tuple(ctx: RuleContext, call: Call):
    """Decomposed SDPA variants return (out, logsumexp, ...)."""
    q, k, v = call.arg(0), call.arg(1), call.arg(2)
    mask = next((a for a in call.args[3:] if isinstance(a, TV)), call.kwargs.get("attn_mask"))
    causal = bool(call.kwargs.get("is_causal", False))
    out = sdpa_dims(ctx, q, k, v, mask if isinstance(mask, TV) else None, causal, call.out[0].shape)
    rest = []
    for o in call.out[1:]:
        ok = hasattr(o, "shape") and tuple(o.shape) == tuple(call.out[0].shape[:-1])
        rest.append(tuple(ctx.normalize(out[:-1])) if ok else (ctx.fixed(o.shape) if hasattr(o, "shape") else None))
    return [out, *rest]


@rule(nn.MultiheadAttention, key="multihead_attention")
def multihead_attention(ctx: RuleContext, call: Call):
    """Packed q/k/v projections: rows = Concat(Q, K, V), each ``heads x per-head dims``; Q and K share
    per-head dims, V's travel to ``out_proj`` columns; all three share the head permutation."""
    m: nn.MultiheadAttention = call.module
    query, key, value = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    outs = call.out
    if m.bias_k is not None or m.add_zero_attn:
        return _mha_barrier(ctx, call, "bias_k/bias_v/add_zero_attn")
    h = m.num_heads
    head = ctx.atom(h, "attention heads")
    qk = [ctx.atom(m.head_dim, "q/k head dim") for _ in range(h)]
    vv = [ctx.atom(m.head_dim, "v head dim") for _ in range(h)]
    q_rows, v_rows = product(head, qk), product(head, vv)
    if m._qkv_same_embed_dim:
        w = call.param("in_proj_weight")
        ctx.unify(w.dims[0], concat([q_rows, q_rows, v_rows]))
        for x in (query, key, value):
            ctx.unify(x.dims[-1], w.dims[1])
        ctx.mark_contracted(w, 1)
    else:
        for name, rows, x in (("q_proj_weight", q_rows, query), ("k_proj_weight", q_rows, key),
                              ("v_proj_weight", v_rows, value)):  # fmt: skip
            w = call.param(name)
            ctx.unify(w.dims[0], rows)
            ctx.unify(x.dims[-1], w.dims[1])
            ctx.mark_contracted(w, 1)
    b = call.param("in_proj_bias")
    if b is not None:
        ctx.unify(b.dims[0], concat([q_rows, q_rows, v_rows]))
    ow, ob = call.param("out_proj.weight"), call.param("out_proj.bias")
    ctx.unify(ow.dims[1], v_rows)
    ctx.mark_contracted(ow, 1)
    out_feat = ow.dims[0]
    if ob is not None:
        ctx.unify(ob.dims[0], out_feat)
    for i in range(key.ndim - 1):  # key and value tokens/batch move together
        ctx.unify(key.dims[i], value.dims[i])
    for extra in (call.arg(3, "key_padding_mask", None), call.arg(5, "attn_mask", None)):
        if isinstance(extra, TV):
            ctx.freeze(extra, "attention mask")
    attn_out = ctx.normalize((*query.dims[:-1], out_feat))
    weights = outs[1]
    w_dims = None if weights is None else _mha_weight_dims(ctx, m, query, key, head, weights)
    return [attn_out, w_dims]


def _mha_weight_dims(ctx: RuleContext, m: nn.MultiheadAttention, query: TV, key: TV, head, weights) -> Dims:
    """Returned attention weights: [batch,] [heads,] query tokens, key tokens."""
    if query.ndim == 2:
        batch, ql, ks = (), query.dims[0], key.dims[0]
    elif m.batch_first:
        batch, ql, ks = (query.dims[0],), query.dims[1], key.dims[1]
    else:
        batch, ql, ks = (query.dims[1],), query.dims[0], key.dims[0]
    heads = (head,) if weights.ndim == len(batch) + 3 else ()
    return ctx.normalize((*batch, *heads, ql, ks))


def _mha_barrier(ctx: RuleContext, call: Call, why: str):
    for tv in [*call.tensors(), *call.params.values()]:
        ctx.freeze(tv, f"nn.MultiheadAttention with {why}")
    return [ctx.fixed(o.shape) if o is not None else None for o in call.out]

