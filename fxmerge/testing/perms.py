"""Hypothesis strategies over permutations of a :class:`~fxmerge.PermutationSpec`, and invariance helpers.

Use them to property-test your own model::

    from hypothesis import given
    from fxmerge.testing import spec_permutations, assert_invariant

    spec = fxmerge.infer_groups(model, inputs)

    @given(spec_permutations(spec))
    def test_my_model_is_invariant(perms):
        assert_invariant(model, spec, inputs, perms)
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from fxmerge.capture.trace import split_inputs
from fxmerge.clone import clone_module
from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod
from fxmerge.ir.spec import PermutationSpec


@st.composite
def permutations(draw: st.DrawFn, n: int) -> torch.Tensor:
    """A permutation of ``range(n)`` (hypothesis shrinks towards the identity)."""
    return torch.tensor(draw(st.permutations(list(range(n)))), dtype=torch.long)


@st.composite
def spec_permutations(draw: st.DrawFn, spec: PermutationSpec, *, max_groups: int | None = None) -> dict[int, torch.Tensor]:
    """Independent random permutations for (a random subset of) the spec's groups."""
    ids = [g.id for g in spec.groups]
    if max_groups is not None and len(ids) > max_groups:
        ids = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=max_groups, unique=True))
    return {gid: draw(permutations(spec.group(gid).size)) for gid in ids}


def fixed_mask(layout: Layout) -> torch.Tensor:
    """True at the positions of an axis that no permutation may move."""
    if isinstance(layout, LFixed):
        return torch.ones(layout.size, dtype=torch.bool)
    if isinstance(layout, G):
        return torch.zeros(layout.size, dtype=torch.bool)
    if isinstance(layout, Cat):
        return torch.cat([fixed_mask(p) for p in layout.parts])
    assert isinstance(layout, Prod)
    if isinstance(layout.outer, LFixed):
        return torch.cat([fixed_mask(i) for i in layout.inners])
    # a moving outer block carries its content along: positions are fixed only if every block is identical
    # and fixed, which the builder normalises away; so nothing is pinned here.
    return torch.zeros(layout.size, dtype=torch.bool)


def assert_frozen_untouched(spec: PermutationSpec, perms: dict[int, torch.Tensor]) -> None:
    """Every position that the spec marks as fixed keeps its index under ``perms``."""
    for name, layouts in spec.axes.items():
        for axis, lay in enumerate(layouts):
            idx = spec.axis_index(name, axis, perms)
            if idx is None:
                continue
            mask = fixed_mask(lay)
            moved = idx[mask] != torch.arange(lay.size)[mask]
            if bool(moved.any()):
                raise AssertionError(f"{name}[{axis}]: a frozen position moved under {sorted(perms)}")


def assert_invariant(
    model: nn.Module, spec: PermutationSpec, example_inputs: Any, perms: dict[int, torch.Tensor], *, rtol: float = 1e-6
) -> None:
    """Outputs of ``model`` and of ``spec.apply(model, perms)`` agree in float64."""
    base = clone_module(model).double().eval()
    permuted = spec.apply(base, perms)
    args, kwargs = split_inputs(tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                                         example_inputs))  # fmt: skip
    with torch.no_grad():
        ref = [t for t in tree_leaves(base(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        out = [t for t in tree_leaves(permuted(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    scale = max((float(t.abs().max()) for t in ref if t.numel() and t.is_floating_point()), default=1.0)
    for a, b in zip(ref, out, strict=True):
        if a.is_floating_point():
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            assert diff <= 1e-9 + rtol * max(scale, 1.0), f"outputs changed by {diff:.3g} under {sorted(perms)}"
        else:
            assert torch.equal(a, b), f"integer outputs changed under {sorted(perms)}"
