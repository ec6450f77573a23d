"""Heterogeneous merging: models of different depth (block alignment + identity expansion) and width
(elastic zipping), after Xu et al., "Training-free Heterogeneous Model Merging" (arXiv 2501.00061)."""

from fxmerge.hetero.align import align_depth, block_cka, check_alignable
from fxmerge.hetero.api import DEPTH_METHODS, merge_hetero
from fxmerge.hetero.blocks import Block, BlockStructure, find_blocks
from fxmerge.hetero.cka import MinibatchCKA, linear_cka
from fxmerge.hetero.depth import Segmentation, align_stages, lma, placement, sma, uniform
from fxmerge.hetero.expand import Twin, expand, make_identity, param_map
from fxmerge.hetero.plot import plot_cka_alignment
from fxmerge.hetero.width import check_same_structure, group_sizes, resize_model, target_widths

__all__ = [
    "DEPTH_METHODS",
    "Block",
    "BlockStructure",
    "MinibatchCKA",
    "Segmentation",
    "Twin",
    "align_depth",
    "align_stages",
    "block_cka",
    "check_alignable",
    "check_same_structure",
    "expand",
    "find_blocks",
    "group_sizes",
    "linear_cka",
    "lma",
    "make_identity",
    "merge_hetero",
    "param_map",
    "placement",
    "plot_cka_alignment",
    "resize_model",
    "sma",
    "target_widths",
    "uniform",
]
