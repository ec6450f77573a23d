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
from fxmerge.errors import CaptureError, MergeError
from fxmerge.ir.layout import Layout
from fxmerge.ir.spec import PermutationSpec
from fxmerge.merge.spaces import Space, occurrences
from fxmerge.stats import CorrelationAccumulator
from fxmerge.stats.batches import feature_rows, iter_inputs

MAX_PROBES = 4


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


def probe_slices(spec: PermutationSpec, spaces: dict[Layout, Space]) -> dict[Layout, list[tuple[str, tuple, int, int]]]:
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
    out = {}
    for key, pts in cands.items():
        pts = list(dict.fromkeys(pts))
        if len(pts) > MAX_PROBES:
            step = (len(pts) - 1) / (MAX_PROBES - 1)
            pts = [pts[round(i * step)] for i in range(MAX_PROBES)]
        out[key] = pts
    return out


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
    """Pearson correlation over the stacked units of all models, per space with probe points."""
    probes = probe_slices(spec, spaces)
    keep = {node for pts in probes.values() for node, *_ in pts}
    frontend = spec.graph.frontend if spec.graph is not None else "auto"
    graphs = _GraphCache(models, example_inputs, frontend, keep)
    accs = {k: CorrelationAccumulator([spaces[k].size] * len(models)) for k in probes}
    gen = torch.Generator().manual_seed(seed)
    batches = iter_inputs(data)
    it = tqdm(batches, desc="activation statistics", disable=not progress, leave=False)
    with torch.no_grad(), _all_eval(models):
        for i, (args, kwargs) in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            _accumulate(graphs.get(args, kwargs), keep, probes, accs, args, kwargs, gen)
    if accs and all(acc.count == 0 for acc in accs.values()):
        raise MergeError("data produced no batches; pass a non-empty iterable of input batches (e.g. a DataLoader)")
    result = {}
    for k, acc in accs.items():
        acc.all_reduce()
        if acc.count > 1:
            result[k] = acc.correlation()
    return result


class _GraphCache:
    """Captured graphs of every model, per input-shape signature.

    fx graphs run at any batch size; ``torch.export`` graphs are specialised to the example shapes, so a
    batch of another shape (e.g. the last, smaller batch of a loader) gets its own capture.
    """

    def __init__(self, models: list[nn.Module], example_inputs: Any, frontend: str, keep: set[str]) -> None:
        self.models = models
        self.keep = keep
        self.frontend = frontend
        first = self._capture(example_inputs, frontend)
        self.frontend = first[0].frontend
        self.cache: dict[tuple, list[CapturedGraph]] = {}
        self.default = first

    def _capture(self, inputs: Any, frontend: str) -> list[CapturedGraph]:
        graphs = [capture(m, inputs, frontend) for m in self.models]
        for cg in graphs:
            if not self.keep <= {n.name for n in cg.gm.graph.nodes}:
                raise MergeError("models do not capture to the same graph; merge models of one architecture")
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


def _accumulate(graphs, keep, probes, accs, args, kwargs, gen) -> None:
    recs = []
    for cg in graphs:
        rec = _Recorder(cg.gm, keep)
        try:
            rec.run(*cg.placeholder_values(args, kwargs))
        except Exception as e:
            raise MergeError(f"a data batch does not fit the model: {type(e).__name__}: {str(e)[:200]}") from e
        recs.append(rec.values)
    for k, pts in probes.items():
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        size = accs[k].dims[0]
        for node, axis, offset, unit in pts:
            feats = []
            for values in recs:
                g = torch.Generator().manual_seed(seed)
                f = feature_rows(values[node], axis, g)[:, offset : offset + size * unit]
                feats.append(f.reshape(-1, size, unit).transpose(1, 2).reshape(-1, size))
            keep_rows = _regular_rows(feats, recs[0][node].dtype)
            if keep_rows is not None:
                feats = [f[keep_rows] for f in feats]
            if feats[0].shape[0]:
                accs[k].update(feats)


def _regular_rows(feats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """Rows (samples) without masking sentinels: values near the dtype's largest magnitude (an attention
    mask's ``finfo.min`` added to scores) carry no information and overflow second moments. None: all rows."""
    if not dtype.is_floating_point:
        return None
    limit = torch.finfo(dtype).max / 16
    bad = None
    for f in feats:
        rows = (f.abs() >= limit).any(dim=1)
        bad = rows if bad is None else bad | rows
    return None if bad is None or not bool(bad.any()) else ~bad
