"""Apply per-space merge/unmerge matrices to parameters along their layouts.

For model ``m`` and a parameter ``W``: the *averaging* axis (the first output axis that carries a group)
gets the merge matrix ``M_m`` (rows average cluster members, so summing over models averages); every
other grouped axis gets ``U_m^T`` (0/1 selection of the model's members). Fixed parts of the averaging
axis, and parameters without any grouped output axis, are scaled by ``1/N``. Summing the transformed
parameters over models gives the merged parameter (ZipIt's ``sum_m M_out W U_in``; for permutations,
the average of the aligned models).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod, groups_in
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching
from fxmerge.memory import release_freed_memory

Transforms = dict[Layout, Matching]


def _along(x: torch.Tensor, axis: int, mt: Matching, m: int, mode: str, unit: int) -> torch.Tensor:
    """Model ``m``'s merge (``mode="merge"``: ``M_m @ x``), selection (``"in"``: ``U_m^T @ x``) or unmerge
    (``"act"``: ``U_m @ x``) along ``axis``, where each unit spans ``unit`` consecutive entries.

    Matchings are assignments (every unit joins at most one merged unit), so the products are a weighted
    scatter-add (``merge``/``in``) or a gather (``act``): O(size of x), never a dense O(K * size of x) matmul
    and never a dense [K, C] matrix. A hand-built dense matching that mixes units falls back to the matmul.
    """
    cols = mt.columns(m)
    y = x.movedim(axis, 0)
    rest = y.shape[1:]
    if cols is None:
        mat = mt.merge[m] if mode == "merge" else (mt.unmerge[m].T if mode == "in" else mt.unmerge[m])
        z = mat.to(y.dtype) @ y.reshape(mat.shape[1], -1)
        return z.reshape(mat.shape[0] * unit, *rest).movedim(0, axis)
    if mt.is_identity(m):  # nothing moves: the same values as the scatter below, without it
        if mode != "merge":
            return x
        w = mt.weights(m).to(device=y.device, dtype=y.dtype)
        return (y.reshape(cols.numel(), -1) * w[:, None]).reshape(y.shape).movedim(0, axis)
    if cols.device != y.device:
        cols = cols.to(y.device)
    k = mt.width
    if mode == "act":  # unit c of model m <- merged unit cols[c] (dropped units: zeros)
        flat = y.reshape(k, -1)
        z = flat.index_select(0, cols.clamp_min(0))
        z = torch.where((cols >= 0)[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
        return z.reshape(cols.numel() * unit, *rest).movedim(0, axis)
    flat = y.reshape(cols.numel(), -1)
    perm = mt.is_permutation(m)
    if mode == "merge":
        w = mt.weights(m).to(device=y.device, dtype=y.dtype)
        src = flat * w[:, None]
    else:
        src = flat
    if not perm:
        keep = cols >= 0
        if not bool(keep.all()):
            src, cols = src[keep], cols[keep]
    if perm and mode == "in":
        z = flat.new_empty(k, flat.shape[1]).index_copy_(0, cols, src)  # a permutation: exact, no additions
    else:
        z = flat.new_zeros(k, flat.shape[1]).index_add_(0, cols, src)
    return z.reshape(k * unit, *rest).movedim(0, axis)


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
        return _along(x, axis, tr[lay], m, mode, unit)
    if isinstance(lay, G):  # a group kept at the identity
        return x / scale
    if isinstance(lay, Cat):
        pieces = torch.split(x, [p.size * unit for p in lay.parts], dim=axis)
        return torch.cat([apply_layout(pc, axis, p, m, n_models, tr, average, unit, skip, mode)
                          for pc, p in zip(pieces, lay.parts, strict=True)], dim=axis)  # fmt: skip
    assert isinstance(lay, Prod)
    inner = lay.inners[0].size
    if not any(groups_in(i) for i in lay.inners):  # whole blocks of fixed entries move with the outer
        return apply_layout(x, axis, lay.outer, m, n_models, tr, average, unit * inner, skip, mode)
    if not groups_in(lay.outer):  # blocks that never move: each inner on its own
        pieces = torch.split(x, inner * unit, dim=axis)
        return torch.cat([apply_layout(pc, axis, i, m, n_models, tr, average, unit, skip, mode)
                          for pc, i in zip(pieces, lay.inners, strict=True)], dim=axis)  # fmt: skip
    return x / scale  # a structured layout without a matching (not a merge space here): kept in place


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
        acc: torch.Tensor | None = None  # summed model by model: one float64 copy of a model's tensor at a time
        for m, s in enumerate(states):
            x = s[name].double()
            t = transform_param(spec, name, x, m, n, tr) if name in spec.axes else x
            if acc is None:  # never accumulate into an input tensor (a float64 model's own, or a view of it)
                same = t.untyped_storage().data_ptr() == s[name].untyped_storage().data_ptr()
                acc = t.clone() if same else t
            else:
                acc += t
            del x, t
        assert acc is not None
        if name not in spec.axes:
            acc /= n
        out[name] = acc.to(ref.dtype)
        if ref.numel() >= 1 << 20:  # float64 temporaries of growing sizes fragment the heap: return them
            del acc
            release_freed_memory()
    return out


def identity_matching(size: int, n_models: int) -> Matching:
    return Matching.identity(size, n_models)


def perms_from(spec: PermutationSpec, key: Layout, mt: Matching, m: int) -> dict[int, torch.Tensor]:
    """Group permutations realising a one-to-one matching of model ``m`` onto the merged order."""
    cols = mt.assignment(m)  # unit c of model m -> merged position cols[c]
    full = torch.empty_like(cols)
    full[cols] = torch.arange(cols.numel(), device=cols.device)  # merged position k <- position full[k] of m
    out: dict[int, torch.Tensor] = {}
    _perms_of(key, full, None, out)
    return out


def _perms_of(
    lay: Layout, full: torch.Tensor, inner: list[Layout] | None, out: dict[int, torch.Tensor]
) -> None:
    """Read the group permutations off ``full`` (positions of span ``lay``, relative to its start); ``inner``
    gives the layout inside each position of ``lay`` when ``lay`` is the outer of a block layout."""
    w = 1 if inner is None else inner[0].size
    if isinstance(lay, LFixed):
        for q in range(lay.size if inner is not None else 0):
            _perms_of(inner[q], full[q * w : (q + 1) * w] - q * w, None, out)
    elif isinstance(lay, G):
        blocks = full.view(-1, w)[:, 0] // w
        out[lay.gid] = blocks
        for k, b in enumerate(blocks.tolist() if inner is not None else []):
            _perms_of(inner[b], full[k * w : (k + 1) * w] - b * w, None, out)
    elif isinstance(lay, Cat):
        off = 0
        for part in lay.parts:
            sub = None if inner is None else inner[off : off + part.size]
            _perms_of(part, full[off * w : (off + part.size) * w] - off * w, sub, out)
            off += part.size
    else:
        c = lay.inners[0].size
        inners = list(lay.inners) if inner is None else [
            Prod(lay.inners[b], tuple(inner[b * c : (b + 1) * c])) for b in range(lay.outer.size)]  # fmt: skip
        _perms_of(lay.outer, full, inners, out)


def load_merged(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load merged tensors into ``model`` (a copy of model 0) through ``load_state_dict`` with the model's own
    state-dict metadata, so modules whose load hooks read it (versioned BatchNorm, torchvision's MNASNet) load."""
    meta = getattr(model.state_dict(), "_metadata", None)
    ordered = OrderedDict(state)
    if meta is not None:
        ordered._metadata = meta  # type: ignore[attr-defined]
    model.load_state_dict(ordered)
