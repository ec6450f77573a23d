"""Property-testing merges: a model merged with a permuted copy of itself must come back unchanged.

For any model, ``merge([model, spec.apply(model, perms)])`` with an alignment method undoes ``perms`` and
averages two identical models, so the merged outputs equal the model's (float64). Permutations are drawn only
for groups the merge engine carries (see ``fxmerge.merge.spaces``); the others are kept at the identity by
design and a permutation of them is not recoverable.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from fxmerge.capture.trace import split_inputs
from fxmerge.clone import clone_module
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.spaces import find_spaces
from fxmerge.testing.perms import permutations


def mergeable_groups(spec: PermutationSpec) -> list[int]:
    """Ids of the groups a merge aligns (every group not kept at the identity)."""
    _, stuck = find_spaces(spec)
    return [g.id for g in spec.groups if g.id not in stuck]


@st.composite
def merge_permutations(draw: st.DrawFn, spec: PermutationSpec) -> dict[int, torch.Tensor]:
    """Random permutations of every group a merge aligns."""
    return {gid: draw(permutations(spec.group(gid).size)) for gid in mergeable_groups(spec)}


def random_batches(example_inputs: Any, *, n: int = 4, size: int = 32, seed: int = 0) -> list[Any]:
    """``n`` batches shaped like ``example_inputs`` (float64 normal values; integer inputs drawn in range)."""
    g = torch.Generator().manual_seed(seed)

    def draw(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = (size, *t.shape[1:])
        if t.is_floating_point():
            return torch.randn(shape, generator=g, dtype=torch.float64)
        return torch.randint(0, int(t.max()) + 1, shape, generator=g, dtype=t.dtype)

    return [tree_map(draw, example_inputs) for _ in range(n)]


def assert_merge_recovers(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    perms: dict[int, torch.Tensor],
    *,
    method: str = "mudsc",
    data: Any = None,
    atol: float = 1e-8,
    **options: Any,
) -> None:
    """Merging ``model`` (float64) with ``spec.apply(model, perms)`` gives back ``model``'s outputs."""
    from fxmerge.merge import merge

    base = clone_module(model).double().eval()
    inputs = tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                      example_inputs)  # fmt: skip
    other = spec.apply(base, perms)
    data = data if data is not None else random_batches(inputs)
    res = merge([base, other], method=method, data=data, example_inputs=inputs, spec=spec, progress=False,
                reset_bn=False, **options)  # fmt: skip
    args, kwargs = split_inputs(inputs if isinstance(inputs, tuple) else (inputs,))
    with torch.no_grad():
        ref = [t for t in tree_leaves(base(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        out = [t for t in tree_leaves(res.model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    for a, b in zip(ref, out, strict=True):
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        assert diff <= atol, f"{method}: merged outputs differ by {diff:.3g} (permuted groups {sorted(perms)})"
