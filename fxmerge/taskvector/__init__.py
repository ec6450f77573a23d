"""Task-vector merging of fine-tunes that share one base: TA, TIES, DARE, DELLA, Breadcrumbs,
Model Stock, SLERP and DPPA, streamed tensor by tensor over modules, state dicts and safetensors.

See ``docs/taskvector.md`` for every formula and option.
"""

from fxmerge.taskvector.api import MergeReport, TaskVectorWarning, merge_task_vectors, run_merge
from fxmerge.taskvector.config import TaskVectorConfig, load_tv_config, merge_from_config
from fxmerge.taskvector.dppa import FactorSearchResult, search_dppa_factors
from fxmerge.taskvector.methods import PRESETS, SCOPES, SHAPE_POLICIES
from fxmerge.taskvector.writer import LazyStateDict

__all__ = [
    "PRESETS",
    "SCOPES",
    "SHAPE_POLICIES",
    "FactorSearchResult",
    "LazyStateDict",
    "MergeReport",
    "TaskVectorConfig",
    "TaskVectorWarning",
    "load_tv_config",
    "merge_from_config",
    "merge_task_vectors",
    "run_merge",
    "search_dppa_factors",
]
