"""Unit matchers: Hungarian alignment, ZipIt greedy zipping and their group-respecting versions.

All matchers take a similarity matrix over the stacked units of N models (model m owns a contiguous
block of ``sizes[m]`` rows/columns) and return a :class:`Matching` of plain tensors.
"""

from fxmerge.match.align import align, align_perm
from fxmerge.match.groups import align_groups, assign_blocks, block_scores, zip_groups
from fxmerge.match.types import Matching
from fxmerge.match.zip import zip_match
from fxmerge.match.zip_reference import zip_groups_reference, zip_match_reference

__all__ = [
    "Matching",
    "align",
    "align_groups",
    "align_perm",
    "assign_blocks",
    "block_scores",
    "zip_groups",
    "zip_groups_reference",
    "zip_match",
    "zip_match_reference",
]
