"""Capture of real code: return_types named tuples under fx, auto's fallback to torch.export (and why it was
taken), keyword inputs capture switches off (KV caches), torchvision Swin and Hugging Face decoders under auto."""

from __future__ import annotations

import builtins
from typing import NamedTuple

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxmerge
from fxmerge.capture.trace import capture, capture_kwargs, split_inputs
from fxmerge.errors import CaptureError
from fxmerge.infer.registry import RULES, rule

# ----------------------------------------------------------------------------- named tuples under fx

_PATTERNS = {
    "max.values": lambda h: h.max(dim=1).values,
    "min.values": lambda h: h.min(dim=1).values,
    "torch.max.values": lambda h: torch.max(h, dim=1).values,
    "max[0]": lambda h: h.max(1)[0],
    "topk.values": lambda h: h.topk(2, dim=1).values,
    "sort.values": lambda h: h.sort(dim=1, descending=True).values,
    "cummax.values": lambda h: h.cummax(dim=1).values,
    "cummin.values": lambda h: torch.cummin(h, 1).values,
    "median.values": lambda h: h.median(dim=1).values,
    "kthvalue.values": lambda h: h.kthvalue(2, dim=1).values,
    "aminmax.max": lambda h: torch.aminmax(h, dim=1).max,
    "values*indices": lambda h: h.max(dim=1).values * h.max(dim=1).indices.to(h.dtype),
}


class _Pool(nn.Module):
    """Linear -> ReLU -> an op returning a torch.return_types named tuple along the token axis -> Linear."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.l1 = nn.Linear(6, 12)
        self.l2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(_PATTERNS[self.pattern](F.relu(self.l1(x))))


@pytest.mark.parametrize("pattern", list(_PATTERNS))
def test_named_tuple_fields_capture_under_fx_and_replay_exactly(pattern: str) -> None:
    torch.manual_seed(0)
    model = _Pool(pattern).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    cg = capture(model, x, "auto")
    assert cg.frontend == "fx" and cg.fallback_reason is None and cg.rejected == {}
    fields = {"values", "indices", "max"}  # field access became a tuple item access
    assert not any(n.target is builtins.getattr and n.args[1] in fields for n in cg.gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(cg.gm(x), model(x), rtol=0, atol=0)

    spec = fxmerge.infer_groups(model, x)
    assert spec.graph.frontend == "fx" and spec.coverage.frontend == "fx"
    assert [g.size for g in spec.groups] == [12]  # l1 rows = l2 columns: the pooled axis is the token axis
    assert spec.coverage.n_permutable_params == 3  # all but l2.bias (its only axis is the frozen output)
    fxmerge.verify_invariance(model, spec, x)


def test_named_tuple_along_the_feature_axis_freezes_it() -> None:
    """cummax/sort along the hidden axis depend on its order: no group, and the check still passes."""

    class _Along(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(6, 12), nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(F.relu(self.l1(x)).cummax(dim=-1).values)

    model, x = _Along().double(), torch.randn(2, 5, 6, dtype=torch.float64)
    spec = fxmerge.infer_groups(model, x)
    assert spec.graph.frontend == "fx" and spec.groups == []
    assert any("cummax" in f.reason for f in spec.coverage.frozen)


# ----------------------------------------------------------------------------- auto: fallback and its reason


def _opaque_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) * 2.0


def _opaque_branch(x: torch.Tensor) -> torch.Tensor:
    return x if bool(x.sum() > 0) else -x


torch.fx.wrap("_opaque_gelu")
torch.fx.wrap("_opaque_branch")


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.relu(self.l1(x)))


class _WrappedGelu(_MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(_opaque_gelu(self.l1(x)))


class _WrappedBranch(_MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(_opaque_branch(self.l1(x)))


class _ShapeBranch(_MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l1(x))
        if h.shape[0] > 1:  # fx: a proxy in control flow; export specialises on the shape
            h = h * 2
        return self.l2(h)


class _ValueBranch(_MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l1(x))
        if h.sum() > 0:  # data-dependent: neither frontend can capture it
            h = -h
        return self.l2(h)


class _Pair(NamedTuple):
    hi: torch.Tensor
    lo: torch.Tensor


class _Halves(nn.Module):
    def forward(self, x: torch.Tensor) -> _Pair:
        return _Pair(x[..., :4], x[..., 4:])


class _UsesHalves(_MLP):
    """A leaf module (it has a user rule) returning a named tuple: the fx graph fails on the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.halves = _Halves()
        self.l2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.halves(F.relu(self.l1(x)))
        return self.l2(p.hi) + self.l2(p.lo)


def _halves_table():
    table = RULES.copy()

    @rule(_Halves, table=table)
    def halves(ctx, call):  # conservative user rule: everything frozen
        ctx.freeze(call.arg(0, "x"), "halves")
        return [ctx.fixed(o.shape) for o in call.out]

    return table


def test_auto_falls_back_on_a_tracing_error() -> None:
    model, x = _ShapeBranch(), torch.randn(2, 6)
    cg = capture(model, x)
    assert cg.frontend == "export"
    assert cg.fallback_reason.startswith("torch.fx could not trace _ShapeBranch: TraceError")
    assert set(cg.rejected) == {"fx"}
    spec = fxmerge.infer_groups(model, x)
    assert (spec.graph.frontend, spec.coverage.frontend) == ("export", "export")
    assert spec.graph.fallback_reason == cg.fallback_reason and [g.size for g in spec.groups] == [8]
    fxmerge.verify_invariance(model, spec, x)
    with pytest.raises(CaptureError, match=r"torch\.fx could not trace _ShapeBranch"):
        capture(model, x, "fx")


def test_auto_falls_back_on_opaque_wrapped_functions() -> None:
    model, x = _WrappedGelu(), torch.randn(2, 6)
    fx_spec = fxmerge.infer_groups(model, x, frontend="fx", strict=False)  # fx cannot see into the helper
    assert fx_spec.groups == [] and [u.target for u in fx_spec.coverage.unsupported] == [f"{__name__}._opaque_gelu"]
    assert fx_spec.coverage.permutable_fraction == 0.0

    spec = fxmerge.infer_groups(model, x)  # strict: export sees F.gelu inside, which has a rule
    assert spec.graph.frontend == "export" and spec.coverage.unsupported == []
    assert "cannot see into" in spec.graph.fallback_reason and "_opaque_gelu" in spec.graph.fallback_reason
    assert [g.size for g in spec.groups] == [8] and spec.coverage.n_permutable_params == 3
    fxmerge.verify_invariance(model, spec, x)


def test_auto_keeps_fx_when_export_cannot_capture_the_opaque_function() -> None:
    model, x = _WrappedBranch(), torch.randn(2, 6)
    cg = capture(model, x)
    assert cg.frontend == "fx" and cg.fallback_reason is None
    assert "torch.export could not capture _WrappedBranch" in cg.rejected["export"]
    spec = fxmerge.infer_groups(model, x, strict=False)
    assert spec.graph.frontend == "fx" and "export" in spec.graph.rejected
    assert [u.target for u in spec.coverage.unsupported] == [f"{__name__}._opaque_branch"]


def test_auto_falls_back_when_the_fx_graph_fails_on_the_inputs() -> None:
    model, x, table = _UsesHalves(), torch.randn(2, 6), _halves_table()
    assert capture(model, x, rules=table).frontend == "fx"  # traces: the failure only shows when it runs
    spec = fxmerge.infer_groups(model, x, rules=table)
    assert spec.graph.frontend == "export"
    assert spec.graph.fallback_reason.startswith("running the fx graph of _UsesHalves on example_inputs failed: ")
    assert "AttributeError" in spec.graph.fallback_reason
    assert [g.size for g in spec.groups] == [4]  # export traces into _Halves; both halves feed the same l2
    fxmerge.verify_invariance(model, spec, x)
    with pytest.raises(CaptureError, match=r"model itself runs on these inputs, .*: use frontend='export'\."):
        fxmerge.infer_groups(model, x, frontend="fx", rules=table)


def test_both_failures_are_named() -> None:
    with pytest.raises(CaptureError) as info:
        fxmerge.infer_groups(_ValueBranch(), torch.randn(2, 6))
    message = str(info.value)
    assert message.startswith("neither frontend could capture _ValueBranch")
    assert "\n  fx: torch.fx could not trace _ValueBranch" in message
    assert "\n  export: torch.export could not capture _ValueBranch" in message


def test_inputs_are_blamed_only_when_the_model_fails_on_them() -> None:
    bad = torch.randn(2, 7)  # Linear(6, 8) cannot take it
    with pytest.raises(CaptureError, match="model itself fails on them too"):
        fxmerge.infer_groups(_MLP(), bad, frontend="fx")
    for frontend in ("auto", "export"):  # the model's own error, not two capture errors that hide it
        with pytest.raises(CaptureError) as info:
            fxmerge.infer_groups(_MLP(), bad, frontend=frontend)
        message = str(info.value)
        assert message.startswith("_MLP fails on example_inputs when called directly, before any capture: RuntimeError")
        assert "mat1 and mat2 shapes cannot be multiplied" in message and "neither frontend" not in message


# ----------------------------------------------------------------------------- keyword inputs (KV caches)


class _Cache:
    """State for a later call: not a tensor container torch.export knows."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _Cached(_MLP):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, use_cache: bool = True, **kwargs):
        y = self.l2(F.relu(self.l1(x)))
        return (y, _Cache(y)) if use_cache else (y,)


def test_capture_kwargs_only_when_forward_takes_them_and_the_call_leaves_them_unset() -> None:
    model, x = _Cached(), torch.randn(2, 6)
    assert capture_kwargs(model, (x,), {}) == {"use_cache": False}
    assert capture_kwargs(model, (x,), {"use_cache": True}) == {}
    assert capture_kwargs(model, (x, None, True), {}) == {}  # set positionally
    assert capture_kwargs(model, (x, None), {}) == {"use_cache": False}
    assert capture_kwargs(_MLP(), (x,), {}) == {}


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_cache_outputs_are_switched_off(frontend: str) -> None:
    torch.manual_seed(0)
    model, x = _Cached().double(), torch.randn(2, 6, dtype=torch.float64)
    cg = capture(model, x, frontend)
    assert cg.frontend == ("fx" if frontend == "auto" else frontend) and cg.call_kwargs == {"use_cache": False}
    out = cg.gm(x) if cg.frontend == "fx" else cg.gm(*cg.placeholder_values((x,), {}))
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(x)[0], rtol=0, atol=0)
    spec = fxmerge.infer_groups(model, x, frontend=frontend)
    assert [g.size for g in spec.groups] == [8]
    fxmerge.verify_invariance(model, spec, x)
    if frontend != "fx":  # the caller's own setting wins: the cache object then defeats export
        with pytest.raises(CaptureError, match=r"torch\.export could not capture _Cached"):
            capture(model, (x, {"use_cache": True}), "export")


# ----------------------------------------------------------------------------- real models under auto


def test_swin_t_under_auto_sees_through_the_wrapped_helpers() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = fxmerge.infer_groups(model, x, strict=False)
    assert spec.graph.frontend == "export" and spec.coverage.frontend == "export"
    assert "shifted_window_attention" in spec.graph.fallback_reason
    assert spec.coverage.unsupported == []
    assert spec.coverage.permutable_fraction >= 0.95  # fx with the opaque helpers as barriers: 0.627


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_decoder_with_its_default_cache_config(arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)  # fmt: skip
    assert config.use_cache  # the default: KV cache on
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 64, (2, 8))
    spec = fxmerge.infer_groups(model, ids, strict=False)
    cg = spec.graph
    assert cg.frontend == "export" and cg.call_kwargs == {"use_cache": False} and "fx" in cg.rejected
    assert spec.coverage.unsupported == [] and spec.coverage.permutable_fraction >= 0.9
    args, kwargs = split_inputs(ids)
    with torch.no_grad():
        torch.testing.assert_close(cg.gm(*cg.placeholder_values(args, kwargs))[0], model(ids).logits)
    fxmerge.verify_invariance(model, spec, ids)


class _ParamBranch(nn.Module):
    """Branches on one unit's parameter value: fx cannot trace it and export hits a data-dependent guard."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.a.bias[0] > 0:
            h = h * 2
        return self.b(h)


def test_a_failed_export_prints_nothing_of_its_own(capfd) -> None:
    with pytest.raises(CaptureError, match="neither frontend could capture _ParamBranch"):
        fxmerge.infer_groups(_ParamBranch(), torch.randn(5, 4))
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err  # torch's partial graph dump


class _CachesInForward(nn.Module):
    """Fills a cache attribute during its first eval forward (as LeViT's attention-bias cache does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            bias = self.bias * 2
            if not self.training:
                self.cache = bias.detach()
        else:
            bias = self.cache
        return self.b(torch.relu(self.a(x) + bias))


class _CachesInADict(_CachesInForward):
    """The LeViT form: the cache is a dict filled in place, keyed by device."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = {}

    def forward(self, x):
        if self.training or str(x.device) not in self.cache:
            bias = self.bias * 2
            if not self.training:
                self.cache[str(x.device)] = bias.detach()
        else:
            bias = self.cache[str(x.device)]
        return self.b(torch.relu(self.a(x) + bias))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("cls", [_CachesInForward, _CachesInADict])
def test_capture_leaves_no_trace_in_the_model(frontend, cls) -> None:
    model = cls()
    empty = model.cache
    fxmerge.infer_groups(model, torch.randn(5, 4), frontend=frontend, verify=False)
    assert model.cache is empty and not model.cache  # tracing put a proxy / fake tensor there; it is restored
    assert set(vars(model)) == set(vars(cls()))
    model.eval()(torch.randn(5, 4))  # and the model still runs
    assert model.cache is not None and len(model.cache if isinstance(model.cache, dict) else [1]) == 1


def test_the_gate_sees_a_stale_cache() -> None:
    """The check runs the model eagerly: its cache then holds the unpermuted bias, so the group is frozen."""
    with pytest.warns(fxmerge.UnsoundGroupWarning):
        spec = fxmerge.infer_groups(_CachesInForward(), torch.randn(5, 4), frontend="fx")
    assert spec.groups == [] or all(g.size != 8 for g in spec.groups)
