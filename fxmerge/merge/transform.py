"""Apply per-space merge/unmerge matrices to parameters along their layouts.

For model ``m`` and a parameter ``W``: the *averaging* axis (the first output axis that carries a group)
gets the merge matrix ``M_m`` (rows average cluster members, so summing over models averages); every
other grouped axis gets ``U_m^T`` (0/1 selection of the model's members). Fixed parts of the averaging
axis, and parameters without any grouped output axis, are scaled by ``1/N``. Summing the transformed
parameters over models gives the merged parameter (ZipIt's ``sum_m M_out W U_in``; for permutations,
the average of the aligned models).
"""

from __future__ import annotations

import torch

from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching

Transforms = dict[Layout, Matching]


def _along(x: torch.Tensor, axis: int, mat: torch.Tensor, unit: int) -> torch.Tensor:
    """``mat @ x`` along ``axis``, where each unit spans ``unit`` consecutive entries.

    Merge and unmerge matrices have at most one non-zero per column (every unit belongs to one merged unit),
    so the product is a weighted scatter-add: O(size of x) instead of a dense O(K * size of x) matmul.
    """
    y = x.movedim(axis, 0)
    rest = y.shape[1:]
    flat = y.reshape(mat.shape[1], -1)
    if bool(((mat != 0).sum(dim=0) <= 1).all()):
        rows = mat.argmax(dim=0)  # merge weights and 0/1 selections are non-negative
        w = mat.gather(0, rows[None]).squeeze(0).to(y.dtype)
        z = flat.new_zeros(mat.shape[0], flat.shape[1]).index_add_(0, rows, flat * w[:, None])
    else:
        z = mat.to(y.dtype) @ flat
    return z.reshape(mat.shape[0] * unit, *rest).movedim(0, axis)


def _matrix(mt: Matching, m: int, mode: str) -> torch.Tensor:
    if mode == "merge":
        return mt.merge[m]
    return mt.unmerge[m].T if mode == "in" else mt.unmerge[m]


def apply_layout(
    x: torch.Tensor, axis: int, lay: Layout, m: int, n_models: int, tr: Transforms, average: bool, unit: int = 1,
    skip: Layout | None = None, mode: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Transform ``x`` along ``axis`` (whose layout is ``lay``) for model ``m``.

    ``mode``: ``"merge"`` (averaging axis of a weight, ``M_m``), ``"in"`` (other weight axes, ``U_m^T``) or
    ``"act"`` (a merged activation mapped back into model ``m``'s units, ``U_m``); by default it follows
    ``average``. Fixed parts are divided by ``n_models`` in merge mode only.
    """
    mode = mode or ("merge" if average else "in")
    scale = n_models if mode == "merge" else 1
    if isinstance(lay, LFixed) or (skip is not None and lay == skip):
        return x / scale
    if lay in tr:
        return _along(x, axis, _matrix(tr[lay], m, mode), unit)
    if isinstance(lay, G):  # a group kept at the identity
        return x / scale
    if isinstance(lay, Cat):
        pieces = torch.split(x, [p.size * unit for p in lay.parts], dim=axis)
        return torch.cat([apply_layout(pc, axis, p, m, n_models, tr, average, unit, skip, mode)
                          for pc, p in zip(pieces, lay.parts, strict=True)], dim=axis)  # fmt: skip
    assert isinstance(lay, Prod)
    inner = lay.inners[0].size
    if all(isinstance(i, LFixed) for i in lay.inners):
        return apply_layout(x, axis, lay.outer, m, n_models, tr, average, unit * inner, skip, mode)
    if isinstance(lay.outer, LFixed):
        pieces = torch.split(x, inner * unit, dim=axis)
        return torch.cat([apply_layout(pc, axis, i, m, n_models, tr, average, unit, skip, mode)
                          for pc, i in zip(pieces, lay.inners, strict=True)], dim=axis)  # fmt: skip
    # nested blocks: whole blocks move with the outer group, inner groups kept at the identity
    if isinstance(lay.outer, Prod):
        return apply_layout(x, axis, lay.outer, m, n_models, tr, average, unit * inner, skip, mode)
    if lay.outer in tr and lay.outer != skip:
        return _along(x, axis, _matrix(tr[lay.outer], m, mode), unit * inner)
    return x / scale


def averaging_axis(spec: PermutationSpec, name: str) -> int | None:
    """The axis that carries the merge matrix: the first grouped output axis.

    A tensor whose grouped axes are all contracted inputs (a classifier head) has none: it gets ``U_m^T`` on
    those axes and ``1/N``, i.e. ``(1/N) sum_m W_m U_m``, the average of the models' outputs. (Putting the
    merge matrix there instead would over-weight units that stayed unmatched, e.g. zip singletons.)
    """
    roles = spec.roles.get(name, ["out"] * len(spec.axes[name]))
    lays = spec.axes[name]
    for a, (lay, role) in enumerate(zip(lays, roles, strict=True)):
        if role == "out" and not isinstance(lay, LFixed):
            return a
    return None


def transform_param(
    spec: PermutationSpec, name: str, x: torch.Tensor, m: int, n_models: int, tr: Transforms,
    skip: Layout | None = None,
) -> torch.Tensor:  # fmt: skip
    """Model ``m``'s contribution to the merged value of parameter ``name``."""
    avg = averaging_axis(spec, name)
    out = x
    for a, lay in enumerate(spec.axes[name]):
        out = apply_layout(out, a, lay, m, n_models, tr, a == avg, 1, skip)
    return out if avg is not None else out / n_models


def merge_state(
    spec: PermutationSpec, states: list[dict[str, torch.Tensor]], tr: Transforms
) -> dict[str, torch.Tensor]:
    """Merged values of every tensor in ``states[0]`` (tensors outside the spec are averaged)."""
    n = len(states)
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        if name in spec.axes:
            acc = sum(transform_param(spec, name, s[name].double(), m, n, tr) for m, s in enumerate(states))
        else:
            acc = sum(s[name].double() for s in states) / n
        out[name] = acc.to(ref.dtype)
    return out


def identity_matching(size: int, n_models: int) -> Matching:
    eye = torch.eye(size, dtype=torch.float64)
    return Matching([eye / n_models] * n_models, [eye.clone() for _ in range(n_models)], 1.0)


def perms_from(spec: PermutationSpec, key: Layout, mt: Matching, m: int) -> dict[int, torch.Tensor]:
    """Group permutations realising a one-to-one matching of model ``m`` onto the merged order."""
    full = mt.unmerge[m].T.argmax(dim=1)  # merged unit k <- unit full[k] of model m
    if isinstance(key, G):
        return {key.gid: full}
    assert isinstance(key, Prod) and isinstance(key.outer, G)
    c = key.inners[0].size
    blocks = full.view(-1, c)[:, 0] // c
    out = {key.outer.gid: blocks}
    for k, b in enumerate(blocks.tolist()):
        inner = key.inners[b]
        if isinstance(inner, G):
            out[inner.gid] = full[k * c : (k + 1) * c] - b * c
    return out
