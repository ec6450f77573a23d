"""Block detection on a captured graph: the repeated units that depth alignment maps between models.

No architecture names are used. The graph is read as a data-flow DAG from the user inputs to the output:

1. **Cut points** are the nodes every input-to-output path passes through (no data edge jumps over them
   in topological order). Shape arithmetic (``x.shape``, sizes) is not data and is ignored.
2. The graph between consecutive cut points is a **segment**. A segment with a merge (a node with two
   or more data inputs) is *branchy*; one whose parameters contract an input axis (spec role ``"in"``:
   convolutions, linears) is a *contraction*. Both are **core** segments.
3. Every core segment starts an **atom**; the segments after it that keep the shape attach to it
   (activations, a norm after a contraction), shape-changing parameter-free ops (pooling, flatten)
   start the next atom, and parameter-carrying glue (class token, position embedding) joins the
   previous contraction.
4. **Blocks**: with residual atoms (branchy ones), the blocks are the atoms from the first to the last
   residual atom; consecutive residual atoms owned by the same module (pre-LN attention + MLP) form
   one block. Without residual atoms (plain nets) every atom but the last (the head) is a block.
   Atoms before the first block form the stem, those after the last the head.
5. A block is an **anchor** (pinned, starts a stage) when it is the first block, changes the
   per-sample shape (stride, channels, pooling), or is residual without an identity skip
   (projection shortcut, concatenation).

A user override (``blocks=[...]``) gives each block as one or more module-name prefixes; atoms are
regrouped accordingly.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from fxmerge.capture.trace import CapturedGraph, eval_mode, split_inputs
from fxmerge.errors import MergeError
from fxmerge.gate import require_sound
from fxmerge.hetero.graph import contains_tensor, node_params, node_reads, run_graph
from fxmerge.infer.api import infer_groups
from fxmerge.ir.spec import PermutationSpec

__all__ = ["Block", "BlockStructure", "find_blocks"]

Kind = Literal["residual", "layer"]
BlockOverride = Sequence[str | Sequence[str]]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")


@dataclass(frozen=True)
class Block:
    """One alignable unit of a model.

    Attributes:
        index: position among the model's blocks.
        stage: stage id; a stage starts at every anchor.
        kind: ``"residual"`` (output = skip + branch) or ``"layer"`` (plain chain).
        name: longest common module prefix of the block's parameters ("" when none).
        modules: modules owning the block's parameters, in first-use order.
        params: state names (parameters and buffers) read by the block, in first-use order.
        nodes: graph nodes of the block, in graph order.
        input: the cut-point node feeding the block.
        output: the block's output node (its value is the block representation used for CKA).
        anchor: the block is pinned across models (first of its stage).
        identity: a residual block whose skip is an identity path and whose shape is preserved, or a
            shape-preserving layer (a candidate for identity padding).
        branches: for residual blocks, the branch operand node of each residual add.
    """

    index: int
    stage: int
    kind: Kind
    name: str
    modules: tuple[str, ...]
    params: tuple[str, ...]
    nodes: tuple[str, ...]
    input: str
    output: str
    anchor: bool
    identity: bool
    branches: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockStructure:
    """Blocks of one model plus the stem/head parameters around them.

    Attributes:
        blocks: the blocks in graph order.
        stem: state names read before the first block, in first-use order.
        head: state names read after the last block, in first-use order.
        shapes: per-sample output shape of every tensor-valued node (batch axis dropped).
        graph: the captured graph the blocks refer to (node names).
    """

    blocks: tuple[Block, ...]
    stem: tuple[str, ...]
    head: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    graph: CapturedGraph = field(repr=False)

    @property
    def stages(self) -> tuple[int, ...]:
        """Number of blocks in each stage."""
        counts: list[int] = []
        for b in self.blocks:
            if b.stage == len(counts):
                counts.append(0)
            counts[-1] += 1
        return tuple(counts)

    @property
    def outputs(self) -> list[str]:
        """Output node of every block (the CKA probe points)."""
        return [b.output for b in self.blocks]

    def describe(self) -> str:
        """One line per block: index, stage, kind, anchor flag, name and modules."""
        lines = [
            f"{len(self.blocks)} blocks in stages {list(self.stages)}; stem {len(self.stem)} tensors, "
            f"head {len(self.head)} tensors"
        ]
        for b in self.blocks:
            flag = " anchor" if b.anchor else ""
            mods = ", ".join(b.modules[:4]) + (", ..." if len(b.modules) > 4 else "")
            lines.append(f"  block {b.index} (stage {b.stage}, {b.kind}{flag}) {b.name or '<root>'}: {mods}")
        return "\n".join(lines)


@dataclass
class _Segment:
    nodes: list[str]
    params: list[str]
    inp: str
    out: str
    branchy: bool = False
    contraction: bool = False
    reshape: bool = False
    skip_ok: bool = False
    branch: str | None = None

    @property
    def core(self) -> bool:
        return self.branchy or self.contraction

    @property
    def modules(self) -> list[str]:
        return _owners(self.params)


@dataclass
class _Atom:
    segs: list[_Segment]
    core: _Segment

    @property
    def residual(self) -> bool:
        return any(s.branchy for s in self.segs)

    @property
    def owner(self) -> str:
        return _common_prefix(self.core.modules)

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys(p for s in self.segs for p in s.params))

    @property
    def modules(self) -> list[str]:
        return _owners(self.params)


def _owners(params: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else "" for p in params))


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    if not parts:
        return ""
    out: list[str] = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def _under(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS or str(node.target).startswith("aten.add")
    return node.op == "call_method" and node.target in _ADD_METHODS


class _Flow:
    """The data-flow view of a captured graph: relevant nodes, data edges, positions and shapes."""

    def __init__(self, cg: CapturedGraph, values: dict[str, Any]) -> None:
        self.cg = cg
        self.nodes = list(cg.gm.graph.nodes)
        self.pos = {n.name: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        data = {n.name for n in self.nodes if n.op == "output" or contains_tensor(values.get(n.name))}
        self.inputs = {n.name: [a.name for a in n.all_input_nodes if a.name in data] for n in self.nodes
                       if n.name in data}  # fmt: skip
        sources = [n.name for n in self.nodes if n.op == "placeholder" and n.name in data
                   and n.name not in cg.bindings and n.name not in cg.constants]  # fmt: skip
        if not sources:
            raise MergeError("the captured graph has no tensor input: block detection needs a data input.")
        out_node = next(n.name for n in self.nodes if n.op == "output")
        self.relevant = self._reach(sources, forward=True) & self._reach([out_node], forward=False)
        self.sources = [s for s in sources if s in self.relevant]
        self.output = out_node
        self.shapes = {
            k: tuple(v.shape[1:]) for k, v in values.items() if isinstance(v, torch.Tensor) and v.dim()
        }

    def _reach(self, start: list[str], forward: bool) -> set[str]:
        nxt: dict[str, list[str]] = {k: [] for k in self.inputs}
        for k, ins in self.inputs.items():
            for a in ins:
                (nxt[a] if forward else nxt[k]).append(k if forward else a)
        seen, stack = set(start), list(start)
        while stack:
            for m in nxt.get(stack.pop(), []):
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
        return seen

    def rel_inputs(self, name: str) -> list[str]:
        return list(dict.fromkeys(a for a in self.inputs.get(name, []) if a in self.relevant))

    def cut_points(self) -> list[str]:
        """Relevant nodes (output node excluded) that no relevant data edge jumps over."""
        reach: dict[str, int] = {}
        for k in self.relevant:
            for a in self.rel_inputs(k):
                reach[a] = max(reach.get(a, -1), self.pos[k])
        cuts, running = [], -1
        for n in self.nodes:
            if n.name not in self.relevant:
                continue
            if running <= self.pos[n.name] and n.op != "output":
                cuts.append(n.name)
            running = max(running, reach.get(n.name, -1))
        return cuts


def _segments(flow: _Flow, spec: PermutationSpec) -> list[_Segment]:
    """Split the relevant nodes at the cut points; attach the other nodes to their first consumer."""
    cuts = flow.cut_points()
    seg_of: dict[str, int] = {}
    bounds = [flow.pos[c] for c in cuts]
    for n in flow.nodes:
        if n.name in flow.relevant and n.op != "output" and n.op != "placeholder":
            seg_of[n.name] = sum(1 for b in bounds if b < flow.pos[n.name])
    for n in reversed(flow.nodes):
        if n.name not in seg_of and n.name not in flow.relevant:
            users = [seg_of[u.name] for u in n.users if u.name in seg_of]
            if users:
                seg_of[n.name] = min(users)
    segs: list[_Segment] = []
    for i in range(len(cuts) + 1):
        members = [n.name for n in flow.nodes if seg_of.get(n.name) == i]
        rel = [m for m in members if m in flow.relevant]
        if not rel:
            continue
        params = list(dict.fromkeys(p for m in members for p in node_params(flow.cg, flow.by_name[m])))
        inp = cuts[i - 1] if i > 0 else flow.sources[0]
        segs.append(_classify(flow, spec, _Segment(members, params, inp, rel[-1])))
    return segs


def _classify(flow: _Flow, spec: PermutationSpec, seg: _Segment) -> _Segment:
    rel = [m for m in seg.nodes if m in flow.relevant]
    merges = [m for m in rel if len(flow.rel_inputs(m)) >= 2]
    seg.branchy = bool(merges)
    seg.contraction = any("in" in spec.roles.get(p, ()) for p in seg.params)
    seg.reshape = flow.shapes.get(seg.inp) != flow.shapes.get(seg.out)
    if merges and _is_add(flow.by_name[merges[-1]]):
        seg.skip_ok, seg.branch = _skip_and_branch(flow, seg, merges[-1])
    return seg


def _skip_and_branch(flow: _Flow, seg: _Segment, add: str) -> tuple[bool, str | None]:
    """Whether one operand of ``add`` is the segment input through parameter-free shape-keeping ops."""
    operands = flow.rel_inputs(add)
    if len(operands) != 2:
        return False, None
    reaches = [_reaches_input(flow, seg, o) for o in operands]
    if reaches.count(True) != 1:
        return False, None
    branch = operands[reaches.index(False)]
    return True, branch


def _reaches_input(flow: _Flow, seg: _Segment, node: str) -> bool:
    while node != seg.inp:
        ins = flow.rel_inputs(node)
        if (node not in seg.nodes or node_reads(flow.cg, flow.by_name[node]) or len(ins) != 1
                or flow.shapes.get(node) != flow.shapes.get(seg.inp)):  # fmt: skip
            return False
        node = ins[0]
    return True


def _attaches(atom: _Atom, seg: _Segment, cores: list[_Segment]) -> bool:
    """Whether a shape-keeping non-core segment belongs to the atom before it."""
    if not seg.params or not atom.residual:
        return True
    prefix = _common_prefix([atom.owner, *seg.modules])
    if not prefix:
        return False
    return not any(_under(m, prefix) for c in cores if c is not atom.core for m in c.modules)


def _atoms(segs: list[_Segment]) -> list[_Atom]:
    cores = [s for s in segs if s.core]
    atoms: list[_Atom] = []
    pending: list[_Segment] = []
    for seg in segs:
        if seg.core:
            if pending and atoms and not atoms[-1].residual and any(p.params for p in pending):
                atoms[-1].segs.extend(pending)
                pending = []
            atoms.append(_Atom([*pending, seg], seg))
            pending = []
        elif atoms and not pending and not seg.reshape and _attaches(atoms[-1], seg, cores):
            atoms[-1].segs.append(seg)
        else:
            pending.append(seg)
    if not atoms:
        raise MergeError("the model has no parameterised layer (no convolution, linear or residual block).")
    atoms[-1].segs.extend(pending)
    return atoms


def _auto_groups(atoms: list[_Atom]) -> tuple[int, int, list[list[_Atom]]]:
    """(first body atom, last body atom, body atoms grouped into blocks)."""
    residual = [i for i, a in enumerate(atoms) if a.residual]
    lo, hi = (residual[0], residual[-1]) if residual else (0, len(atoms) - 2)
    groups: list[list[_Atom]] = []
    for a in atoms[lo : hi + 1]:
        prev = groups[-1][-1] if groups else None
        if prev is not None and a.residual and prev.residual and a.owner and a.owner == prev.owner:
            groups[-1].append(a)
        else:
            groups.append([a])
    return lo, hi, groups


def _override_groups(atoms: list[_Atom], entries: BlockOverride) -> tuple[int, int, list[list[_Atom]]]:
    prefixes = [[e] if isinstance(e, str) else list(e) for e in entries]
    if not prefixes or any(not p or not all(isinstance(x, str) and x for x in p) for p in prefixes):
        raise MergeError(
            "blocks must be a non-empty list of module names (or lists of module names), one per block."
        )
    owner: list[int | None] = []
    for a in atoms:
        hits = {k for k, ps in enumerate(prefixes) for m in a.modules for p in ps if _under(m, p)}
        if len(hits) > 1:
            raise MergeError(
                f"modules {a.modules} match several block entries {sorted(hits)}; make the names disjoint."
            )
        owner.append(hits.pop() if hits else None)
    used = [i for i, k in enumerate(owner) if k is not None]
    missing = [prefixes[k] for k in range(len(prefixes)) if k not in owner]
    if missing:
        raise MergeError(f"no graph node uses parameters under the block module names {missing}.")
    lo, hi = used[0], used[-1]
    order = [owner[i] for i in used]
    if order != sorted(order):
        raise MergeError("the block module names must be listed in graph order.")
    groups: list[list[_Atom]] = []
    last: int | None = None
    for i in range(lo, hi + 1):
        k = owner[i]
        if k is None and atoms[i].params:
            raise MergeError(
                f"modules {atoms[i].modules} lie between the given blocks but belong to none of them."
            )
        if k is None or k == last:
            groups[-1].append(atoms[i])
        else:
            groups.append([atoms[i]])
            last = k
    return lo, hi, groups


def _block(index: int, atoms: list[_Atom], flow: _Flow) -> Block:
    segs = [s for a in atoms for s in a.segs]
    params = list(dict.fromkeys(p for s in segs for p in s.params))
    residual = any(a.residual for a in atoms)
    inp, out = segs[0].inp, segs[-1].out
    same_shape = flow.shapes.get(inp) == flow.shapes.get(out)
    identity = same_shape and (all(s.skip_ok for s in segs if s.branchy) if residual else True)
    nodes = sorted({n for s in segs for n in s.nodes}, key=flow.pos.__getitem__)
    branches = tuple(s.branch for s in segs if s.branchy and s.branch is not None)
    modules = _owners(params)
    return Block(index, 0, "residual" if residual else "layer", _common_prefix(modules), tuple(modules),
                 tuple(params), tuple(nodes), inp, out, anchor=index == 0 or not identity, identity=identity,
                 branches=branches)  # fmt: skip


def _with_stages(blocks: list[Block]) -> tuple[Block, ...]:
    out, stage = [], -1
    for b in blocks:
        stage += 1 if b.anchor else 0
        out.append(Block(b.index, stage, b.kind, b.name, b.modules, b.params, b.nodes, b.input, b.output,
                         b.anchor, b.identity, b.branches))  # fmt: skip
    return tuple(out)


def find_blocks(
    model: nn.Module,
    example_inputs: Any,
    *,
    blocks: BlockOverride | None = None,
    spec: PermutationSpec | None = None,
    frontend: str = "auto",
) -> BlockStructure:
    """Detect the blocks, stages, stem and head of ``model`` from its captured graph.

    Args:
        model: the model (left unchanged).
        example_inputs: inputs for one forward pass (any form :func:`fxmerge.capture` accepts).
        blocks: optional override, one entry per block: a module name, or a list of module names,
            whose parameters make up the block (e.g. ``["layer1.0", "layer1.1", ...]``).
        spec: the model's spec from :func:`fxmerge.infer_groups` (inferred when omitted); its
            graph is the one analysed, so node names match the spec's probes.
        frontend: capture frontend when the spec is inferred here.

    Returns:
        A :class:`BlockStructure`.

    Raises:
        MergeError: when the model has no block, or the override does not fit the graph.
    """
    if spec is None:
        spec = infer_groups(model, example_inputs, frontend=frontend)
    else:
        require_sound(model, spec, example_inputs, what="find_blocks")
    cg = spec.graph
    if cg is None:
        raise MergeError(
            "the spec has no captured graph; infer it with fxmerge.infer_groups(model, example_inputs)."
        )
    args, kwargs = split_inputs(example_inputs)
    with eval_mode(cg.gm):
        values = run_graph(cg, args, kwargs)
    flow = _Flow(cg, values)
    atoms = _atoms(_segments(flow, spec))
    lo, hi, groups = _auto_groups(atoms) if blocks is None else _override_groups(atoms, blocks)
    if not groups:
        raise MergeError(
            "no block found: the model has a single layer; depth alignment needs repeated blocks."
        )
    found = _with_stages([_block(i, g, flow) for i, g in enumerate(groups)])
    stem = list(dict.fromkeys(p for a in atoms[:lo] for p in a.params))
    head = list(dict.fromkeys(p for a in atoms[hi + 1 :] for p in a.params))
    return BlockStructure(found, tuple(stem), tuple(head), flow.shapes, cg)
