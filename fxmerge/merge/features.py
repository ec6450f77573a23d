"""Activation statistics at every space's probe points, read from the captured graph (no hand-placed hooks).

For each model the captured graph is executed with an fx Interpreter that keeps the values of the probe
nodes only; their features are streamed into :class:`~fxmerge.stats.probes.SpaceStatistics` (one accumulator
per space, probe points centred each on its own mean), so memory is bounded by the space sizes, not by the data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxmerge.capture.trace import CapturedGraph, capture, eval_mode, model_state, split_inputs
from fxmerge.errors import CaptureError, MergeError
from fxmerge.ir.layout import Layout, groups_in
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.spaces import Space, occurrences
from fxmerge.stats.batches import iter_inputs
from fxmerge.stats.probes import Probe, SpaceStatistics

MAX_PROBES = 4


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the probe values: copies of those in ``copy`` (a later in-place op, e.g.
    ``ReLU(inplace=True)`` after a conv, would otherwise turn the recorded conv output into the activation's
    output), the others by reference with their version counters (shared by views), so that :meth:`mutated`
    can name the values an in-place op changed after they were recorded."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], copy: set[str]) -> None:
        super().__init__(gm)
        self.keep, self.copy = keep, copy
        self.values: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep and isinstance(out, torch.Tensor):
            if n.name in self.copy:
                self.values[n.name] = out.detach().clone()
            else:
                self.values[n.name] = out.detach()
                self.versions[n.name] = out._version
        return out

    def mutated(self) -> set[str]:
        """The values kept by reference that were modified in place after they were recorded."""
        return {name for name, v in self.versions.items() if self.values[name]._version != v}


def _spread(cands: dict) -> dict:
    """Per key: the distinct candidates, thinned to ``MAX_PROBES`` evenly spaced along the graph."""
    out = {}
    for key, pts in cands.items():
        pts = list(dict.fromkeys(pts))
        if len(pts) > MAX_PROBES:
            step = (len(pts) - 1) / (MAX_PROBES - 1)
            pts = [pts[round(i * step)] for i in range(MAX_PROBES)]
        out[key] = pts
    return out


def probe_points(spec: PermutationSpec, spaces: dict[Layout, Space]) -> dict[Layout, list[tuple[str, tuple]]]:
    """Up to ``MAX_PROBES`` evenly spaced (node, axes) activation points per space."""
    cands: dict[Layout, list[tuple[str, tuple]]] = {}
    for node, axes, lay in spec.layout_probes:
        if lay in spaces:
            cands.setdefault(lay, []).append((node, tuple(axes)))
    return _spread(cands)


def probe_slices(
    spec: PermutationSpec, spaces: dict[Layout, Space]
) -> dict[Layout, list[tuple[str, tuple, int, int]]]:
    """Up to ``MAX_PROBES`` evenly spaced activation points per space: ``(node, axes, offset, unit)``.

    A probe's layout may hold a space anywhere inside it (one part of a fused output, the heads of a
    ``[heads x head_dim]`` axis pair whose dims are fixed): position ``p`` of the space is then the columns
    ``offset + p*unit .. + unit`` of the probe's features, and the ``unit`` columns of a position are extra samples.
    """
    cands: dict[Layout, list[tuple[str, tuple, int, int]]] = {}
    for node, axes, lay in spec.layout_probes:
        for key, offset, unit in occurrences(lay):
            if key in spaces:
                cands.setdefault(key, []).append((node, tuple(axes), offset, unit))
    return _spread(cands)


def activation_correlations(
    models: list[nn.Module],
    spec: PermutationSpec,
    spaces: dict[Layout, Space],
    data: Any,
    example_inputs: Any,
    *,
    progress: bool = True,
    seed: int = 0,
    max_batches: int | None = None,
) -> dict[Layout, torch.Tensor]:
    """Pooled within-point Pearson correlation over the stacked units of all models, per space with probe
    points (:class:`~fxmerge.stats.probes.SpaceStatistics`)."""
    probes = {k: [Probe(*p) for p in pts] for k, pts in probe_slices(spec, spaces).items()}
    stats = SpaceStatistics(
        probes,
        {k: range(len(models)) for k in probes},
        {k: [spaces[k].size] * len(models) for k in probes},
        grouped_axes(spec),
        torch.Generator().manual_seed(seed),
    )
    keep = stats.nodes
    frontend = spec.graph.frontend if spec.graph is not None else "auto"
    graphs = _GraphCache(models, example_inputs, frontend, keep, spec.graph)
    batches = iter_inputs(data)
    it = tqdm(batches, desc="activation statistics", disable=not progress, leave=False)
    copies: dict[int, set[str]] = {}  # per graph, the kept nodes an in-place op modifies later
    with torch.no_grad(), _all_eval(models):
        for i, (args, kwargs) in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            stats.add(_record(graphs.get(args, kwargs), keep, args, kwargs, copies))
    if probes and stats.empty:
        raise MergeError(
            "data produced no batches; pass a non-empty iterable of input batches (e.g. a DataLoader)"
        )
    return stats.correlations()  # type: ignore[return-value]


class _GraphCache:
    """Captured graphs of every model, per input-shape signature.

    fx graphs run at any batch size; ``torch.export`` graphs are specialised to the example shapes, so a
    batch of another shape (e.g. the last, smaller batch of a loader) gets its own capture. An exported graph
    takes the parameters as inputs, so model 0's capture runs every model: each model gets it with its own
    parameters bound (one export per shape instead of one per model and shape).
    """

    def __init__(
        self, models: list[nn.Module], example_inputs: Any, frontend: str, keep: set[str],
        base: CapturedGraph | None = None,
    ) -> None:  # fmt: skip
        self.models = models
        self.keep = keep
        first = self._capture(example_inputs, frontend, base if _fits(base, example_inputs) else None)
        self.frontend = first[0].frontend
        self.cache: dict[tuple, list[CapturedGraph]] = {}
        self.default = first
        if self.frontend == "export":
            self.cache[_shape_key(split_inputs(example_inputs))] = first

    def _capture(self, inputs: Any, frontend: str, base: CapturedGraph | None = None) -> list[CapturedGraph]:
        first = capture(self.models[0], inputs, frontend) if base is None else None
        if first is None:  # the spec's own export of (a model like) model 0 at these shapes
            first = _rebind(
                base, self.models[0] if _captured_from(base, self.models[0]) else None, self.models[0]
            )
            if first is None:
                first = capture(self.models[0], inputs, frontend)
        graphs = [first]
        for m in self.models[1:]:
            cg = _rebind(first, self.models[0], m) if first.frontend == "export" else None
            graphs.append(cg if cg is not None else capture(m, inputs, first.frontend))
        for i, cg in enumerate(graphs):
            missing = sorted(self.keep - {n.name for n in cg.gm.graph.nodes})
            if missing:
                raise MergeError(
                    f"model {i} ({type(self.models[i]).__name__}) captures to a different graph than the one its "
                    f"spec was inferred from: it has no node {', '.join(missing[:3])}"
                    f"{' ...' if len(missing) > 3 else ''}. Merge models of one architecture; if they are, a model "
                    "holds state that changes its graph (e.g. a cache filled by an earlier forward in eval mode): "
                    "call model.train() then model.eval() on every model (that clears such caches in most "
                    "models), or build them fresh, before inferring the spec and merging."
                )
        return graphs

    def get(self, args: tuple, kwargs: dict) -> list[CapturedGraph]:
        if self.frontend == "fx":
            return self.default
        key = _shape_key((args, kwargs))
        if key not in self.cache:
            inputs = (*args, kwargs) if kwargs else args
            try:
                self.cache[key] = self._capture(inputs, "export")
            except CaptureError as e:
                raise MergeError(f"a data batch does not fit the model: {str(e)[:300]}") from e
        return self.cache[key]


def _rebind(cg: CapturedGraph, source: nn.Module | None, model: nn.Module) -> CapturedGraph | None:
    """``cg`` (exported from ``source``) running ``model``: its parameters and buffers bound in place of the
    source's. None when ``model`` lacks one of them (other shapes) or has other non-persistent buffers (those
    are baked into the graph as constants; with no ``source`` at hand, when it has any): then it is captured
    on its own."""
    state = model_state(model)
    for fqn in cg.bindings.values():
        if (
            fqn not in state
            or state[fqn].shape != cg.state[fqn].shape
            or state[fqn].dtype != cg.state[fqn].dtype
        ):
            return None
    ours = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n not in state}
    theirs = (
        {}
        if source is None
        else {n: b for n, b in source.named_buffers(remove_duplicate=False) if n not in state}
    )
    if source is None and ours:
        return None
    if any(name not in ours or not _same(buf, ours[name]) for name, buf in theirs.items()):
        return None
    return dataclasses.replace(cg, state=state)


def _captured_from(cg: CapturedGraph, model: nn.Module) -> bool:
    """Whether ``cg`` was captured from ``model`` itself (its bound tensors are the model's)."""
    state = model_state(model)
    return all(fqn in state and state[fqn].data_ptr() == t.data_ptr() for fqn, t in cg.state.items())


def _fits(cg: CapturedGraph | None, example_inputs: Any) -> bool:
    """Whether ``cg`` is an exported graph of these example inputs' structure, shapes and dtypes."""
    if cg is None or cg.frontend != "export":
        return False
    try:
        flat = cg.flat_inputs(*split_inputs(example_inputs))
    except Exception:
        return False
    nodes = {n.name: n for n in cg.gm.graph.nodes if n.op == "placeholder"}
    for name, value in flat.items():
        val = nodes[name].meta.get("val") if name in nodes else None
        if isinstance(value, torch.Tensor) != isinstance(val, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (
            tuple(val.shape) != tuple(value.shape) or val.dtype != value.dtype
        ):
            return False
    return True


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _shape_key(obj: Any) -> tuple:
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.dtype)
    if isinstance(obj, (tuple, list)):
        return tuple(_shape_key(x) for x in obj)
    if isinstance(obj, dict):
        return tuple((k, _shape_key(v)) for k, v in sorted(obj.items()))
    return (repr(obj),)


class _all_eval:
    """Every model in eval mode for the pass; train/eval flags restored afterwards."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.ctxs = [eval_mode(m) for m in models]

    def __enter__(self) -> None:
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in self.ctxs:
            c.__exit__(None, None, None)


def grouped_axes(spec: PermutationSpec) -> dict[str, set[int]]:
    """Per graph node, the axes of its value that carry a group."""
    out: dict[str, set[int]] = {}
    for node, axes, lay in spec.layout_probes:
        if groups_in(lay):
            out.setdefault(node, set()).update(axes)
    return out


def _record(
    graphs: list[CapturedGraph], keep: set[str], args: tuple, kwargs: dict, copies: dict[int, set[str]]
) -> list[dict[str, torch.Tensor]]:
    """Every model's values of the ``keep`` nodes on one batch.

    ``copies[id(graph.gm)]``: the kept nodes an in-place op modifies later in that graph, which are copied when
    recorded. Learnt on a graph's first batch: recorded without copies, and run again with copies of the
    values whose version counter moved (a captured graph's in-place ops are the same on every batch), so values
    are copied only where an in-place op follows them."""
    out = []
    for cg in graphs:
        known = copies.get(id(cg.gm))
        rec = _run_recorder(cg, keep, set() if known is None else known, args, kwargs)
        if known is None:
            copies[id(cg.gm)] = rec.mutated()
            if copies[id(cg.gm)]:
                rec = _run_recorder(cg, keep, copies[id(cg.gm)], args, kwargs)
        out.append(rec.values)
    return out


def _run_recorder(cg: CapturedGraph, keep: set[str], copy: set[str], args: tuple, kwargs: dict) -> _Recorder:
    rec = _Recorder(cg.gm, keep, copy)
    try:
        rec.run(*cg.placeholder_values(args, kwargs))
    except Exception as e:
        raise MergeError(f"a data batch does not fit the model: {type(e).__name__}: {str(e)[:200]}") from e
    return rec
