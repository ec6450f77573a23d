"""Activation statistics: streaming correlation of stacked model units, per-channel moments, data batches."""

from fxmerge.stats.batches import batch_inputs, iter_inputs
from fxmerge.stats.correlation import CorrelationAccumulator
from fxmerge.stats.moments import ChannelMoments

__all__ = ["ChannelMoments", "CorrelationAccumulator", "batch_inputs", "iter_inputs"]
