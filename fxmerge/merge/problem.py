"""The problem a merge method solves: spaces, weights, statistics and the primitives every method composes.

One :class:`Problem` serves every merge: models of one architecture, and the depth/width paths of
:mod:`fxmerge.hetero` (padded twins sharing one graph; spaces that some models do not occupy are pinned in
``init`` and left out of ``spaces``; with different widths ``elastic`` holds each space's per-model sizes,
present models and target width).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxmerge.errors import MergeError
from fxmerge.ir.layout import G, Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching, zip_match
from fxmerge.merge.engine import MatchOptions, SolveLog, coordinate_descent, families, solve_spaces
from fxmerge.merge.spaces import Space
from fxmerge.merge.transform import Transforms
from fxmerge.merge.wsim import WeightSimilarity

__all__ = ["Elastic", "Problem", "Solution"]


@dataclass
class Elastic:
    """Spaces whose widths differ across models: per space, the models' sizes, who takes part, the target."""

    sizes: dict[Layout, list[int]]
    present: dict[Layout, list[int]]
    targets: dict[Layout, int]


@dataclass
class Solution:
    """A method's answer: one matching per space (``transforms``), and what it was solved on."""

    transforms: Transforms
    sims: dict[Layout, torch.Tensor] = field(default_factory=dict)
    log: SolveLog = field(default_factory=SolveLog)


@dataclass
class Problem:
    """Everything a method may read. Build it with :func:`fxmerge.merge.api.merge` (or the hetero paths).

    Attributes:
        spec: the shared spec (model 0's).
        spaces: the spaces to match.
        states: per model, its state dict (read only).
        init: a transform for every space, including pinned ones (identities by default).
        activations: per space with an activation probe, the correlation over the stacked units (filled only
            for methods with ``needs_data``).
        generator: the seeded generator of every random choice (sweep order).
        progress: show progress bars.
        elastic: set when the models' widths differ (only zip matchers apply).
    """

    spec: PermutationSpec
    spaces: dict[Layout, Space]
    states: list[dict[str, torch.Tensor]]
    init: Transforms
    activations: dict[Layout, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    progress: bool = False
    elastic: Elastic | None = None
    device: torch.device | None = None
    _weights: dict[tuple[str, bool], WeightSimilarity] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        """Number of models."""
        return len(self.states)

    def weights(self, kind: str = "corr", *, cross_only: bool = True) -> WeightSimilarity:
        """The (incremental, cached) weight similarity of the spaces: ``"corr"`` (Pearson) or ``"dot"``;
        ``cross_only`` computes only the blocks against model 0, which is all an alignment reads."""
        self._require_equal_widths("weight similarity")
        key = (kind, cross_only)
        if key not in self._weights:
            self._weights[key] = WeightSimilarity(self.spec, self.spaces, self.states, kind=kind,
                                                  cross_only=cross_only, device=self.device)  # fmt: skip
        return self._weights[key]

    def match(self, keys: list[Layout], sims: dict[Layout, torch.Tensor], opts: MatchOptions) -> Transforms:
        """One matching per listed space on ``sims`` (families jointly; elastic spaces zipped to their target)."""
        if self.elastic is None:
            return solve_spaces(keys, self.spaces, sims, self.n, opts)
        if opts.matcher != "zip":
            raise MergeError("models of different widths are merged by elastic zipping: use method 'zipit' (or "
                             "MuDSC with matcher='zip')")  # fmt: skip
        return {k: self._match_elastic(k, sims[k], opts) for k in keys}

    def _match_elastic(self, key: Layout, sim: torch.Tensor, opts: MatchOptions) -> Matching:
        el = self.elastic
        assert el is not None
        present, sizes, target = el.present[key], el.sizes[key], el.targets[key]
        sizes_p = [sizes[m] for m in present]
        if isinstance(key, G):
            mt = zip_match(sim, sizes_p, r=0.5, alpha=opts.zip_alpha, beta=opts.zip_beta, target=target)
        elif len(set(sizes_p)) == 1:
            mt = solve_spaces([key], {key: self.spaces[key]}, {key: sim}, len(present), opts)[key]
        else:
            raise MergeError(f"a structured space (heads / grouped channels, groups {self.spaces[key].groups}) has "
                             f"sizes {sizes_p}; elastic width zips plain channel groups only.")  # fmt: skip
        return embed(mt, sizes, present)

    def _require_equal_widths(self, what: str) -> None:
        if self.elastic is not None:
            raise MergeError(f"{what} needs models of equal widths; models of different widths are zipped on "
                             "activations (method='zipit')")  # fmt: skip

    def activation_first(self, opts: MatchOptions) -> Solution:
        """Match the spaces whose family has activation probes on activations, the rest (e.g. heads inside an
        opaque attention call) on weight correlation with the activation-matched neighbours applied."""
        tr = dict(self.init)
        fams = families(self.spaces)
        with_act = [k for fam in fams if all(self.activations.get(k) is not None for k in fam) for k in fam]
        sims = {k: self.activations[k] for k in with_act}
        tr.update(self.match(with_act, sims, opts))
        rest = [k for k in self.spaces if k not in with_act]
        if rest:
            if self.elastic is not None:
                missing = [k for k in rest if self.elastic.present[k] and len(self.elastic.present[k]) > 1]
                if missing:
                    raise MergeError(f"space(s) of groups {[self.spaces[k].groups for k in missing]} have no "
                                     "activation probe; models of different widths cannot be zipped there")  # fmt: skip
            ws = self.weights("corr", cross_only=opts.matcher != "zip")
            part = {
                k: self.activations[k] if self.activations.get(k) is not None else ws(k, tr) for k in rest
            }
            sims.update(part)
            tr.update(self.match(rest, part, opts))
        return Solution(tr, sims)

    def descend(
        self,
        opts: MatchOptions,
        *,
        kind: str,
        alpha: float = 1.0,
        init: Transforms | None = None,
        max_sweeps: int = 30,
        patience: int | None = None,
        forward: bool = False,
    ) -> Solution:
        """Coordinate descent on ``alpha * S_weight + (1 - alpha) * S_act`` (weights only where a space has no
        activation similarity), see :func:`fxmerge.merge.engine.coordinate_descent`."""
        ws = self.weights(kind, cross_only=opts.matcher != "zip")
        act = self.activations if alpha < 1.0 else {}

        def sim_of(key: Layout, tr: Transforms, ready: frozenset[Layout] | None = None) -> torch.Tensor:
            s_w = ws(key, tr, ready)  # a fresh matrix: combined in place (same rounding as alpha*s_w + (1-alpha)*s_a)
            s_a = act.get(key)
            if s_a is None:
                return s_w
            scaled = s_a.to(s_w, copy=True).mul_(1 - alpha)
            return s_w.mul_(alpha).add_(scaled)

        tr, log = coordinate_descent(self.spaces, self.n, sim_of, ws.dependencies, opts,
                                     init=dict(init if init is not None else self.init), generator=self.generator,
                                     max_sweeps=max_sweeps, patience=patience, progress=self.progress,
                                     forward=forward,
                                     keep_dtype=torch.float16 if kind == "corr" else torch.float32)  # fmt: skip
        return Solution(tr, log.sims, log)


def embed(mt: Matching, sizes: list[int], present: list[int]) -> Matching:
    """A matching over the ``present`` models extended to all models (absent ones: every unit dropped)."""
    if len(present) == len(sizes):
        return mt
    cols = [torch.full((c,), -1, dtype=torch.long) for c in sizes]
    for i, m in enumerate(present):
        cols[m] = mt.assignment(i).cpu()
    return Matching.from_columns(torch.cat(cols).numpy(), sizes, mt.width, mt.value, dtype=torch.float64,
                                 device=torch.device("cpu"))  # fmt: skip


def present_identity(sizes: list[int], present: list[int], target: int) -> Matching:
    """Present models keep their units (averaged if several; units beyond ``target`` dropped), absent ones
    contribute nothing."""
    cols = []
    for m, c in enumerate(sizes):
        col = torch.arange(c)
        col[col >= target] = -1
        cols.append(col if m in present else torch.full((c,), -1, dtype=torch.long))
    return Matching.from_columns(torch.cat(cols).numpy(), sizes, target, 1.0, dtype=torch.float64,
                                 device=torch.device("cpu"))  # fmt: skip
