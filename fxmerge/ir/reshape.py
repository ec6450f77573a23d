"""Reshape as an operation on axis terms.

A reshape is cut into minimal *segments*: runs of input axes and output axes with equal products
(size-1 axes are ignored). Each segment is a merge, a split, or both:

* levels ``k..k+r`` of one joint, in order, re-partitioned into new sizes keep the joint (so per-head
  structure survives ``view``/``transpose``/``reshape`` round trips);
* plain axes interleaved with such levels (e.g. the broadcast axis of a GQA ``repeat_kv``) are inserted
  into the joint as shared levels;
* anything else merges plain terms (joints involved are forced shared first), then splits.
"""

from __future__ import annotations

import math

from fxmerge.ir.dims import AxisTerm, DimAlgebra, Dims, Joint, Lvl, make_joint
from fxmerge.ir.terms import TRIVIAL, Term, chain, product


def segments(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Minimal (input positions, output positions) runs with equal products, size-1 axes skipped."""
    ins = [i for i, n in enumerate(in_shape) if n != 1]
    outs = [j for j, n in enumerate(out_shape) if n != 1]
    segs: list[tuple[list[int], list[int]]] = []
    a = b = 0
    while a < len(ins) or b < len(outs):
        si, so = [ins[a]], [outs[b]]
        pi, po = in_shape[ins[a]], out_shape[outs[b]]
        a, b = a + 1, b + 1
        while pi != po:
            if pi < po:
                si.append(ins[a])
                pi *= in_shape[ins[a]]
                a += 1
            else:
                so.append(outs[b])
                po *= out_shape[outs[b]]
                b += 1
        segs.append((si, so))
    return segs


def reshape_dims(alg: DimAlgebra, dims: Dims, in_shape, out_shape, why: str) -> Dims:
    """Dims of ``x.reshape(out_shape)`` given the dims of ``x``."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if math.prod(in_shape) != math.prod(out_shape):
        raise AssertionError(f"reshape {in_shape} -> {out_shape} changes the number of elements")
    if in_shape == out_shape:
        return tuple(dims)
    cur: list[AxisTerm] = list(dims)
    out: list[AxisTerm] = [TRIVIAL] * len(out_shape)
    for ins, outs in segments(in_shape, out_shape):
        sizes = tuple(out_shape[p] for p in outs)
        new_axes = _segment(alg, cur, out, ins, sizes, why)
        for p, t in zip(outs, new_axes, strict=True):
            out[p] = t
    return alg.normalize(tuple(out), why)


def _segment(alg: DimAlgebra, cur: list, out: list, ins: list[int], sizes: tuple[int, ...], why: str) -> list:
    axes = [cur[p] for p in ins]
    if len(axes) == 1 and len(sizes) == 1:
        return axes
    joints = {id(a.joint): a.joint for a in axes if isinstance(a, Lvl)}
    if len(joints) == 1:
        (j,) = joints.values()
        levels = [a.k for a in axes if isinstance(a, Lvl)]
        all_levels = [d.k for d in cur if isinstance(d, Lvl) and d.joint is j]
        if levels == list(range(levels[0], levels[0] + len(levels))) and len(set(all_levels)) == len(j.sizes):
            return _regroup_joint(alg, cur, out, j, axes, sizes, why)
    for jj in joints.values():
        _replace(cur, out, alg.flatten(tuple(cur), jj, why), alg.flatten(tuple(out), jj, why))
    plain = chain([alg.plain(cur[p], why) for p in ins])
    return make_joint(plain, sizes)


def _regroup_joint(alg: DimAlgebra, cur: list, out: list, j: Joint, axes: list, sizes, why: str) -> list:
    """Insert plain axes of the segment as shared levels, then re-partition the level range."""
    start = next(a.k for a in axes if isinstance(a, Lvl))
    n_old = sum(isinstance(a, Lvl) for a in axes)
    level_sizes = list(j.sizes)
    root = j.root
    for pos, a in enumerate(axes, start=start):
        if not isinstance(a, Lvl):
            root, level_sizes = _insert_level(alg, root, level_sizes, pos, a, why)
    end = start + len(axes)
    kept = tuple(s for s in sizes if s != 1)
    new_sizes = tuple(level_sizes[:start]) + kept + tuple(level_sizes[end:])
    nj = Joint(root, new_sizes) if len(new_sizes) > 1 else None

    def remap(d: AxisTerm) -> AxisTerm:
        if not (isinstance(d, Lvl) and d.joint is j):
            return d
        if nj is None:
            return root
        if d.k < start:
            return Lvl(nj, d.k)
        if d.k < start + n_old:
            return Lvl(nj, start)
        return Lvl(nj, d.k - n_old + len(kept))

    _replace(cur, out, [remap(d) for d in cur], [remap(d) for d in out])
    if nj is None:
        return [root if s != 1 else TRIVIAL for s in sizes]
    result: list[AxisTerm] = []
    k = start
    for s in sizes:
        if s == 1:
            result.append(TRIVIAL)
        else:
            result.append(Lvl(nj, k))
            k += 1
    return result


def _insert_level(alg: DimAlgebra, root: Term, sizes: list[int], at: int, t: AxisTerm, why: str):
    """New root with a shared level ``t`` inserted before level ``at``."""
    tt = alg.plain(t, why)

    def rebuild(node: Term, i: int) -> Term:
        if i == at:
            return product(tt, [node] * tt.size)
        outer, inners = alg.s.as_product(node, sizes[i], why)
        memo: dict[int, Term] = {}
        kids = []
        for x in inners:
            if id(x) not in memo:
                memo[id(x)] = rebuild(x, i + 1)
            kids.append(memo[id(x)])
        return product(outer, kids)

    return rebuild(root, 0), [*sizes[:at], tt.size, *sizes[at:]]


def _replace(cur: list, out: list, new_cur: list, new_out: list) -> None:
    cur[:] = new_cur
    out[:] = new_out
