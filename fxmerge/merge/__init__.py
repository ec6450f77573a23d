"""Graph-level merge passes on an inferred PermutationSpec (alignment, zipping, MuDSC, averaging)."""

from fxmerge.merge.api import METHODS, MergeResult, merge

__all__ = ["METHODS", "MergeResult", "merge"]
