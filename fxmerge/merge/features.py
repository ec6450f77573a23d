"""Activation statistics at every space's probe points, read from the captured graph (no hand-placed hooks).

For each model the captured graph is executed with an fx Interpreter that keeps the values of the probe
nodes only; features are streamed into one :class:`~fxmerge.stats.CorrelationAccumulator` per space, so
memory is bounded by the space sizes, not by the data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxmerge.capture.trace import CapturedGraph, capture, eval_mode
from fxmerge.errors import MergeError
from fxmerge.ir.layout import Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.spaces import Space
from fxmerge.stats import CorrelationAccumulator
from fxmerge.stats.batches import iter_inputs

MAX_PROBES = 4
MAX_ROWS = 8192


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep and isinstance(out, torch.Tensor):
            self.values[n.name] = out
        return out


def probe_points(spec: PermutationSpec, spaces: dict[Layout, Space]) -> dict[Layout, list[tuple[str, tuple]]]:
    """Up to ``MAX_PROBES`` evenly spaced (node, axes) activation points per space."""
    cands: dict[Layout, list[tuple[str, tuple]]] = {}
    for node, axes, lay in spec.layout_probes:
        if lay in spaces:
            cands.setdefault(lay, []).append((node, tuple(axes)))
    out = {}
    for key, pts in cands.items():
        pts = list(dict.fromkeys(pts))
        if len(pts) > MAX_PROBES:
            step = (len(pts) - 1) / (MAX_PROBES - 1)
            pts = [pts[round(i * step)] for i in range(MAX_PROBES)]
        out[key] = pts
    return out


def _placeholder_values(cg: CapturedGraph, args: tuple, kwargs: dict) -> list[Any]:
    inputs = cg.flat_inputs(args, kwargs)
    values = []
    for n in cg.gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.name in cg.bindings:
            values.append(cg.state[cg.bindings[n.name]])
        elif n.name in cg.constants:
            values.append(cg.constants[n.name])
        else:
            values.append(inputs[n.name])
    return values


def _rows(t: torch.Tensor, axes: tuple, gen: torch.Generator) -> torch.Tensor:
    units = 1
    for a in axes:
        units *= t.shape[a]
    f = t.detach().movedim(tuple(axes), tuple(range(t.ndim - len(axes), t.ndim))).reshape(-1, units).double()
    if f.shape[0] > MAX_ROWS:
        f = f[torch.randperm(f.shape[0], generator=gen)[:MAX_ROWS].to(f.device)]
    return f


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
    """Pearson correlation over the stacked units of all models, per plain space with probe points."""
    probes = probe_points(spec, spaces)
    keep = {node for pts in probes.values() for node, _ in pts}
    frontend = spec.graph.frontend if spec.graph is not None else "auto"
    graphs = [capture(m, example_inputs, frontend) for m in models]
    for cg in graphs:
        names = {n.name for n in cg.gm.graph.nodes}
        if not keep <= names:
            raise MergeError("models do not capture to the same graph; merge models of one architecture")
    accs = {k: CorrelationAccumulator([spaces[k].size] * len(models)) for k in probes}
    gen = torch.Generator().manual_seed(seed)
    batches = iter_inputs(data)
    it = tqdm(batches, desc="activation statistics", disable=not progress, leave=False)
    with torch.no_grad():
        ctxs = [eval_mode(cg.gm) for cg in graphs]
        for c in ctxs:
            c.__enter__()
        try:
            for i, (args, kwargs) in enumerate(it):
                if max_batches is not None and i >= max_batches:
                    break
                _accumulate(graphs, keep, probes, accs, args, kwargs, gen)
        finally:
            for c in ctxs:
                c.__exit__(None, None, None)
    result = {}
    for k, acc in accs.items():
        acc.all_reduce()
        result[k] = acc.correlation()
    return result


def _accumulate(graphs, keep, probes, accs, args, kwargs, gen) -> None:
    recs = []
    for cg in graphs:
        rec = _Recorder(cg.gm, keep)
        try:
            rec.run(*_placeholder_values(cg, args, kwargs))
        except Exception as e:
            raise MergeError(f"a data batch does not fit the model: {type(e).__name__}: {str(e)[:200]}") from e
        recs.append(rec.values)
    for k, pts in probes.items():
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        for node, axis in pts:
            feats = []
            for values in recs:
                g = torch.Generator().manual_seed(seed)
                feats.append(_rows(values[node], axis, g))
            accs[k].update(feats)
