"""Graph-level merge passes on an inferred PermutationSpec (alignment, zipping, MuDSC, averaging).

Methods are registered objects (:mod:`fxmerge.merge.methods`); options are typed (:mod:`fxmerge.merge.options`);
one engine (:class:`~fxmerge.merge.problem.Problem`) serves same-architecture, depth and width merges.
"""

from fxmerge.merge.api import merge
from fxmerge.merge.methods import (
    ActAlign,
    Average,
    Method,
    MuDSC,
    Rebasin,
    WZip,
    ZipIt,
    method_names,
    register_method,
    resolve_method,
)
from fxmerge.merge.options import HeteroOptions, MergeOptions
from fxmerge.merge.problem import Problem, Solution
from fxmerge.merge.result import MergeResult


def __getattr__(name: str):  # METHODS: the registered names at the time of asking
    if name == "METHODS":
        return method_names()
    raise AttributeError(name)


__all__ = [
    "METHODS",
    "ActAlign",
    "Average",
    "HeteroOptions",
    "MergeOptions",
    "MergeResult",
    "Method",
    "MuDSC",
    "Problem",
    "Rebasin",
    "Solution",
    "WZip",
    "ZipIt",
    "merge",
    "method_names",
    "register_method",
    "resolve_method",
]
