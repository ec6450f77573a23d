"""Typed options of a merge, one source of truth for Python, YAML configs and the CLI.

:class:`MergeOptions` holds what every merge shares; :class:`HeteroOptions` what only depth/width merges read
(models of different depth or width, :mod:`fxmerge.hetero`). A method's own settings live on the method
(:mod:`fxmerge.merge.methods`). ``fxmerge.merge(..., seed=1, depth="lma", alpha=0.3)`` routes each keyword to
the one object that owns it; a keyword nobody owns is an error, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["HeteroOptions", "MergeOptions"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class MergeOptions(_Options):
    """Options every merge shares."""

    seed: int = Field(0, description="seed of the random sweep order and sampling")
    reset_bn: bool = Field(True, description="re-estimate BatchNorm statistics on the data after merging")
    repair: bool = Field(
        False, description="REPAIR: rescale producer layers to the parents' statistics (needs data)"
    )
    stop_at: str | None = Field(
        None, description="partial zipping: merge up to this module, keep N tails after it"
    )
    max_batches: int | None = Field(None, ge=1, description="use at most this many data batches per pass")
    frontend: Literal["auto", "fx", "export"] = Field(
        "auto", description="graph capture: torch.fx or torch.export"
    )
    progress: bool = Field(True, description="show progress bars on data passes and matching sweeps")
    post: list[str | dict[str, Any]] = Field(
        [],
        description="post-passes run in order after the merge (needs data): names such as 'norm_repair', "
        "'unit_repair' or {name: {setting: value}} (fxmerge.passes.register_post_pass)",
    )

    @field_validator("post")
    @classmethod
    def _post(cls, value: list[Any]) -> list[Any]:
        from fxmerge.passes.registry import parse_post

        parse_post(value)  # unknown names and settings are errors now, not after the merge
        return value


class HeteroOptions(_Options):
    """Options of merges of models that differ in depth and/or width."""

    depth: Literal["lma", "sma", "uniform"] | None = Field(
        None, description="merge models of different depth"
    )
    width: str | int | dict[int, int] | None = Field(
        None, description="merge models of different width: 'max', 'min', a width, or {group id: width}"
    )
    where: Literal["start", "end"] = Field(
        "start", description="depth: a shallow block goes to its segment's start/end"
    )
    blocks: list[Any] | None = Field(
        None, description="depth: per model, its block module names (default: found)"
    )
    cka_batches: int | None = Field(None, ge=1, description="depth: batches used for the CKA alignment")
    cka_plot: str | Path | None = Field(
        None, description="depth: PNG path of the CKA heatmap with the alignment"
    )

    @field_validator("width")
    @classmethod
    def _width(cls, value: str | int | dict[int, int] | None) -> str | int | dict[int, int] | None:
        if isinstance(value, str) and value not in ("max", "min"):
            raise ValueError(
                f"must be 'max', 'min', a positive width or a mapping group id -> width, got {value!r}"
            )
        widths = value.values() if isinstance(value, dict) else [value] if isinstance(value, int) else []
        if any(w < 1 for w in widths):
            raise ValueError(f"widths must be >= 1, got {value}")
        return value

    @property
    def active(self) -> bool:
        """Whether depth or width heterogeneity is switched on."""
        return self.depth is not None or self.width is not None
