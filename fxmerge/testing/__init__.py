"""Public testing helpers: hypothesis strategies for architectures and spec permutations, a model zoo."""

from fxmerge.testing.archs import architectures, cnns, mlps, transformers
from fxmerge.testing.merging import (
    assert_merge_recovers,
    merge_permutations,
    mergeable_groups,
    random_batches,
)
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
    "assert_merge_recovers",
    "cnns",
    "fixed_mask",
    "merge_permutations",
    "mergeable_groups",
    "mlps",
    "permutations",
    "random_batches",
    "spec_permutations",
    "transformers",
]
