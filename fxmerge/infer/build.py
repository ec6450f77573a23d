"""Turn the solved constraints of a :class:`GraphInterpreter` into a :class:`PermutationSpec`."""

from __future__ import annotations

from fxmerge.infer.interpret import META_DIMS, GraphInterpreter
from fxmerge.ir.dims import Lvl
from fxmerge.ir.layout import Cat, G, Layout, LFixed, Prod
from fxmerge.ir.report import CoverageReport, FrozenAxis, UnsupportedRecord
from fxmerge.ir.solver import Solver
from fxmerge.ir.spec import Group, Member, PermutationSpec
from fxmerge.ir.terms import Atom, Bcast, Concat, Fixed, Product, Term


class _Resolver:
    """Maps solver terms to layouts, numbering free atom classes as groups in first-seen order."""

    def __init__(self, solver: Solver) -> None:
        self.s = solver
        self.gid_of: dict[int, int] = {}
        self.sizes: list[int] = []
        self.origins: list[str] = []

    def layout(self, t: Term, create: bool = True) -> Layout:
        h = self.s.head(t)
        if isinstance(h, Atom):
            if self.s.frozen_reason(h) is not None:
                return LFixed(h.size)
            root = self.s.find(h.id)
            if root not in self.gid_of and not create:
                return LFixed(h.size)
            if root not in self.gid_of:
                self.gid_of[root] = len(self.sizes)
                self.sizes.append(h.size)
                self.origins.append(self.s.origin.get(root, self.s.origin.get(h.id, "")))
            return G(self.gid_of[root], h.size)
        if isinstance(h, (Fixed, Bcast)):
            return LFixed(h.size)
        if isinstance(h, Concat):
            parts = tuple(self.layout(p, create) for p in h.parts)
            return LFixed(h.size) if all(isinstance(p, LFixed) for p in parts) else Cat(parts)
        assert isinstance(h, Product)
        memo: dict[int, Layout] = {}
        inners = []
        for x in h.inners:
            if id(x) not in memo:
                memo[id(x)] = self.layout(x, create)
            inners.append(memo[id(x)])
        outer = self.layout(h.outer, create)
        if isinstance(outer, LFixed) and all(isinstance(i, LFixed) for i in inners):
            return LFixed(h.size)
        return Prod(outer, tuple(inners))

    def reason(self, t: Term) -> str:
        h = self.s.head(t)
        if isinstance(h, Atom):
            return self.s.frozen_reason(h) or ""
        if isinstance(h, Fixed):
            return h.why or "fixed axis"
        if isinstance(h, Bcast):
            return "broadcast axis"
        kids = list(h.parts) if isinstance(h, Concat) else [h.outer, *h.inners[:1]]
        for k in kids:
            r = self.reason(k)
            if r:
                return r
        return ""


def build_spec(interp: GraphInterpreter) -> PermutationSpec:
    """Resolve every parameter/buffer axis into a layout and collect groups, probes and coverage."""
    res = _Resolver(interp.solver)
    cg = interp.cg
    axes: dict[str, list[Layout]] = {}
    frozen: list[FrozenAxis] = []
    cov = CoverageReport(frontend=cg.frontend)
    seen: set[int] = set()
    for name, t in cg.state.items():
        dims = interp.param_dims.get(id(t))
        if dims is None:
            continue
        layouts = [res.layout(d) for d in dims]
        axes[name] = layouts
        if id(t) in seen:
            continue
        seen.add(id(t))
        permutable = False
        for axis, (d, lay) in enumerate(zip(dims, layouts, strict=True)):
            if lay.size <= 1:
                continue
            cov.n_axes += 1
            if isinstance(lay, LFixed):
                frozen.append(FrozenAxis(name, axis, lay.size, res.reason(d)))
            else:
                cov.n_permutable_axes += 1
                permutable = True
        cov.n_params += 1
        cov.n_elements += t.numel()
        if permutable:
            cov.n_permutable_params += 1
            cov.n_permutable_elements += t.numel()
    groups = _groups(res, axes)
    cov.n_groups = len(groups)
    cov.frozen = frozen
    cov.unreached = [n for n, t in cg.state.items() if id(t) not in interp.used]
    cov.tied = [names for names in interp.names_of.values() if len(names) > 1]
    cov.unsupported = [
        UnsupportedRecord(u.target, u.node, u.module_path, u.source, tuple(u.params)) for u in interp.unsupported
    ]
    found = layout_probes(interp, res)
    probes = _probes(found, {g.id for g in groups})
    contracted = interp.ctx.contracted
    roles = {n: ["in" if (id(cg.state[n]), a) in contracted else "out" for a in range(len(lays))] for n, lays in axes.items()}
    spec = PermutationSpec(groups, axes, cov, probes, {n: tuple(cg.state[n].shape) for n in axes})
    spec.roles = roles
    spec.layout_probes = found
    interp.group_atoms = {gid: root for root, gid in res.gid_of.items()}
    spec.output_layouts = [dims_layouts(interp, res, dims) for dims in interp.output_dims]
    spec.output_floats = list(interp.output_floats)
    return spec


def _groups(res: _Resolver, axes: dict[str, list[Layout]]) -> list[Group]:
    used: dict[int, Group] = {}

    def visit(lay: Layout, name: str, axis: int, where: str) -> None:
        if isinstance(lay, G):
            g = used.setdefault(lay.gid, Group(lay.gid, lay.size, origin=res.origins[lay.gid]))
            g.members.append(Member(name, axis, where))
        elif isinstance(lay, Cat):
            off = 0
            for p in lay.parts:
                visit(p, name, axis, f"{where}[{off}:{off + p.size}]".strip())
                off += p.size
        elif isinstance(lay, Prod):
            visit(lay.outer, name, axis, f"{where} blocks of {lay.inners[0].size}".strip())
            first: dict[Layout, int] = {}
            for b, inner in enumerate(lay.inners):
                first.setdefault(inner, b)
            for inner, b in first.items():
                visit(inner, name, axis, f"{where} in block {b}".strip())

    for name, layouts in axes.items():
        for axis, lay in enumerate(layouts):
            visit(lay, name, axis, "")
    for layouts in axes.values():
        for lay in layouts:
            _mark_blocks(lay, used)
    ordered = sorted(used.values(), key=lambda g: g.id)
    assert [g.id for g in ordered] == list(range(len(ordered))), "group ids must be contiguous"
    return ordered


def _mark_blocks(lay: Layout, groups: dict[int, Group]) -> None:
    if isinstance(lay, Cat):
        for p in lay.parts:
            _mark_blocks(p, groups)
    elif isinstance(lay, Prod):
        if isinstance(lay.outer, G):
            outer = groups[lay.outer.gid]
            kids = [i.gid if isinstance(i, G) else None for i in lay.inners]
            if any(k is not None for k in kids) and outer.blocks is None:
                outer.blocks, outer.block_size = kids, lay.inners[0].size
                for b, k in enumerate(kids):
                    if k is not None and groups[k].parent is None:
                        groups[k].parent = (outer.id, b)
        _mark_blocks(lay.outer, groups)
        for i in dict.fromkeys(lay.inners):
            _mark_blocks(i, groups)


def _probes(found: list[tuple[str, tuple[int, ...], Layout]], valid: set[int]) -> dict[int, list[tuple[str, int]]]:
    out: dict[int, list[tuple[str, int]]] = {}
    for node_name, axes, lay in found:
        if isinstance(lay, G) and lay.gid in valid and len(axes) == 1:
            out.setdefault(lay.gid, []).append((node_name, axes[0]))
    return out


def layout_probes(interp: GraphInterpreter, res: _Resolver) -> list[tuple[str, tuple[int, ...], Layout]]:
    """(node, axes, layout) for every activation whose axes carry a group or a structured group layout."""
    found = []
    for node in interp.cg.gm.graph.nodes:
        dims = node.meta.get(META_DIMS)
        if not isinstance(dims, tuple) or node.op in ("placeholder", "get_attr", "output"):
            continue
        found.extend((node.name, axes, lay) for axes, lay in dims_layouts(interp, res, dims))
    return found


def dims_layouts(interp: GraphInterpreter, res: _Resolver, dims: tuple) -> list[tuple[tuple[int, ...], Layout]]:
    """(axes, layout) for the axes of one value that carry a group: single axes, and the axes of each joint (in
    level order) as one flattened layout."""
    found: list[tuple[tuple[int, ...], Layout]] = []
    joints: dict[int, list[tuple[int, int]]] = {}
    for axis, d in enumerate(dims):
        if isinstance(d, Lvl):
            joints.setdefault(id(d.joint), []).append((d.k, axis))
        elif d.size > 1 and not isinstance(interp.solver.head(d), (Fixed, Bcast)):
            lay = res.layout(d, create=False)
            if isinstance(lay, (G, Prod, Cat)):
                found.append(((axis,), lay))
    for levels in joints.values():
        levels.sort()
        j = next(d.joint for d in dims if isinstance(d, Lvl) and d.k == levels[0][0])
        lay = res.layout(j.root, create=False)
        if isinstance(lay, (G, Prod, Cat)):
            found.append((tuple(a for _, a in levels), lay))
    return found
