"""Direct unit tests of the dimension-term solver and the tensor-level algebra (dims, reshape, mix, overlay).

Every test states a constraint and checks the resolved structure by hand: which atoms are one class, what is
frozen, how products and concats refine.
"""

from __future__ import annotations

import pytest

from fxmerge.ir.dims import DimAlgebra, Lvl, make_joint
from fxmerge.ir.reshape import reshape_dims, segments
from fxmerge.ir.solver import Solver
from fxmerge.ir.terms import TRIVIAL, Atom, Bcast, Concat, Fixed, Product, concat, product


def test_unify_joins_classes_and_freeze_spreads_with_reason():
    s = Solver()
    a, b, c = s.atom(4), s.atom(4), s.atom(4)
    s.unify(a, b, "ab")
    assert s.head(a) is s.head(b) and s.head(c) is not s.head(a)
    s.unify(b, Fixed(4, "input"), "site")
    assert s.frozen_reason(a) == "input <- site"
    assert s.frozen_reason(c) is None
    with pytest.raises(AssertionError, match="size mismatch"):
        s.unify(a, s.atom(3), "bad")


def test_bcast_imposes_nothing():
    s = Solver()
    a = s.atom(5)
    s.unify(a, Bcast(5), "bcast")
    assert s.is_free_atom(a)


def test_atom_refined_into_product_keeps_independent_inners():
    s = Solver()
    a = s.atom(6)
    outer, inners = s.as_product(a, 3, "heads")
    assert outer.size == 3 and [i.size for i in inners] == [2, 2, 2]
    assert len({id(i) for i in inners}) == 3  # one inner permutation per block
    h = s.head(a)
    assert isinstance(h, Product) and h.outer is outer
    # a second view with the same outer size returns the same structure
    o2, i2 = s.as_product(a, 3, "again")
    assert o2 is outer and i2 == inners


def test_regroup_finer_product():
    s = Solver()
    a = s.atom(12)
    s.as_product(a, 2, "outer 2")  # 2 blocks of 6
    outer4, inners4 = s.as_product(a, 4, "outer 4")  # each block of 6 split into 2 blocks of 3
    assert outer4.size == 4 and [i.size for i in inners4] == [3] * 4
    r = s.resolve(a)
    assert isinstance(r, Product) and r.outer.size == 2


def test_concat_unify_cuts_at_union_of_boundaries():
    s = Solver()
    x, y = s.atom(6), s.atom(6)
    s.unify(x, concat([s.atom(2), s.atom(4)]), "x")
    s.unify(y, concat([s.atom(4), s.atom(2)]), "y")
    s.unify(x, y, "xy")
    assert _concat_leaves(s.resolve(x)) == [2, 2, 2]
    assert _concat_leaves(s.resolve(y)) == [2, 2, 2]


def _concat_leaves(t) -> list[int]:
    if isinstance(t, Concat):
        return [n for p in t.parts for n in _concat_leaves(p)]
    return [t.size]


def test_split_through_blocks_freezes():
    s = Solver()
    a = s.atom(6)
    s.as_product(a, 3, "3 blocks of 2")
    parts = s.as_concat(a, [3, 3], "split through the middle block")
    assert all(isinstance(p, Fixed) for p in parts)
    assert isinstance(s.resolve(a), Fixed)


def test_overlay_takes_the_varying_operand_leaf_by_leaf():
    s = Solver()
    kv = s.atom(2)
    hd = [s.atom(3), s.atom(3)]
    # v repeated over 4 query heads per kv head: heads (2 x Bcast 4), per-kv-head dims
    v_root = product(kv, [product(Bcast(4), [hd[0]] * 4), product(Bcast(4), [hd[1]] * 4)])
    r = [s.atom(4), s.atom(4)]
    q_heads = product(kv, r)  # query heads: kv x (query heads within each kv group)
    other = product(q_heads, [Bcast(3)] * 8)
    out = s.overlay(v_root, other, "attn @ v")
    res = s.resolve(out)
    assert isinstance(res, Product) and s.head(res.outer) is s.head(kv)
    for b in range(2):
        inner = res.inners[b]
        assert isinstance(inner, Product) and s.head(inner.outer) is s.head(r[b])
        assert all(s.head(t) is s.head(hd[b]) for t in inner.inners)
    assert not s.has_bcast(out)


def test_overlay_keeps_all_broadcast_when_both_broadcast():
    s = Solver()
    assert isinstance(s.overlay(Bcast(4), Bcast(4), "x"), Bcast)
    a = s.atom(4)
    assert s.overlay(a, Bcast(4), "x") is a


# ----------------------------------------------------------------------------------------- tensor algebra
def _joint16(s: Solver):
    alg = DimAlgebra(s)
    root = s.atom(16)
    return alg, root, tuple(make_joint(root, (4, 4)))


def test_mix_inner_level_structures_blocks():
    """softmax over the inner factor of a 4x4 split: the 16 must be 4 blocks, each permuted inside."""
    s = Solver()
    alg, root, dims = _joint16(s)
    alg.mix(dims, [1], "softmax(-1)")
    r = s.resolve(root)
    assert isinstance(r, Product) and r.outer.size == 4
    assert len({id(s.head(i)) for i in r.inners}) == 4  # independent inside each block


def test_mix_outer_level_shares_inner_level():
    """softmax over the outer factor: the inner permutation must not depend on the outer index."""
    s = Solver()
    alg, root, dims = _joint16(s)
    alg.mix(dims, [0], "softmax(-2)")
    r = s.resolve(root)
    assert isinstance(r, Product)
    assert len({id(s.head(i)) for i in r.inners}) == 1


def test_mix_all_levels_imposes_nothing():
    s = Solver()
    alg, root, dims = _joint16(s)
    alg.mix(dims, [0, 1], "layer_norm over both")
    assert s.is_free_atom(root)


def test_mix_plain_axis_imposes_nothing():
    s = Solver()
    alg = DimAlgebra(s)
    a = s.atom(8)
    alg.mix((Fixed(2), a), [1], "softmax")
    assert s.is_free_atom(a)


def test_link_contracts_and_broadcasts():
    s = Solver()
    alg = DimAlgebra(s)
    x, w_out, w_in = s.atom(5), s.atom(3), s.atom(5)
    out = alg.link([((Fixed(2), x), "bi"), ((w_out, w_in), "oi")], "bo", (2, 3), "linear")
    assert s.head(x) is s.head(w_in)
    assert out[1] is w_out
    out2 = alg.link([((Bcast(4),), "a"), ((s.atom(4),), "a")], "a", (4,), "add")
    assert isinstance(out2[0], Atom)


def test_segments_of_reshape():
    assert segments((2, 12), (2, 3, 4)) == [([0], [0]), ([1], [1, 2])]
    assert segments((2, 3, 4), (6, 4)) == [([0, 1], [0]), ([2], [1])]
    assert segments((1, 6), (6, 1)) == [([1], [0])]


def test_reshape_split_and_merge_round_trip_keeps_joint():
    s = Solver()
    alg = DimAlgebra(s)
    root = s.atom(12)
    split = reshape_dims(alg, (Fixed(2), root), (2, 12), (2, 3, 4), "view")
    assert isinstance(split[1], Lvl) and isinstance(split[2], Lvl) and split[1].joint is split[2].joint
    merged = reshape_dims(alg, split, (2, 3, 4), (2, 12), "view back")
    assert s.head(merged[1]) is s.head(root)
    assert s.is_free_atom(root)  # a split and its inverse impose nothing


def test_reshape_merging_independent_axes_is_a_chain():
    s = Solver()
    alg = DimAlgebra(s)
    a, b = s.atom(3), s.atom(4)
    (m,) = reshape_dims(alg, (a, b), (3, 4), (12,), "flatten")
    r = s.resolve(m)
    assert isinstance(r, Product) and r.outer is a and all(i is b for i in r.inners)


def test_trivial_axes():
    s = Solver()
    assert s.atom(1) is TRIVIAL
    alg = DimAlgebra(s)
    out = reshape_dims(alg, (s.atom(4),), (4,), (1, 4, 1), "unsqueeze")
    assert out[0] is TRIVIAL and out[2] is TRIVIAL and out[1].size == 4
