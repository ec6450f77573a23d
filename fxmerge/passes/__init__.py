"""Post-merge passes that run the merged model on data: BatchNorm re-estimation and REPAIR."""

from fxmerge.passes.bn import repair, reset_bn_stats

__all__ = ["repair", "reset_bn_stats"]
