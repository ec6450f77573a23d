"""Post-merge passes that run the merged model on data: BatchNorm re-estimation, REPAIR, and the registered
post-passes of ``fxmerge.merge(..., post=[...])`` (normalisation-aware REPAIR, :mod:`fxmerge.passes.norm`)."""

from fxmerge.passes.bn import repair, reset_bn_stats
from fxmerge.passes.norm import norm_modules, norm_repair, rescale_outputs, unit_repair
from fxmerge.passes.registry import PostContext, parse_post, post_pass, post_pass_names, register_post_pass

__all__ = [
    "PostContext",
    "norm_modules",
    "norm_repair",
    "parse_post",
    "post_pass",
    "post_pass_names",
    "register_post_pass",
    "repair",
    "rescale_outputs",
    "reset_bn_stats",
    "unit_repair",
]
