"""Public testing helpers: hypothesis strategies for architectures and spec permutations, a model zoo."""

from fxmerge.testing.archs import architectures, cnns, mlps, transformers
from fxmerge.testing.perms import (
    assert_frozen_untouched,
    assert_invariant,
    fixed_mask,
    permutations,
    spec_permutations,
)

__all__ = [
    "architectures",
    "assert_frozen_untouched",
    "assert_invariant",
    "cnns",
    "fixed_mask",
    "mlps",
    "permutations",
    "spec_permutations",
    "transformers",
]
