"""Weight similarity of a merge space's units, computed incrementally, in float32, on the models' device.

A unit's weight vector is its entries over every *slot* of the space (each parameter axis it lives on), with
the neighbour spaces' current transforms applied along the parameter's other axes
(:func:`fxmerge.merge.transform.transform_param`, the space itself skipped). The similarity is the Pearson
correlation of those vectors (``"corr"``, MuDSC) or their inner products (``"dot"``, Git Re-Basin).

What is computed, and what is not:

* only the blocks a matcher reads: the cross blocks ``S[model 0, model m]`` for alignment (``cross_only``),
  every block for zipping; the matrix handed to the matcher is [O, O] float64 with zero within-model blocks
  when ``cross_only`` (alignment never reads them);
* slots are grouped by the neighbour spaces they depend on. A group's contribution (its dot-product blocks,
  the units' sums and sums of squares) is cached with the neighbour matchings it was computed under and
  recomputed only when one of them changed (object identity: the coordinate descent keeps a matching object
  as long as its assignment does not change). Contributions are cached for spaces with two or more
  neighbour-dependent groups, within ``cache_bytes``; others are recomputed when dirty (the solver skips a
  space none of whose neighbours changed, see :func:`fxmerge.merge.engine.coordinate_descent`);
* Pearson centring uses a per-unit reference offset taken from the space's first evaluation (the exact mean
  for one-to-one transforms, which only permute a unit's entries), so the float32 products are of centred
  values and the exact correction ``- D (mean - offset)^2`` is tiny: no cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxmerge.ir.layout import Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.match import Matching
from fxmerge.merge.spaces import Slot, Space, occurrences
from fxmerge.merge.transform import Transforms, transform_param

__all__ = ["WeightSimilarity"]

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class _Group:
    """Slots of one space whose transformed values depend on the same neighbour spaces."""

    slots: list[Slot]
    deps: tuple[Layout, ...]
    width: int  # entries per unit over these slots (D of this group)


@dataclass
class _Contribution:
    stamp: tuple[Matching | None, ...]
    dots: dict[tuple[int, int], torch.Tensor]
    sums: list[torch.Tensor]
    squares: list[torch.Tensor]


@dataclass
class _SpaceState:
    groups: list[_Group]
    offsets: list[torch.Tensor] | None = None  # per model, per unit centring reference (corr)
    cache: dict[int, _Contribution] = field(default_factory=dict)
    cached: bool = False


class WeightSimilarity:
    """Per-space weight similarity with incremental recomputation (see the module docstring).

    Args:
        spec: the shared spec.
        spaces: the merge spaces (keys -> :class:`Space`).
        states: per model, its state dict (not modified; float tensors are read as float32 on ``device``).
        kind: ``"corr"`` or ``"dot"``.
        cross_only: compute only the blocks against model 0 (alignment matchers).
        device: where the products run (default: where model 0's tensors live).
        cache_bytes: total size of cached contributions (default: a quarter of the models' tensor bytes, at most 1 GiB, so a
            merge's peak memory stays a small multiple of its inputs).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        spaces: dict[Layout, Space],
        states: list[dict[str, torch.Tensor]],
        *,
        kind: str,
        cross_only: bool,
        device: torch.device | str | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        if kind not in ("corr", "dot"):
            raise ValueError(f"kind must be 'corr' or 'dot', got {kind!r}")
        self.spec, self.spaces, self.kind, self.cross_only = spec, spaces, kind, cross_only
        self.n = len(states)
        first = next((t for t in states[0].values() if t.is_floating_point()), None)
        self.device = (
            torch.device(device) if device is not None else (first.device if first is not None else None)
        )
        self.states = states
        if cache_bytes is None:
            inputs = sum(t.numel() * t.element_size() for st in states for t in st.values())
            cache_bytes = min(DEFAULT_CACHE_BYTES, inputs // 4)
        self._budget = cache_bytes
        self._params: dict[tuple[int, str], torch.Tensor] = {}
        self._state = {k: _SpaceState(self._groups(k, sp)) for k, sp in spaces.items()}
        self._norms: dict[Layout, list[torch.Tensor]] = {}
        self._plan_caches()

    # ------------------------------------------------------------------ structure
    def _deps_of(self, name: str, key: Layout) -> tuple[Layout, ...]:
        found: dict[Layout, None] = {}
        for lay in self.spec.axes[name]:
            for k, _, _ in occurrences(lay):
                if k != key:
                    found[k] = None
        return tuple(found)

    def _groups(self, key: Layout, space: Space) -> list[_Group]:
        by_deps: dict[tuple[Layout, ...], list[Slot]] = {}
        for slot in space.slots:
            by_deps.setdefault(self._deps_of(slot.param, key), []).append(slot)
        out = []
        for deps, slots in by_deps.items():
            width = sum(self._slot_width(s, space.size) for s in slots)
            out.append(_Group(slots, deps, width))
        return out

    def _slot_width(self, slot: Slot, size: int) -> int:
        shape = (
            self.spec.shapes[slot.param]
            if slot.param in self.spec.shapes
            else self.states[0][slot.param].shape
        )
        numel = 1
        for d in shape:
            numel *= int(d)
        return numel // int(shape[slot.axis]) * slot.unit

    def _plan_caches(self) -> None:
        """Cache contributions of spaces with >= 2 neighbour-dependent groups, cheapest first, within budget."""
        pairs = self.n - 1 if self.cross_only else self.n * (self.n + 1) // 2
        costs = []
        for key, st in self._state.items():
            dynamic = [g for g in st.groups if g.deps]
            if len(dynamic) >= 2:
                size = self.spaces[key].size
                costs.append((len(st.groups) * pairs * size * size * 4, key))
        budget = self._budget
        for nbytes, key in sorted(costs, key=lambda c: c[0]):
            if nbytes <= budget:
                self._state[key].cached = True
                budget -= nbytes

    def dependencies(self, key: Layout) -> tuple[Layout, ...]:
        """The neighbour spaces whose transforms this space's similarity reads."""
        found: dict[Layout, None] = {}
        for g in self._state[key].groups:
            found.update(dict.fromkeys(g.deps))
        return tuple(found)

    # ------------------------------------------------------------------ values
    def _param(self, m: int, name: str) -> torch.Tensor:
        t = self.states[m][name]
        if t.dtype == torch.float32 and (self.device is None or t.device == self.device):
            return t
        return t.detach().to(device=self.device, dtype=torch.float32)

    def _blocks(self, key: Layout, group: _Group, m: int, tr: Transforms) -> torch.Tensor:
        """Model ``m``'s [C, D] unit vectors over the group's slots, neighbours' transforms applied."""
        size = self.spaces[key].size
        cols = []
        for slot in group.slots:
            w = transform_param(self.spec, slot.param, self._param(m, slot.param), m, self.n, tr, skip=key)
            w = w.narrow(slot.axis, slot.offset, size * slot.unit).movedim(slot.axis, 0)
            cols.append(w.reshape(size, -1))
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def _pairs(self) -> list[tuple[int, int]]:
        if self.cross_only:
            return [(0, m) for m in range(1, self.n)]
        return [(i, j) for i in range(self.n) for j in range(i, self.n)]

    def _contribution(self, key: Layout, group: _Group, tr: Transforms, offsets) -> _Contribution:
        vecs = [self._blocks(key, group, m, tr) for m in range(self.n)]
        if offsets is not None:
            vecs = [v - o.to(v)[:, None] for v, o in zip(vecs, offsets, strict=True)]
        dots = {(i, j): vecs[i] @ vecs[j].T for i, j in self._pairs()}
        sums = [v.sum(dim=1, dtype=torch.float64) for v in vecs]  # centred values: float32 squares suffice
        squares = [torch.linalg.vector_norm(v, dim=1).double().square() for v in vecs]
        return _Contribution(tuple(tr.get(d) for d in group.deps), dots, sums, squares)

    def _offsets(self, key: Layout, tr: Transforms) -> list[torch.Tensor] | None:
        st = self._state[key]
        if self.kind != "corr":
            return None
        if st.offsets is None:  # first evaluation: exact per-unit means
            total = sum(g.width for g in st.groups)
            sums = [
                torch.zeros(self.spaces[key].size, dtype=torch.float64, device=self.device)
                for _ in range(self.n)
            ]
            for g in st.groups:
                for m in range(self.n):
                    sums[m] += self._blocks(key, g, m, tr).double().sum(dim=1)
            st.offsets = [(s / max(total, 1)).float() for s in sums]
        return st.offsets

    def __call__(self, key: Layout, tr: Transforms, ready: frozenset[Layout] | None = None) -> torch.Tensor:
        """The [O, O] similarity of ``key``'s units under the current transforms ``tr`` (on the CPU; float64, or
        float32 with zero within-model blocks when ``cross_only``).

        ``ready``: read only the slots whose neighbour spaces are all in it (slots without neighbours always),
        every slot when none qualifies; ``None`` reads every slot."""
        st = self._state[key]
        offsets = self._offsets(key, tr)
        groups = list(enumerate(st.groups))
        if ready is not None:
            usable = [(gi, g) for gi, g in groups if all(d in ready for d in g.deps)]
            groups = usable or groups
        parts = []
        for gi, g in groups:
            c = st.cache.get(gi)
            if c is None or any(a is not tr.get(d) for a, d in zip(c.stamp, g.deps, strict=True)):
                c = self._contribution(key, g, tr, offsets)
                if st.cached:
                    st.cache[gi] = c
            parts.append(c)
        total = sum(g.width for _, g in groups)
        return self._assemble(key, parts, total, offsets)

    def _assemble(self, key: Layout, parts: list[_Contribution], total: int, offsets) -> torch.Tensor:
        size = self.spaces[key].size
        n = self.n
        o = size * n
        # alignment reads only the cross blocks (converted to float64 per block by the Hungarian): float32 [O, O]
        # halves the matrix; zipping gets float64 as before
        dtype = torch.float32 if self.cross_only else torch.float64
        sim = torch.empty(o, o, dtype=dtype)
        if self.cross_only:  # the blocks not written below (model 0's own, among models 1..N-1) are 0
            sim[:size, :size] = 0
            sim[size:, size:] = 0
        dots = {p: _total([c.dots[p] for c in parts]).to(device="cpu", dtype=torch.float64 if self.kind == "corr"
                                                            else dtype, copy=True) for p in self._pairs()}  # fmt: skip
        if self.kind == "dot":
            self._norms[key] = [sum(c.squares[m] for c in parts).cpu().sqrt() for m in range(n)]
            for (i, j), d in dots.items():
                sim[i * size : (i + 1) * size, j * size : (j + 1) * size] = d
                sim[j * size : (j + 1) * size, i * size : (i + 1) * size] = d.T
            return _symmetric_blocks(sim, size, n, self.cross_only)
        mean_dev = [sum(c.sums[m] for c in parts).cpu() / max(total, 1) for m in range(n)]  # mean - offset
        sq = [sum(c.squares[m] for c in parts).cpu() for m in range(n)]
        norms = [
            (sq[m] - total * mean_dev[m].square()).clamp_min(0).sqrt().clamp_min(1e-12) for m in range(n)
        ]
        for (i, j) in list(dots):
            corr = dots.pop((i, j))  # a fresh copy: centred and scaled in place (the same roundings as out of place)
            corr.sub_(total * mean_dev[i][:, None] * mean_dev[j][None, :])
            corr.div_(norms[i][:, None]).div_(norms[j][None, :])
            sim[i * size : (i + 1) * size, j * size : (j + 1) * size] = corr
            sim[j * size : (j + 1) * size, i * size : (i + 1) * size] = corr.T
            del corr
        return _symmetric_blocks(sim, size, n, self.cross_only)

    def cosine(self, key: Layout, sim: torch.Tensor) -> torch.Tensor:
        """A ``"dot"`` similarity of ``key`` (its last evaluation) turned into cosines in place: the same matching
        on a readable scale, for reports."""
        if self.kind != "dot" or key not in self._norms:
            return sim
        inv = torch.cat(self._norms[key]).to(sim).clamp_min(1e-30).reciprocal_()
        return sim.mul_(inv[:, None]).mul_(inv[None, :])


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].clone() if len(parts) > 1 else parts[0]
    for p in parts[1:]:
        out += p
    return out


def _symmetric_blocks(sim: torch.Tensor, size: int, n: int, cross_only: bool) -> torch.Tensor:
    """Exact symmetry of the diagonal blocks (computed as one product; rounding can break it)."""
    if cross_only:
        return sim
    for m in range(n):
        b = sim[m * size : (m + 1) * size, m * size : (m + 1) * size]
        b.copy_((b + b.T) / 2)
    return sim
