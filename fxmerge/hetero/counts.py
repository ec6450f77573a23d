"""Models whose structured groups differ in their NUMBER of blocks (attention heads, GroupNorm groups).

Each model's spec is inferred separately. A structured layout ``outer x (inner_1, ..., inner_G)`` has one inner
group per block, so a 4-head model has more groups than a 2-head one and group ids do not correspond across the
specs. :func:`correspond` walks two specs tensor by tensor and pairs their groups: plain and outer groups one to
one, and the inner groups of a structured layout whose block counts differ as a whole (a *family*).

The block count is an architecture hyperparameter held in user code (a module attribute such as ``heads``,
``nn.GroupNorm.num_groups``), which fxmerge cannot rewrite. So the target count of such a group is one parent's
count (:func:`count_targets`), and the merged model is rebuilt from a parent that has every target count
(:func:`skeleton_model`): with ``width="max"`` the model with more blocks, with ``"min"`` the one with fewer. The
block size (head dimension, channels per group) follows that parent too unless ``width`` sets it: code often ties
it to the count (``head_dim = width // heads``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fxmerge.errors import MergeError
from fxmerge.hetero.width import WidthTarget
from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod
from fxmerge.ir.spec import PermutationSpec

__all__ = [
    "Correspondence",
    "block_families",
    "check_depth_counts",
    "correspond",
    "correspond_all",
    "count_targets",
    "describe_group",
    "mapped_signature",
    "rebuild_error",
    "skeleton_model",
]


@dataclass
class Correspondence:
    """How another model's groups correspond to a reference model's.

    Attributes:
        to_ref: the other model's group id -> the reference's, for groups that correspond one to one.
        families: (reference inner group ids, other inner group ids) of every structured layout whose block counts
            differ; the inner groups of one block family correspond as a whole.
        counts: reference outer group id -> (reference block count, other block count), where they differ.
    """

    to_ref: dict[int, int] = field(default_factory=dict)
    families: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    counts: dict[int, tuple[int, int]] = field(default_factory=dict)

    def sizes(self, other: PermutationSpec) -> dict[int, int]:
        """The other model's group sizes keyed by the reference's group ids (an inner group of a family: the
        other model's block size)."""
        out = {r: other.group(o).size for o, r in self.to_ref.items()}
        for ref_inners, other_inners in self.families:
            out.update({r: other.group(other_inners[0]).size for r in ref_inners})
        return out

    def signature_map(self) -> dict[int, int]:
        """``to_ref`` plus the first inner group of every family (which names the family in
        :func:`mapped_signature`)."""
        return self.to_ref | {other[0]: ref[0] for ref, other in self.families}

    def targets(self, other_targets: Mapping[int, int]) -> dict[int, int]:
        """Targets keyed by the other model's group ids, re-keyed by the reference's."""
        out = {r: int(other_targets[o]) for o, r in self.to_ref.items() if o in other_targets}
        for ref_inners, other_inners in self.families:
            values = sorted({int(other_targets[o]) for o in other_inners if o in other_targets})
            if len(values) > 1:
                raise MergeError(f"the blocks of groups {list(other_inners)} get different sizes {values}; the units "
                                 "per block (head dimension, channels per group) must be one size.")  # fmt: skip
            out.update({r: values[0] for r in ref_inners} if values else {})
        return out


def _is_blocks(lay: Layout) -> bool:
    return isinstance(lay, Prod) and isinstance(lay.outer, G) and all(isinstance(i, G) for i in lay.inners)


def _all_fixed(lay: Prod) -> bool:
    return all(isinstance(i, LFixed) for i in lay.inners)


class _Walk:
    """Pairs the groups of two specs while walking their layouts side by side."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.names = names
        self.out = Correspondence()
        self.from_ref: dict[int, int] = {}

    def bind(self, ref_gid: int, other_gid: int, where: str) -> None:
        if self.out.to_ref.setdefault(other_gid, ref_gid) != ref_gid or (
            self.from_ref.setdefault(ref_gid, other_gid) != other_gid
        ):
            raise MergeError(f"at {where}, group g{ref_gid} of {self.names[0]} and g{other_gid} of {self.names[1]} do "
                             "not correspond one to one: the models do not have the same structure.")  # fmt: skip

    def walk(self, a: Layout, b: Layout, where: str) -> None:
        if isinstance(a, LFixed) and isinstance(b, LFixed) and a.size == b.size:
            return
        if isinstance(a, G) and isinstance(b, G):
            self.bind(a.gid, b.gid, where)
            return
        if isinstance(a, Cat) and isinstance(b, Cat) and len(a.parts) == len(b.parts):
            for x, y in zip(a.parts, b.parts, strict=True):
                self.walk(x, y, where)
            return
        if isinstance(a, Prod) and isinstance(b, Prod):
            self.walk(a.outer, b.outer, where)
            if _all_fixed(a) and _all_fixed(b) and a.inners[0].size == b.inners[0].size:
                return
            if len(a.inners) == len(b.inners):
                for x, y in zip(a.inners, b.inners, strict=True):
                    self.walk(x, y, where)
                return
            if _is_blocks(a) and _is_blocks(b):
                self._family(a, b)
                return
        raise MergeError(f"{where} has layout {a} in {self.names[0]} but {b} in {self.names[1]}: the group structure "
                         "differs, so the groups cannot be matched across models.")  # fmt: skip

    def _family(self, a: Prod, b: Prod) -> None:
        fam = (tuple(i.gid for i in a.inners), tuple(i.gid for i in b.inners))  # type: ignore[union-attr]
        if fam not in self.out.families:
            self.out.families.append(fam)
        self.out.counts[a.outer.gid] = (a.outer.size, b.outer.size)  # type: ignore[union-attr]


def correspond(
    ref: PermutationSpec, other: PermutationSpec, names: tuple[str, str] = ("the reference", "the other model"),
    pairs: Mapping[str, str] | None = None,
) -> Correspondence:  # fmt: skip
    """Pair the groups of ``other`` with those of ``ref`` by walking their layouts tensor by tensor.

    Args:
        ref, other: the two models' specs.
        names: how the models are named in error messages.
        pairs: reference tensor name -> other tensor name (default: the same names, which must be the same sets).

    Raises:
        MergeError: if the tensors or their layouts differ other than in group sizes and block counts.
    """
    if pairs is None:
        only = sorted(set(ref.axes) ^ set(other.axes))
        if only:
            raise MergeError(f"the models' tensors differ (e.g. {only[:4]}); they do not have the same structure.")
        pairs = {name: name for name in ref.axes}
    w = _Walk(names)
    for a, b in pairs.items():
        la, lb = ref.axes.get(a), other.axes.get(b)
        if la is None and lb is None:
            continue
        if la is None or lb is None or len(la) != len(lb):
            raise MergeError(f"{a!r} of {names[0]} and {b!r} of {names[1]} do not have the same grouped axes.")
        for axis, (x, y) in enumerate(zip(la, lb, strict=True)):
            w.walk(x, y, f"{a!r} axis {axis}")
    return w.out


def correspond_all(specs: Sequence[PermutationSpec]) -> list[Correspondence] | None:
    """Every model's groups paired with model 0's when the models share one structure but differ in their numbers
    of blocks (attention heads, GroupNorm groups); None when the counts agree or the structures differ otherwise."""
    try:
        corrs = [correspond(specs[0], s, ("model 0", f"model {m}")) for m, s in enumerate(specs)]
    except MergeError:
        return None
    return corrs if any(c.counts for c in corrs) else None


def check_depth_counts(specs: Sequence[PermutationSpec], deep: int, pairs: Mapping[int, Mapping[str, str]]) -> None:
    """Refuse a depth merge of models whose numbers of heads / groups differ (``pairs``: per shallower model, deep
    tensor name -> its tensor name): its padded twin is rebuilt on the deeper model's graph, whose block counts are
    fixed in its code."""
    for m, names in pairs.items():
        try:
            corr = correspond(specs[deep], specs[m], (f"model {deep}", f"model {m}"), pairs=names)
        except MergeError:
            continue  # the expansion says what does not correspond
        if corr.counts:
            desc = "; ".join(f"{describe_group(specs[deep], g)}: {a} blocks in model {deep}, {b} in model {m}"
                             for g, (a, b) in corr.counts.items())  # fmt: skip
            raise MergeError(
                f"the models differ in depth and in their numbers of attention heads / GroupNorm groups ({desc}). A "
                f"depth merge rebuilds model {m} on the deeper model {deep}'s graph, whose block counts are fixed in "
                f"its code, so the rebuilt model would not compute model {m}'s function. Merge models with the same "
                "block counts, or of the same depth (width-only merges accept different block counts)."
            )


def rebuild_error(error: MergeError, skel: int, sizes: Sequence[Mapping[int, int]], targets: Mapping[int, int]
                  ) -> MergeError:  # fmt: skip
    """``error`` (the model rebuilt at the target widths does not run) with the widths it was rebuilt at and the fix."""
    differ = {f"g{g}": {"sizes": [s[g] for s in sizes], "target": k} for g, k in targets.items()
              if len({s[g] for s in sizes}) > 1}  # fmt: skip
    return MergeError(
        f"{error} The merge is rebuilt from model {skel} (it has the target numbers of heads / groups) at the widths "
        f"{differ} (group ids of model 0). If forward() ties the units per head / group to another width (e.g. "
        "head_dim = width // heads), pass width as a dict whose widths keep that relation for model "
        f"{skel}'s counts."
    )


def mapped_signature(lay: Layout, gmap: Mapping[int, int], collapse: set[int]) -> tuple:
    """The layout with group ids mapped to the reference's (``gmap``: :meth:`Correspondence.signature_map`) and sizes
    left out; a structured layout whose outer group maps into ``collapse`` (block counts differ across the models) is
    named by its outer group and its first inner group (q/k and v of the same heads are different spaces)."""
    if isinstance(lay, LFixed):
        return ("fixed", lay.size)
    if isinstance(lay, G):
        return ("group", gmap.get(lay.gid, ("unmatched", lay.gid)))
    if isinstance(lay, Cat):
        return ("cat", tuple(mapped_signature(p, gmap, collapse) for p in lay.parts))
    outer = mapped_signature(lay.outer, gmap, collapse)
    if isinstance(lay.outer, G) and gmap.get(lay.outer.gid) in collapse:
        return ("blocks", outer, mapped_signature(lay.inners[0], gmap, collapse))
    return ("prod", outer, tuple(mapped_signature(i, gmap, collapse) for i in lay.inners))


def block_families(spec: PermutationSpec) -> dict[int, list[int]]:
    """Outer group id -> the inner group ids of every structured layout (blocks of units) of ``spec``."""
    out: dict[int, list[int]] = {}

    def visit(lay: Layout) -> None:
        if isinstance(lay, Cat):
            for p in lay.parts:
                visit(p)
        elif _is_blocks(lay):
            inner = out.setdefault(lay.outer.gid, [])  # type: ignore[union-attr]
            inner += [i.gid for i in lay.inners if i.gid not in inner]  # type: ignore[union-attr]

    for lays in spec.axes.values():
        for lay in lays:
            visit(lay)
    return out


def describe_group(spec: PermutationSpec, gid: int) -> str:
    """``g3 (blocks.0.attn.qkv.weight[0], ...)``: a group and where it lives."""
    places = list(dict.fromkeys(f"{m.param}[{m.axis}]" for m in spec.group(gid).members))
    where = ", ".join(places[:2]) + (", ..." if len(places) > 2 else "")
    return f"g{gid} ({where})"


def _count_error(spec: PermutationSpec, gid: int, counts: list[int], wanted: int) -> MergeError:
    return MergeError(
        f"the target block count {wanted} of group {describe_group(spec, gid)} is no model's: the models have "
        f"{counts} blocks (attention heads / GroupNorm groups). The count is an architecture hyperparameter (a module "
        "attribute such as `heads`, or nn.GroupNorm.num_groups) that fxmerge cannot change, so the merged model is "
        f"rebuilt from a model that has it. Choose width='max' or 'min', or a dict {{{gid}: one of {sorted(set(counts))}}}."
    )


def count_targets(
    sizes: Sequence[Mapping[int, int]], width: WidthTarget, targets: Mapping[int, int], spec: PermutationSpec,
    differ: set[int],
) -> dict[int, int]:  # fmt: skip
    """Targets of the groups whose block counts differ (``differ``: outer group ids), from the plain targets.

    The count must be one model's (else a :class:`MergeError` naming the group, the counts and the fix). The block
    size (the family's inner groups) follows the models that have the target count (their largest block size for
    ``"max"`` and for a dict that names none of the family's inner groups, their smallest for ``"min"``); an int
    sets it as for any group, and a dict entry for one inner group sets the unnamed inner groups of its family too
    (q/k and v of the same heads).

    Args:
        sizes: per model, group sizes keyed by ``spec``'s group ids (the outer group's size is the block count).
        width: the merge's width argument.
        targets: the plain targets (:func:`~fxmerge.hetero.width.target_widths`).
        spec: the reference spec (group ids, error messages).
        differ: the outer groups whose block counts differ.
    """
    out = dict(targets)
    families = block_families(spec)
    for gid in sorted(differ):
        counts = [int(s[gid]) for s in sizes]
        if out[gid] not in counts:
            raise _count_error(spec, gid, counts, out[gid])
        chosen = [m for m, c in enumerate(counts) if c == out[gid]]
        inners = families.get(gid, [])
        named = [int(width[i]) for i in inners if isinstance(width, Mapping) and i in width]
        for inner in inners:
            if isinstance(width, int) or (isinstance(width, Mapping) and inner in width):
                continue
            values = [int(sizes[m][inner]) for m in chosen]
            out[inner] = named[0] if named else min(values) if width == "min" else max(values)
    return out


def skeleton_model(
    sizes: Sequence[Mapping[int, int]], targets: Mapping[int, int], spec: PermutationSpec, differ: set[int]
) -> int:
    """The first model whose block counts are the targets of every group in ``differ`` (it is rebuilt at the target
    widths to hold the merge); a :class:`MergeError` naming the groups and counts if no model has them all."""
    for m, s in enumerate(sizes):
        if all(int(s[g]) == targets[g] for g in differ):
            return m
    groups = "; ".join(
        f"{describe_group(spec, g)}: counts {[int(s[g]) for s in sizes]}, target {targets[g]}" for g in sorted(differ)
    )
    options = "; ".join(f"model {m}: {{{', '.join(f'{g}: {int(s[g])}' for g in sorted(differ))}}}"
                        for m, s in enumerate(sizes))  # fmt: skip
    raise MergeError(
        f"no model has all the target block counts ({groups}). The numbers of attention heads / GroupNorm groups are "
        "architecture hyperparameters fxmerge cannot change, so the merged model is rebuilt from one model that has "
        f"every target count. Pass width as a dict giving one model's counts ({options}), or 'max' / 'min' when one "
        "model has the most (fewest) blocks in every group."
    )
