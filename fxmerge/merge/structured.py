"""Joint matching of a family of merge spaces that share groups, for any nesting of block layouts.

A family's spaces are layouts such as ``g3 x [[fixed8|g1]|[fixed8|g1]|g2]`` (a fused qkv laid out per head,
with partial rotary), ``(g4 x g3) x (g1,g1,g2,g2)`` (GQA: kv heads x query heads per kv head x head dims) or a
plain ``G(g2)`` that an inner group also lives in. Each space comes with a similarity matrix over the stacked
positions of all models. The solver matches **groups**, not spaces, top down:

1. a round collects every *occurrence* of the groups not decided yet but reachable (every block they sit in
   belongs to an already decided outer group): for each occurrence, the key positions each unit covers in
   every model, given the decided outer matchings, and the layout inside each unit;
2. a group whose units hold further groups (an *outer* group: heads, kv heads) is aligned one-to-one onto the
   anchor (model 0): unit pair ``(u, v)`` is scored by the best matching of the unit's inner layout on that
   tile (fixed positions compared in place, inner groups by a Hungarian, recursively), averaged over the
   occurrences;
3. a group whose units are single positions (or blocks of fixed positions) is matched on the average of its
   occurrences' similarity blocks (Hungarian, or ZipIt's zip with the zip matcher), so a group shared by
   several blocks (one head-dim permutation for all heads, the query heads of every kv group) or spaces gets
   **one** matching;
4. every space's merge/unmerge matrices are composed from the group matchings along its layout.

A group inside independent blocks (a head's own dims) is matched per *merged* group: anchor block ``k``'s
group with the group of the block each model put there. Groups whose evidence is nested under an undecided
group wait for it (``blocked``), so the outer levels decide first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fxmerge.errors import MergeError
from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod, groups_in
from fxmerge.match import Matching, align, zip_match
from fxmerge.match.align import hungarian
from fxmerge.merge.report import matched_similarity
from fxmerge.merge.spaces import Space


@dataclass
class _Occ:
    """Group units in one space: unit ``u`` of model ``m`` covers key positions ``bases[m] + u*width + [0, width)``."""

    key: Layout
    gids: tuple[int, ...]
    bases: tuple[int, ...]
    size: int
    width: int
    inner: tuple[tuple[Layout, ...], ...] | None = (
        None  # per model, the layout inside each unit (with groups)
    )
    unit: int = 1  # key positions per position of the inner layouts


@dataclass
class _Decision:
    matching: Matching  # over ``size`` units per model
    gids: tuple[int, ...]  # model m's group in this merged group
    one_to_one: bool

    def perm(self, m: int) -> list[int]:
        """Merged unit k <- unit ``perm[k]`` of model m."""
        return self.matching.unmerge[m].argmax(dim=0).tolist()


class _Solver:
    def __init__(self, keys: list[Layout], spaces: dict[Layout, Space], sims: dict[Layout, torch.Tensor], n: int,
                 opts) -> None:  # fmt: skip
        self.keys = keys
        self.spaces = spaces
        self.n = n
        self.opts = opts
        self.sims = {k: sims[k].detach().to("cpu", torch.float64).numpy() for k in keys if k in sims}
        self.dec: list[dict[int, _Decision]] = [{} for _ in range(n)]

    # ------------------------------------------------------------------ walking
    def walk(self, key: Layout, lays, inner, bases, unit: int, occ: list[_Occ], blocked: set[int]) -> None:
        """Collect occurrences of undecided groups in the span ``lays`` (one layout per model)."""
        lay0 = lays[0]
        n = self.n
        w = unit if inner is None else inner[0][0].size * unit
        if isinstance(lay0, LFixed):
            if inner is not None:
                for q in range(lay0.size):
                    self.walk(key, [inner[m][q] for m in range(n)], None, [bases[m] + q * w for m in range(n)], unit,
                              occ, blocked)  # fmt: skip
        elif isinstance(lay0, G):
            gids = tuple(lay.gid for lay in lays)
            decided = [self.dec[m].get(gids[m]) for m in range(n)]
            has_inner = inner is not None and any(groups_in(i) for lay_in in inner for i in lay_in)
            if all(d is not None for d in decided):
                if has_inner:
                    perms = [decided[m].perm(m) for m in range(n)]
                    for k in range(lay0.size):
                        src = [p[k] for p in perms]
                        self.walk(key, [inner[m][src[m]] for m in range(n)], None,
                                  [bases[m] + src[m] * w for m in range(n)], unit, occ, blocked)  # fmt: skip
                return
            if has_inner:
                occ.append(_Occ(key, gids, tuple(bases), lay0.size, w, tuple(tuple(i) for i in inner), unit))
                blocked.update(g for lay_in in inner for i in lay_in for g in groups_in(i))
            else:
                occ.append(_Occ(key, gids, tuple(bases), lay0.size, w))
        elif isinstance(lay0, Cat):
            off = 0
            for j, part in enumerate(lay0.parts):
                sub = None if inner is None else [inner[m][off : off + part.size] for m in range(n)]
                self.walk(key, [lay.parts[j] for lay in lays], sub, [bases[m] + off * w for m in range(n)], unit,
                          occ, blocked)  # fmt: skip
                off += part.size
        elif isinstance(lay0, Prod):
            self.walk(key, [lay.outer for lay in lays], _inner_of(lays, inner), bases, unit, occ, blocked)

    # ------------------------------------------------------------------ solving
    def solve(self) -> None:
        for _ in range(64):
            occ: list[_Occ] = []
            blocked: set[int] = set()
            for key in self.keys:
                if key in self.sims:
                    self.walk(key, [key] * self.n, None, [0] * self.n, 1, occ, blocked)
            if not occ:
                return
            ready = [o for o in occ if o.gids[0] not in blocked]
            for anchor, group in _by_anchor(ready or occ).items():
                self.decide(anchor, group)
        raise MergeError("the merge spaces' block layouts nest deeper than 64 levels")

    def decide(self, anchor: int, occs: list[_Occ]) -> None:
        gids = occs[0].gids
        if any(o.gids != gids for o in occs) or any(
            gid in self.dec[m] for m, gid in enumerate(gids)
        ):  # a model's group would join two merged groups
            raise MergeError(
                f"group g{anchor} sits in blocks that move inconsistently across the merge spaces"
            )
        size, n = occs[0].size, self.n
        if any(o.inner is not None for o in occs):
            mt = self._align_outer(occs, size)
            d = _Decision(mt, gids, True)
        else:
            sim = torch.as_tensor(self._leaf_sim(occs, size))
            if self.opts.matcher == "zip":
                r = self.opts.r if self.opts.r is not None else 1.0 - 1.0 / n
                mt = zip_match(sim, [size] * n, r=r, alpha=self.opts.zip_alpha, beta=self.opts.zip_beta)
            else:
                mt = align(sim, [size] * n)
            d = _Decision(mt, gids, mt.width == size and self.opts.matcher != "zip")
        for m, gid in enumerate(gids):
            self.dec[m][gid] = d

    def _leaf_sim(self, occs: list[_Occ], size: int) -> np.ndarray:
        """Mean over occurrences (and over the fixed positions inside a unit) of the stacked similarity."""
        n = self.n
        total = np.zeros((n * size, n * size))
        count = 0
        for o in occs:
            s = self.sims[o.key]
            p = self.spaces[o.key].size
            for j in range(o.width):
                idx = np.concatenate([m * p + o.bases[m] + np.arange(size) * o.width + j for m in range(n)])
                total += s[np.ix_(idx, idx)]
                count += 1
        return total / count

    def _align_outer(self, occs: list[_Occ], size: int) -> Matching:
        """One-to-one block assignment of every model onto the anchor, on tile scores."""
        n = self.n
        columns = np.full(n * size, -1, dtype=np.int64)
        columns[:size] = np.arange(size)
        values = []
        for m in range(1, n):
            score = np.zeros((size, size))
            for o in occs:
                s = self.sims[o.key]
                p = self.spaces[o.key].size
                for u in range(size):
                    r0 = o.bases[0] + u * o.width
                    for v in range(size):
                        c0 = m * p + o.bases[m] + v * o.width
                        tile = s[r0 : r0 + o.width, c0 : c0 + o.width]
                        if o.inner is None:
                            score[u, v] += np.diagonal(tile).mean()
                        else:
                            score[u, v] += _best(o.inner[0][u], o.inner[m][v], tile, o.unit)
            score /= len(occs)
            rows, cols = hungarian(score)
            columns[m * size + cols] = rows
            values.append(float(score[rows, cols].mean()))
        return Matching.from_columns(columns, [size] * n, size, float(np.mean(values)), dtype=torch.float64,
                                     device=torch.device("cpu"))  # fmt: skip

    # ------------------------------------------------------------------ composing
    def compose(self, lays, inner, unit: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per model, unmerge [P, K] and merge [K, P] matrices of the span ``lays`` (P key positions)."""
        lay0, n = lays[0], self.n
        w = unit if inner is None else inner[0][0].size * unit
        if isinstance(lay0, LFixed):
            if inner is None:
                eye = torch.eye(lay0.size * unit, dtype=torch.float64)
                return [eye] * n, [eye / n] * n
            parts = [self.compose([inner[m][q] for m in range(n)], None, unit) for q in range(lay0.size)]
            return _block_diag(parts, n)
        if isinstance(lay0, G):
            d = self._decision(lays)
            has_inner = inner is not None and any(groups_in(i) for lay_in in inner for i in lay_in)
            if not has_inner:
                eye = torch.eye(w, dtype=torch.float64)
                return ([torch.kron(d.matching.unmerge[m].double(), eye) for m in range(n)],
                        [torch.kron(d.matching.merge[m].double(), eye) for m in range(n)])  # fmt: skip
            if not d.one_to_one:
                raise MergeError(
                    f"group g{lay0.gid} holds blocks with groups inside but was zipped; blocks move whole"
                )
            src = [d.perm(m) for m in range(n)]
            subs = [
                self.compose([inner[m][src[m][k]] for m in range(n)], None, unit) for k in range(lay0.size)
            ]
            widths = [s[0][0].shape[1] for s in subs]
            offs = np.concatenate([[0], np.cumsum(widths)])
            un = [torch.zeros(lay0.size * w, int(offs[-1]), dtype=torch.float64) for _ in range(n)]
            me = [torch.zeros(int(offs[-1]), lay0.size * w, dtype=torch.float64) for _ in range(n)]
            for k, (u_k, m_k) in enumerate(subs):
                for m in range(n):
                    b = src[m][k] * w
                    un[m][b : b + w, offs[k] : offs[k + 1]] = u_k[m]
                    me[m][offs[k] : offs[k + 1], b : b + w] = m_k[m]
            return un, me
        if isinstance(lay0, Cat):
            parts, off = [], 0
            for j, part in enumerate(lay0.parts):
                sub = None if inner is None else [inner[m][off : off + part.size] for m in range(n)]
                parts.append(self.compose([lay.parts[j] for lay in lays], sub, unit))
                off += part.size
            return _block_diag(parts, n)
        assert isinstance(lay0, Prod)
        return self.compose([lay.outer for lay in lays], _inner_of(lays, inner), unit)

    def _decision(self, lays) -> _Decision:
        gids = tuple(lay.gid for lay in lays)
        d = self.dec[0].get(gids[0])
        if d is None:  # never reached (a partial family): identity
            eye = torch.eye(lays[0].size, dtype=torch.float64)
            d = _Decision(
                Matching([eye / self.n] * self.n, [eye.clone() for _ in range(self.n)], 1.0), gids, True
            )
            for m, gid in enumerate(gids):
                self.dec[m].setdefault(gid, d)
        if any(self.dec[m].get(gid) is not d for m, gid in enumerate(gids)):
            raise MergeError(
                f"group g{gids[0]} sits in blocks that move inconsistently across the merge spaces"
            )
        return d

    def matchings(self) -> dict[Layout, Matching]:
        out: dict[Layout, Matching] = {}
        for key in self.keys:
            un, me = self.compose([key] * self.n, None, 1)
            value = matched_similarity(torch.as_tensor(self.sims[key]), un) if key in self.sims else 1.0
            out[key] = Matching(me, un, 0.0 if value != value else value)
        return out

    def group_matchings(self) -> dict[Layout, Matching]:
        """Matchings of the groups every model holds under the same id (usable on any axis of that group)."""
        out: dict[Layout, Matching] = {}
        for gid, d in self.dec[0].items():
            if all(g == gid for g in d.gids):
                out[G(gid, d.matching.sizes[0])] = d.matching
        return out


def _inner_of(lays, inner):
    """The per-position inner layouts of ``Prod`` spans ``lays`` seen through their outer layouts."""
    if inner is None:
        return [list(lay.inners) for lay in lays]
    out = []
    for m, lay in enumerate(lays):
        c = lay.inners[0].size
        out.append([Prod(lay.inners[b], tuple(inner[m][b * c : (b + 1) * c])) for b in range(lay.outer.size)])
    return out


def _by_anchor(occs: list[_Occ]) -> dict[int, list[_Occ]]:
    out: dict[int, list[_Occ]] = {}
    for o in occs:
        out.setdefault(o.gids[0], []).append(o)
    return out


def _block_diag(parts, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([torch.block_diag(*[p[0][m] for p in parts]) for m in range(n)],
            [torch.block_diag(*[p[1][m] for p in parts]) for m in range(n)])  # fmt: skip


def _unit_mean(tile: np.ndarray, unit: int) -> np.ndarray:
    """[a*unit, b*unit] -> [a, b]: the mean over the diagonal of every unit x unit block."""
    if unit == 1:
        return tile
    a, b = tile.shape[0] // unit, tile.shape[1] // unit
    return np.einsum("ijkj->ik", tile.reshape(a, unit, b, unit)) / unit


def _best(la: Layout, lb: Layout, tile: np.ndarray, unit: int) -> float:
    """Mean similarity of the best structure-respecting matching of layout ``lb``'s positions onto ``la``'s on
    ``tile`` ([la.size*unit, lb.size*unit]); fixed positions are compared in place, groups matched freely
    (a relaxation: a group occurring twice is matched twice)."""
    free = bool(groups_in(la) or groups_in(lb))
    if not free:
        return float(np.diagonal(tile).mean())
    if (
        isinstance(la, Cat)
        and isinstance(lb, Cat)
        and [p.size for p in la.parts] == [p.size for p in lb.parts]
    ):
        total, off = 0.0, 0
        for pa, pb in zip(la.parts, lb.parts, strict=True):
            span = pa.size * unit
            total += _best(pa, pb, tile[off : off + span, off : off + span], unit) * pa.size
            off += span
        return total / la.size
    if (
        isinstance(la, Prod)
        and isinstance(lb, Prod)
        and la.outer.size == lb.outer.size
        and la.size == lb.size
    ):
        c, blocks = la.inners[0].size, la.outer.size
        span = c * unit
        scores = np.empty((blocks, blocks))
        for i in range(blocks):
            for j in range(blocks):
                sub = tile[i * span : (i + 1) * span, j * span : (j + 1) * span]
                scores[i, j] = _best(la.inners[i], lb.inners[j], sub, unit)
        return _best(la.outer, lb.outer, scores, 1)
    agg = _unit_mean(tile, unit)
    rows, cols = hungarian(agg)
    return float(agg[rows, cols].mean())


def solve_family(
    keys: list[Layout], spaces: dict[Layout, Space], sims: dict[Layout, torch.Tensor], n: int, opts
) -> dict[Layout, Matching]:
    """Matchings of every space in ``keys`` (one family), consistent on every shared group; also the matchings
    of the family's groups under ``G(gid, size)`` keys, for axes that hold one such group alone."""
    solver = _Solver(keys, spaces, sims, n, opts)
    solver.solve()
    return {**solver.group_matchings(), **solver.matchings()}
