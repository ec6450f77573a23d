"""PermutationSpec: the permutation groups of a model and where each group lives in its parameters."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxmerge.clone import clone_module
from fxmerge.errors import SpecError
from fxmerge.ir.layout import G, Layout, describe, from_obj, groups_in, index, to_obj
from fxmerge.ir.report import CoverageReport


@dataclass(frozen=True)
class Member:
    """Group ``gid`` appears on axis ``axis`` of parameter/buffer ``param`` (``where`` locates it)."""

    param: str
    axis: int
    where: str


@dataclass
class Group:
    """One permutation group.

    ``parent`` is ``(outer_gid, block)`` for a group that permutes *inside* block ``block`` of a
    structured outer group (a head's dims, a GroupNorm group's channels); ``blocks`` lists, for an outer
    group, the inner group(s) of each block (``None`` where a block has no inner freedom).
    """

    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    origin: str = ""
    parent: tuple[int, int] | None = None
    blocks: list[int | None] | None = None
    block_size: int | None = None

    @property
    def kind(self) -> str:
        if self.blocks is not None:
            return "blocks"
        if self.parent is not None:
            return "inner"
        return "plain"


class PermutationSpec:
    """Groups plus, for every parameter/buffer, one layout per axis.

    ``apply(model, perms)`` permutes a copy of a model; ``random_perms(generator)`` draws a random
    permutation for every group; ``to_json``/``from_json`` round-trip the spec.
    """

    def __init__(
        self,
        groups: list[Group],
        axes: dict[str, list[Layout]],
        coverage: CoverageReport | None = None,
        probes: dict[int, list[tuple[str, int]]] | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.groups = groups
        self.axes = axes
        self.coverage = coverage or CoverageReport()
        self.probes = probes or {}
        self.shapes = shapes or {name: tuple(lay.size for lay in layouts) for name, layouts in axes.items()}
        self._by_id = {g.id: g for g in groups}
        self.graph: Any = None  # the CapturedGraph the spec was inferred from (not serialised)
        # "in" for axes a rule sums over (consumers, unmerged when zipping), "out" otherwise
        self.roles: dict[str, list[str]] = {n: ["out"] * len(lays) for n, lays in axes.items()}
        # (node, axes, layout) activation points, by node name of the graph the spec was inferred from
        self.layout_probes: list[tuple[str, tuple[int, ...], Layout]] = []
        # the soundness gate's record (fxmerge.gate.VerificationRecord) when infer_groups verified the spec
        self.verification: Any = None
        # per model output tensor (graph output order): (axes, layout) of axes left free by free_outputs=True
        self.output_layouts: list[list[tuple[tuple[int, ...], Layout]]] = []
        self.output_floats: list[bool] = []

    # ---------------------------------------------------------------- access
    def group(self, gid: int) -> Group:
        return self._by_id[gid]

    def __len__(self) -> int:
        return len(self.groups)

    def permutable_params(self) -> list[str]:
        return [n for n, lays in self.axes.items() if any(groups_in(lay) for lay in lays)]

    # --------------------------------------------------------------- perms
    def identity_perms(self) -> dict[int, torch.Tensor]:
        return {g.id: torch.arange(g.size) for g in self.groups}

    def random_perms(self, generator: torch.Generator, groups: list[int] | None = None) -> dict[int, torch.Tensor]:
        """A uniformly random permutation for each group (or the listed ones)."""
        ids = [g.id for g in self.groups] if groups is None else groups
        return {gid: torch.randperm(self._by_id[gid].size, generator=generator) for gid in ids}

    def check_perms(self, perms: dict[int, torch.Tensor]) -> None:
        for gid, p in perms.items():
            if gid not in self._by_id:
                raise SpecError(f"permutation given for group {gid}, but the spec has groups 0..{len(self.groups) - 1}")
            n = self._by_id[gid].size
            if p.numel() != n or not torch.equal(torch.sort(p.to(torch.long).cpu()).values, torch.arange(n)):
                raise SpecError(f"perms[{gid}] is not a permutation of range({n})")

    def axis_index(self, param: str, axis: int, perms: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Gather index for one axis, or None when the permutation leaves it unchanged."""
        lay = self.axes[param][axis]
        if not any(g in perms for g in groups_in(lay)):
            return None
        return index(lay, perms)

    def permute_tensor(self, name: str, t: torch.Tensor, perms: dict[int, torch.Tensor]) -> torch.Tensor:
        """``t`` (the value of parameter ``name``) with ``perms`` applied along every axis."""
        out = t
        for axis in range(t.ndim):
            idx = self.axis_index(name, axis, perms)
            if idx is not None:
                out = out.index_select(axis, idx.to(out.device))
        return out

    def apply(self, model: nn.Module, perms: dict[int, torch.Tensor], *, inplace: bool = False) -> nn.Module:
        """Return ``model`` (a copy unless ``inplace``) with ``perms`` applied to every group."""
        self.check_perms(perms)
        self.check_model(model)
        target = model if inplace else clone_module(model)
        state = _named_tensors(target)
        done: set[int] = set()
        with torch.no_grad():
            for name in self.axes:
                t = state.get(name)
                if t is None or id(t) in done:
                    continue
                done.add(id(t))
                t.copy_(self.permute_tensor(name, t, perms))
        return target

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`SpecError` if ``model`` does not have the parameters/shapes of this spec."""
        state = _named_tensors(model)
        missing = [n for n in self.axes if n not in state]
        wrong = [
            f"{n}: spec {self.shapes[n]} vs model {tuple(state[n].shape)}"
            for n in self.axes
            if n in state and tuple(state[n].shape) != tuple(self.shapes[n])
        ]
        if missing or wrong:
            detail = "; ".join([*(f"missing {m}" for m in missing[:5]), *wrong[:5]])
            raise SpecError(
                f"this spec was inferred for another model ({len(missing)} missing, {len(wrong)} with other shapes: "
                f"{detail}). Infer a spec for this model with fxmerge.infer_groups(model, example_inputs)."
            )

    # ------------------------------------------------------------ serialise
    def to_json(self, path: str | None = None, *, indent: int | None = 1) -> str:
        obj = {
            "version": 1,
            "groups": [_group_obj(g) for g in self.groups],
            "axes": {n: [to_obj(lay) for lay in lays] for n, lays in self.axes.items()},
            "probes": {str(k): v for k, v in self.probes.items()},
            "roles": self.roles,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "layout_probes": [[node, list(axes), to_obj(lay)] for node, axes, lay in self.layout_probes],
            "outputs": [
                {"float": f, "free": [[list(axes), to_obj(lay)] for axes, lay in lays]}
                for lays, f in zip(self.output_layouts, self.output_floats, strict=True)
            ],
            "coverage": self.coverage.to_obj(),
        }
        text = json.dumps(obj, indent=indent)
        if path is not None:
            _write_spec(Path(path), text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> PermutationSpec:
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        try:
            obj = json.loads(text)
            groups = [_group_from(g) for g in obj["groups"]]
            axes = {n: [from_obj(x) for x in lays] for n, lays in obj["axes"].items()}
            shapes = {n: tuple(v) for n, v in obj.get("shapes", {}).items()}
            layout_probes = [(str(n), tuple(a), from_obj(x)) for n, a, x in obj.get("layout_probes", [])]
            outputs = [
                (bool(o["float"]), [(tuple(a), from_obj(x)) for a, x in o["free"]]) for o in obj.get("outputs", [])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"not a valid fxmerge PermutationSpec JSON: {e}") from e
        probes = {int(k): [tuple(x) for x in v] for k, v in obj.get("probes", {}).items()}
        cov = CoverageReport.from_obj(obj.get("coverage", {}))
        spec = cls(groups, axes, cov, probes, shapes or None)
        spec.roles.update(obj.get("roles", {}))
        spec.layout_probes = layout_probes
        spec.output_floats = [f for f, _ in outputs]
        spec.output_layouts = [lays for _, lays in outputs]
        return spec

    # ------------------------------------------------------------- display
    def summary(self, max_members: int = 4) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups"]
        for g in self.groups:
            extra = ""
            if g.blocks is not None:
                n_inner = len({b for b in g.blocks if b is not None})
                extra = f", {len(g.blocks)} blocks of {g.block_size} ({n_inner} inner groups)"
            elif g.parent is not None:
                extra = f", inside block {g.parent[1]} of g{g.parent[0]}"
            mem = ", ".join(f"{m.param}[{m.axis}]{'' if m.where == '' else ' ' + m.where}" for m in g.members[:max_members])
            more = f", +{len(g.members) - max_members} more" if len(g.members) > max_members else ""
            lines.append(f"  g{g.id}: size {g.size}{extra}: {mem}{more}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + str(self.coverage)

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.groups)} groups, {len(self.axes)} tensors)"

    def layout_str(self, name: str) -> str:
        return "(" + ", ".join(describe(lay) for lay in self.axes[name]) + ")"


def _is_spec_file(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"version", "groups", "axes"} <= set(obj)


def _write_spec(target: Path, text: str) -> None:
    """Atomic write; an existing file is replaced only if it is a spec fxmerge wrote."""
    from fxmerge.errors import OutputPathError
    from fxmerge.outputs import write_owned_file

    write_owned_file(target, lambda fh: fh.write(text.encode()), _is_spec_file, OutputPathError)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = b
    return out


def _group_obj(g: Group) -> dict[str, Any]:
    d = asdict(g)
    d["members"] = [[m.param, m.axis, m.where] for m in g.members]
    return d


def _group_from(d: dict[str, Any]) -> Group:
    return Group(
        id=int(d["id"]),
        size=int(d["size"]),
        members=[Member(p, int(a), w) for p, a, w in d.get("members", [])],
        origin=d.get("origin", ""),
        parent=tuple(d["parent"]) if d.get("parent") else None,
        blocks=d.get("blocks"),
        block_size=d.get("block_size"),
    )


def group_layouts(layout: Layout) -> list[G]:
    return [x for x in _walk(layout) if isinstance(x, G)]


def _walk(layout: Layout):
    yield layout
    for child in getattr(layout, "parts", ()):
        yield from _walk(child)
    if hasattr(layout, "outer"):
        yield from _walk(layout.outer)
        for i in dict.fromkeys(layout.inners):
            yield from _walk(i)
