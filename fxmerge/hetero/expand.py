"""Identity expansion: rebuild a shallow model on a deeper model's graph ("padded twin").

Given the deep model's blocks and, for each shallow block, the deep block (slot) that receives it,
the twin is a copy of the deep model whose stem, head and slotted blocks hold the shallow model's
tensors and whose remaining blocks are identities:

* a residual block becomes a **zero-branch** block: the last parameterised op of each residual branch
  (its norm's weight and bias, or the last linear/conv) is zeroed, so the block computes
  ``act(x + 0)``, the identity on the non-negative outputs of a ReLU block or with no post-add op;
* a plain layer becomes an exact identity: Dirac convolution / identity matrix, zero bias, and a
  neutral BatchNorm (γ=1, β=0, μ=0, σ²=1-eps), exact after a ReLU.

The twin's widths follow the shallow model (group sizes are read off the copied tensors), so depth and
width heterogeneity compose. Groups that live only inside zero-branch blocks are **absent** for the
twin: the merge keeps the deep model's units there instead of averaging them with zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxmerge.clone import clone_module
from fxmerge.errors import MergeError
from fxmerge.hetero.blocks import Block, BlockStructure
from fxmerge.hetero.graph import node_reads
from fxmerge.hetero.width import check_runs, group_sizes, resize_model
from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod, describe, groups_in
from fxmerge.ir.spec import PermutationSpec

__all__ = ["Twin", "absent_groups", "expand", "make_identity", "param_map"]

EXACT_TOL = 1e-4  # relative output deviation above which a twin without padded blocks is not the model


@dataclass(frozen=True)
class Twin:
    """A shallow model rebuilt on the deep model's graph.

    Attributes:
        model: the twin (deep model's architecture, shallow model's function).
        slots: deep block index that received each shallow block.
        padded: deep block indices filled with identity blocks.
        absent: group ids (of the deep spec) that exist only inside zero-branch blocks of the twin.
        widths: group id -> size in the twin.
        max_error: max |twin(x) - shallow(x)| over the outputs on the example inputs.
        scale: max |shallow(x)| over the same outputs (to judge ``max_error``).
    """

    model: nn.Module
    slots: tuple[int, ...]
    padded: tuple[int, ...]
    absent: frozenset[int]
    widths: dict[int, int]
    max_error: float
    scale: float = 1.0


def _pair(out: dict[str, str], deep: Sequence[str], shallow: Sequence[str], what: str) -> None:
    if len(deep) != len(shallow):
        raise MergeError(
            f"incompatible {what}: the deep model has {len(deep)} tensors {list(deep)[:6]} and the shallow "
            f"model {len(shallow)} tensors {list(shallow)[:6]}; the layers must correspond one to one."
        )
    out.update(zip(deep, shallow, strict=True))


def param_map(deep: BlockStructure, shallow: BlockStructure, slots: Sequence[int]) -> dict[str, str]:
    """Deep-model tensor name -> shallow-model tensor name for the stem, head and slotted blocks.

    Tensors correspond by order of first use inside each unit (stem, head, block k -> slot k).
    """
    if len(slots) != len(shallow.blocks):
        raise MergeError(f"{len(slots)} slots given for {len(shallow.blocks)} shallow blocks.")
    if len(set(slots)) != len(slots) or not all(0 <= j < len(deep.blocks) for j in slots):
        raise MergeError(
            f"slots must be distinct deep block indices in [0, {len(deep.blocks)}), got {list(slots)}."
        )
    out: dict[str, str] = {}
    _pair(out, deep.stem, shallow.stem, "stems")
    _pair(out, deep.head, shallow.head, "heads")
    for k, j in enumerate(slots):
        a, b = deep.blocks[j], shallow.blocks[k]
        _pair(
            out,
            a.params,
            b.params,
            f"blocks (shallow block {k} '{b.name}' placed at deep block {j} '{a.name}')",
        )
    return out


def _axis_sizes(
    spec: PermutationSpec, lay: Layout, n: int, names: tuple[str, str], axis: int
) -> dict[int, int]:
    """Group sizes implied by an axis of ``n`` entries with layout ``lay``."""
    if isinstance(lay, G):
        return {lay.gid: n}
    flat = (
        isinstance(lay, Prod) and isinstance(lay.outer, G) and all(isinstance(i, LFixed) for i in lay.inners)
    )
    if flat and n % lay.inners[0].size == 0:
        return {lay.outer.gid: n // lay.inners[0].size}
    if n == lay.size:
        return {gid: spec.group(gid).size for gid in groups_in(lay)}
    blocks = _block_sizes(lay, n)
    if blocks is not None:
        return blocks
    if isinstance(lay, LFixed):
        raise MergeError(
            f"axis {axis} of {names[0]!r} has {lay.size} entries in the deep model but {names[1]!r} has {n} in the "
            "shallow model; the axis is fixed (model input/output, kernel size), so the stems, heads or layer "
            "kinds of the models are incompatible there."
        )
    raise MergeError(
        f"axis {axis} of {names[0]!r} has layout {describe(lay)} ({lay.size} entries) but {names[1]!r} has {n}: "
        "a structured axis (attention heads, grouped channels, concatenation) cannot change width."
    )


def _block_sizes(lay: Layout, n: int) -> dict[int, int] | None:
    """Group sizes of an axis of blocks (GroupNorm groups, attention heads; several for a fused qkv) with ``n``
    entries when the blocks keep their number and change their size: every inner group gets n / Σ blocks."""
    parts = lay.parts if isinstance(lay, Cat) else [lay]
    if not all(isinstance(p, Prod) and isinstance(p.outer, G) and all(isinstance(i, G) for i in p.inners)
               for p in parts):  # fmt: skip
        return None
    blocks = sum(p.outer.size for p in parts)  # type: ignore[union-attr]
    if n % blocks:
        return None
    out: dict[int, int] = {}
    for p in parts:
        out[p.outer.gid] = p.outer.size  # type: ignore[union-attr]
        out.update({i.gid: n // blocks for i in p.inners})  # type: ignore[union-attr]
    return out


def _contraction_groups(spec: PermutationSpec, name: str) -> tuple[int | None, int | None]:
    """(input group, output group) of a contraction weight, where the axes carry plain groups."""
    lays, roles = spec.axes[name], spec.roles.get(name, [])
    gin = next(
        (lay.gid for lay, r in zip(lays, roles, strict=False) if r == "in" and isinstance(lay, G)), None
    )
    gout = next(
        (lay.gid for lay, r in zip(lays, roles, strict=False) if r == "out" and isinstance(lay, G)), None
    )
    return gin, gout


def _layer_ties(
    spec: PermutationSpec, deep: BlockStructure, padded: Sequence[int]
) -> list[tuple[int, int, str]]:
    """(input group, output group, block name) of each padded plain layer: an identity keeps the width."""
    ties = []
    for j in padded:
        b = deep.blocks[j]
        if b.kind != "layer":
            continue
        for p in b.params:
            if "in" in spec.roles.get(p, ()):
                gin, gout = _contraction_groups(spec, p)
                if gin is not None and gout is not None:
                    ties.append((gin, gout, b.name or str(j)))
    return ties


def twin_widths(
    spec: PermutationSpec, deep: BlockStructure, pmap: Mapping[str, str], src: Mapping[str, torch.Tensor],
    padded: Sequence[int],
) -> dict[int, int]:  # fmt: skip
    """Group sizes of the twin: read off the shallow tensors, carried through identity layers, else the deep size."""
    sizes: dict[int, int] = {}
    origin: dict[int, str] = {}
    for a, b in pmap.items():
        lays = spec.axes.get(a)
        if lays is None:
            continue
        t = src[b]
        if t.dim() != len(lays):
            raise MergeError(
                f"{a!r} has {len(lays)} axes in the deep model but {b!r} has {t.dim()}: the layers differ."
            )
        for axis, lay in enumerate(lays):
            for gid, k in _axis_sizes(spec, lay, int(t.shape[axis]), (a, b), axis).items():
                if sizes.get(gid, k) != k:
                    raise MergeError(
                        f"group g{gid} gets {sizes[gid]} units from {origin[gid]!r} but {k} from {b!r}: the shallow "
                        "model's layers do not fit the deep model's group structure."
                    )
                sizes[gid], origin[gid] = k, b
    ties = _layer_ties(spec, deep, padded)
    changed = True
    while changed:
        changed = False
        for gin, gout, _ in ties:
            for x, y in ((gin, gout), (gout, gin)):
                if x in sizes and y not in sizes:
                    sizes[y] = sizes[x]
                    changed = True
    for gin, gout, name in ties:
        if sizes.get(gin, spec.group(gin).size) != sizes.get(gout, spec.group(gout).size):
            raise MergeError(f"identity layer {name!r} would have to change width "
                             f"({sizes.get(gin)} -> {sizes.get(gout)}); it cannot be an identity.")  # fmt: skip
    for g in spec.groups:
        sizes.setdefault(g.id, g.size)
    return sizes


def _branch_end(deep: BlockStructure, block: Block, branch: str) -> list[str]:
    """Tensors of the last parameterised op on a residual branch (walking back from the add operand)."""
    cg = deep.graph
    by_name: dict[str, fx.Node] = {n.name: n for n in cg.gm.graph.nodes}
    inside = set(block.nodes)
    node = by_name[branch]
    while True:
        params = node_reads(cg, node)
        if params:
            return params
        ins = [
            a
            for a in node.all_input_nodes
            if a.name in inside and a.name in deep.shapes and a.op != "get_attr" and a.name not in cg.bindings
        ]
        if len(ins) != 1:
            raise MergeError(f"cannot find the last parameterised op of the residual branch ending at {branch!r} "
                             f"in block {block.name!r}; give the blocks explicitly or use a plain layer.")  # fmt: skip
        node = ins[0]


def _dirac(t: torch.Tensor, spec: PermutationSpec, name: str, label: str) -> None:
    roles = spec.roles.get(name, [])
    lays = spec.axes[name]
    a_in = roles.index("in")
    a_out = next((a for a, (r, lay) in enumerate(zip(roles, lays, strict=True))
                  if r == "out" and not isinstance(lay, LFixed)), 0)  # fmt: skip
    if t.shape[a_in] != t.shape[a_out]:
        raise MergeError(f"identity layer {label!r}: {name!r} maps {t.shape[a_in]} to {t.shape[a_out]} units; "
                         "only a square (in = out) layer can be an identity.")  # fmt: skip
    ar = torch.arange(t.shape[a_in], device=t.device)
    index = tuple(ar if a in (a_in, a_out) else s // 2 for a, s in enumerate(t.shape))
    t.zero_()
    t[index] = 1.0


def _neutral_norm(module: nn.modules.batchnorm._BatchNorm) -> None:
    if module.weight is not None:
        module.weight.fill_(1.0)
    if module.bias is not None:
        module.bias.zero_()
    if module.running_mean is not None:
        module.running_mean.zero_()
        module.running_var.fill_(1.0 - module.eps)


def _owner(model: nn.Module, name: str) -> nn.Module:
    mod_name = name.rpartition(".")[0]
    return model.get_submodule(mod_name) if mod_name else model


def make_identity(model: nn.Module, deep: BlockStructure, spec: PermutationSpec, index: int) -> None:
    """Turn block ``index`` of ``model`` (which has ``deep``'s graph) into an identity block, in place.

    Residual blocks get zero branches; plain layers get Dirac/identity weights, zero biases and neutral
    BatchNorms. Raises a :class:`MergeError` for an anchor block (shape change, projection shortcut).
    """
    block = deep.blocks[index]
    if not block.identity:
        raise MergeError(f"block {index} ({block.name!r}) changes the feature shape or has a projection "
                         "shortcut, so it cannot be an identity block.")  # fmt: skip
    tensors = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        if block.kind == "residual":
            for branch in block.branches:
                for p in _branch_end(deep, block, branch):
                    if p in tensors and tensors[p].is_floating_point():
                        tensors[p].zero_()
            return
        contraction_modules = {p.rpartition(".")[0] for p in block.params if "in" in spec.roles.get(p, ())}
        for p in block.params:
            module = _owner(model, p)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _neutral_norm(module)
            elif p not in tensors:
                continue
            elif "in" in spec.roles.get(p, ()):
                _dirac(tensors[p], spec, p, block.name)
            elif p.rpartition(".")[0] in contraction_modules or p.rpartition(".")[2] == "bias":
                tensors[p].zero_()
            else:
                tensors[p].fill_(1.0)


def absent_groups(spec: PermutationSpec, deep: BlockStructure, padded: Sequence[int]) -> frozenset[int]:
    """Groups whose every member lies in a padded residual block (zero branch): the twin has no units there."""
    inside = {p for j in padded if deep.blocks[j].kind == "residual" for p in deep.blocks[j].params}
    return frozenset(g.id for g in spec.groups if g.members and all(m.param in inside for m in g.members))


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


def output_error(a: nn.Module, b: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """(max |a(x) - b(x)|, max |b(x)|) over all output tensors (eval mode)."""
    ya, yb = (
        _flat(check_runs(a, example_inputs, "the twin")),
        _flat(check_runs(b, example_inputs, "the model")),
    )
    if len(ya) != len(yb) or any(x.shape != y.shape for x, y in zip(ya, yb, strict=False)):
        raise MergeError("the twin's outputs do not have the shallow model's shapes; the heads differ.")
    err = max(
        (float((x.double() - y.double()).abs().max()) for x, y in zip(ya, yb, strict=True)), default=0.0
    )
    return err, max((float(y.double().abs().max()) for y in yb), default=0.0)


def expand(
    deep_model: nn.Module,
    shallow_model: nn.Module,
    deep: BlockStructure,
    shallow: BlockStructure,
    spec: PermutationSpec,
    slots: Sequence[int],
    *,
    example_inputs: Any,
) -> Twin:
    """Build the shallow model's padded twin on the deep model's graph.

    Args:
        deep_model: the deeper model (left unchanged); its graph and module tree are reused.
        shallow_model: the shallower model (left unchanged); its tensors fill the twin.
        deep: block structure of ``deep_model`` (from :func:`~fxmerge.hetero.blocks.find_blocks`).
        shallow: block structure of ``shallow_model``.
        spec: the deep model's permutation spec.
        slots: for every shallow block, the deep block receiving it (e.g. ``Segmentation.slots()``).
        example_inputs: used to check the twin computes the shallow model's function.

    Returns:
        A :class:`Twin`; ``max_error`` is the largest output deviation from the shallow model.

    Raises:
        MergeError: if stems, heads or blocks do not correspond, or an unfilled block cannot be an identity.
    """
    pmap = param_map(deep, shallow, slots)
    padded = [j for j in range(len(deep.blocks)) if j not in set(slots)]
    src: dict[str, torch.Tensor] = dict(shallow_model.named_parameters(remove_duplicate=False))
    src.update(dict(shallow_model.named_buffers(remove_duplicate=False)))
    widths = twin_widths(spec, deep, pmap, src, padded)
    twin = (
        clone_module(deep_model) if widths == group_sizes(spec) else resize_model(deep_model, spec, widths)
    )
    dst: dict[str, torch.Tensor] = dict(twin.named_parameters(remove_duplicate=False))
    dst.update(dict(twin.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for a, b in pmap.items():
            if tuple(dst[a].shape) != tuple(src[b].shape):
                raise MergeError(f"{a!r} has shape {tuple(dst[a].shape)} in the twin but {b!r} has "
                                 f"{tuple(src[b].shape)}: the layers do not correspond.")  # fmt: skip
            dst[a].copy_(src[b])
    for j in padded:
        make_identity(twin, deep, spec, j)
    err, scale = output_error(twin, shallow_model, example_inputs)
    if not padded and err > EXACT_TOL * (1.0 + scale):
        raise MergeError(
            f"the deeper model rebuilt at the other model's widths does not compute that model's function (max output "
            f"deviation {err:.3g}): a size is hard-coded in forward(), or a count (attention heads, norm groups) is tied "
            "to a width. Models whose numbers of heads / groups differ are merged directly when their tensors and "
            "layouts correspond otherwise (see docs/hetero.md, 'Block counts and the skeleton')."
        )
    return Twin(twin, tuple(slots), tuple(padded), absent_groups(spec, deep, padded), widths, err, scale)
