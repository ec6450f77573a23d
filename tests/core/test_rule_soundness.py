"""Soundness of each rule family by construction: specs inferred with the gate OFF must already be symmetries.

Each model isolates one mechanism that once produced unsound groups (view-split normalisations, functional
batch norm with keyword arguments, GQA through expand + reshape, per-head norms, barriers, value constants).
Weights are random and non-degenerate; the check is float64 random-permutation invariance. Structure
assertions make sure soundness is not bought by freezing everything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge
from fxmerge.infer.registry import RULES, RuleTable, rule
from fxmerge.ir.layout import G, LFixed, Prod, index


def _sound(model: nn.Module, x, **kw) -> fxmerge.PermutationSpec:
    model = model.double().eval()
    x = x.double() if isinstance(x, torch.Tensor) else x
    spec = fxmerge.infer_groups(model, x, verify=False, **kw)
    for seed in range(3):
        fxmerge.verify_invariance(model, spec, x, seed=seed)
    return spec


class ViewSplit(nn.Module):
    """A 16-wide hidden layer viewed as 4 x 4 and normalised along one factor."""

    def __init__(self, op) -> None:
        super().__init__()
        self.a, self.b, self.op = nn.Linear(6, 16), nn.Linear(16, 5), op

    def forward(self, x):
        h = self.a(x)
        return self.b(self.op(h.view(x.shape[0], 4, 4)).reshape(x.shape[0], 16))


INNER = {
    "softmax": lambda t: t.softmax(-1),
    "log_softmax": lambda t: F.log_softmax(t, dim=-1),
    "normalize": lambda t: F.normalize(t, dim=-1),
    "layer_norm": lambda t: F.layer_norm(t, (4,)),
    "rms_norm": lambda t: F.rms_norm(t, (4,)),
    "mean_centre": lambda t: t - t.mean(-1, keepdim=True),
    "std_scale": lambda t: t / t.std(-1, keepdim=True),
    "logsumexp": lambda t: t - torch.logsumexp(t, -1, keepdim=True),
    "max_values": lambda t: t - t.max(dim=-1, keepdim=True).values,
}
OUTER = {
    "softmax": lambda t: t.softmax(1),
    "normalize": lambda t: F.normalize(t, dim=1),
    "cumsum": lambda t: t.cumsum(1),
    "mean_centre": lambda t: t - t.mean(1, keepdim=True),
}


@pytest.mark.parametrize("name", sorted(INNER))
def test_normalising_the_inner_factor_gives_blocks(name):
    spec = _sound(ViewSplit(INNER[name]), torch.randn(5, 6))
    lay = spec.axes["a.weight"][0]
    assert isinstance(lay, Prod) and lay.outer.size == 4  # 4 blocks of 4, blocks permutable
    assert all(isinstance(i, G) for i in lay.inners)  # and each block permutable inside


@pytest.mark.parametrize("name", sorted(OUTER))
def test_normalising_the_outer_factor_shares_the_inner_permutation(name):
    spec = _sound(ViewSplit(OUTER[name]), torch.randn(5, 6))
    lay = spec.axes["a.weight"][0]
    if name == "cumsum":  # order matters along the outer factor: only the shared inner one is free
        assert isinstance(lay, Prod) and isinstance(lay.outer, LFixed)
    assert isinstance(lay, Prod) and len(set(lay.inners)) == 1 and isinstance(lay.inners[0], G)


def test_layer_norm_over_both_factors_keeps_one_free_group():
    spec = _sound(ViewSplit(lambda t: F.layer_norm(t, (4, 4))), torch.randn(5, 6))
    assert isinstance(spec.axes["a.weight"][0], G)


# ----------------------------------------------------------------------------------------- batch norm forms
class FunctionalBN(nn.BatchNorm2d):
    """timm's BatchNormAct2d style: ``F.batch_norm`` with weight/bias passed by keyword."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, weight=self.weight, bias=self.bias,
                            training=False, eps=self.eps)  # fmt: skip


class AtenOrderBN(nn.BatchNorm2d):
    """``torch.batch_norm`` takes (input, weight, bias, running_mean, running_var, ...)."""

    def forward(self, x):
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.1,
                                self.eps, False)  # fmt: skip


def _randomise_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


@pytest.mark.parametrize("bn", [FunctionalBN, AtenOrderBN], ids=["F.batch_norm-kwargs", "torch.batch_norm"])
def test_functional_batch_norm_binds_every_vector(bn):
    m = _randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3), bn(8), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    spec = _sound(m, torch.randn(2, 3, 9, 9))
    (g,) = [g for g in spec.groups if g.size == 8]
    members = {(mm.param, mm.axis) for mm in g.members}
    assert {("1.weight", 0), ("1.bias", 0), ("1.running_mean", 0), ("1.running_var", 0), ("0.weight", 0)} <= members


@pytest.mark.slow
def test_timm_batchnormact_model_is_sound():
    timm = pytest.importorskip("timm")
    m = _randomise_bn(timm.create_model("gernet_s", num_classes=5))
    spec = _sound(m, torch.randn(1, 3, 32, 32))
    assert spec.coverage.permutable_fraction > 0.95


# ------------------------------------------------------------------------------------------------ attention
class EagerGQA(nn.Module):
    """Eager attention with ``repeat_kv`` (expand + reshape), optional per-head q/k RMSNorm (Qwen3 style)."""

    def __init__(self, d=32, heads=8, kv=2, qk_norm=False, norm_weight=True) -> None:
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.q, self.k = nn.Linear(d, heads * self.hd), nn.Linear(d, kv * self.hd)
        self.v, self.o = nn.Linear(d, kv * self.hd), nn.Linear(heads * self.hd, d)
        self.qk_norm, self.norm_weight = qk_norm, norm_weight
        if qk_norm and norm_weight:
            self.qn, self.kn = nn.Parameter(torch.rand(self.hd) + 0.5), nn.Parameter(torch.rand(self.hd) + 0.5)

    def _repeat(self, t):
        b, kv, s, hd = t.shape
        rep = self.h // self.kv
        return t[:, :, None, :, :].expand(b, kv, rep, s, hd).reshape(b, kv * rep, s, hd)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.hd)
        k = self.k(x).view(b, s, self.kv, self.hd)
        if self.qk_norm:
            w = (self.qn, self.kn) if self.norm_weight else (None, None)
            q, k = F.rms_norm(q, (self.hd,), w[0]), F.rms_norm(k, (self.hd,), w[1])
        q, k = q.transpose(1, 2), self._repeat(k.transpose(1, 2))
        v = self._repeat(self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2))
        att = (q @ k.transpose(2, 3) / self.hd**0.5).softmax(-1)
        out = (att @ v).transpose(1, 2).reshape(b, s, self.h * self.hd)
        return self.o(out) + x


@pytest.mark.parametrize(
    "kw", [{}, {"qk_norm": True}, {"qk_norm": True, "norm_weight": False}, {"heads": 4, "kv": 4}],
    ids=["gqa", "gqa-qknorm", "gqa-qknorm-noweight", "mha"],
)  # fmt: skip
def test_eager_attention_keeps_query_heads_tied_to_the_output_projection(kw):
    spec = _sound(EagerGQA(**kw), torch.randn(2, 5, 32), free_outputs=False)
    heads, kv = kw.get("heads", 8), kw.get("kv", 2)
    hd = 32 // heads
    q_lay, o_lay = spec.axes["q.weight"][0], spec.axes["o.weight"][1]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # output projection columns follow the query heads exactly
        perms = spec.random_perms(gen)
        assert torch.equal(index(q_lay, perms)[::hd] // hd, index(o_lay, perms)[::hd] // hd)
    if kv != heads:  # query heads inside each kv group are permutable, independently per kv group
        rep = heads // kv
        inner = set()
        for g in spec.groups:
            perms = spec.identity_perms()
            perms[g.id] = torch.roll(perms[g.id], 1)
            moved = index(q_lay, perms)[::hd] // hd
            changed = [h for h in range(heads) if int(moved[h]) != h]
            if changed and all(int(moved[h]) // rep == h // rep for h in changed):
                inner.add(frozenset(h // rep for h in changed))
        assert inner == {frozenset({b}) for b in range(kv)}


# ------------------------------------------------------------------------------------------------- barriers
@torch.fx.wrap
def _opaque_mix(x):
    return x.roll(1, -1) * 2


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(_opaque_mix(torch.relu(self.a(x))))))


def test_op_without_rule_is_an_error_or_a_full_barrier():
    x = torch.randn(5, 4)
    with pytest.raises(fxmerge.UnsupportedOpsError, match="_opaque_mix"):
        fxmerge.infer_groups(Opaque(), x, frontend="fx")
    spec = _sound(Opaque(), x, frontend="fx", strict=False)
    frozen = {(f.param, f.axis): f.reason for f in spec.coverage.frozen}
    assert "unsupported op" in frozen[("a.weight", 0)] and "unsupported op" in frozen[("b.weight", 1)]
    assert [u.target.rsplit(".", 1)[-1] for u in spec.coverage.unsupported] == ["_opaque_mix"]
    assert any(g.size == 8 and {m.param for m in g.members} >= {"b.weight", "c.weight"} for g in spec.groups)


class Sampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        idx = torch.multinomial(h.softmax(-1), 1)
        return self.b(h) + idx


def test_value_reading_constants_freeze_their_source():
    spec = fxmerge.infer_groups(Sampler(), torch.randn(3, 4), frontend="fx", verify=False)
    frozen = {(f.param, f.axis): f.reason for f in spec.coverage.frozen}
    assert "reads values into a constant" in frozen[("a.weight", 0)]


# ------------------------------------------------------------------------------------------------- registry
def test_registering_a_second_rule_for_a_target_needs_replace():
    table = RuleTable()
    rule(torch.tanh, key="first", table=table)(lambda ctx, call: ctx.elementwise(call))
    with pytest.raises(ValueError, match=r"already has the rule 'first'.*replace=True"):
        rule(torch.tanh, key="second", table=table)(lambda ctx, call: ctx.elementwise(call))
    fn = rule(torch.tanh, key="second", table=table, replace=True)(lambda ctx, call: ctx.elementwise(call))
    assert table.lookup_function(torch.tanh).fn is fn


def test_builtin_table_has_one_rule_per_target():
    """Every built-in form maps to exactly one rule (registration would have raised otherwise)."""
    import fxmerge.infer.rules  # noqa: F401

    assert RULES.lookup_function(F.batch_norm).key == "batch_norm"
    assert RULES.lookup_function(torch.batch_norm).key == "batch_norm"
    assert RULES.lookup_function(F.embedding).fn is not RULES.lookup_function(torch.embedding).fn


# --------------------------------------------------------------------------------------- library ops by name
@torch.library.custom_op("fxmerge_test::double_it", mutates_args=())
def _double_it(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double_it.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.ops.fxmerge_test.double_it(self.a(x)))


def test_rule_registered_by_op_name_matches_the_library_op():
    table = RULES.copy()
    rule("fxmerge_test::double_it", key="double_it", table=table)(lambda ctx, call: ctx.elementwise(call))
    with pytest.raises(fxmerge.UnsupportedOpsError, match="double_it"):
        fxmerge.infer_groups(UsesCustomOp(), torch.randn(3, 4), frontend="export")
    spec = _sound(UsesCustomOp(), torch.randn(3, 4), frontend="export", rules=table)
    assert [g.size for g in spec.groups] == [8]


@pytest.mark.slow
def test_mixture_of_experts_grouped_matmul_is_permutable_and_sound():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else
                    torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)  # fmt: skip
    ids = {"input_ids": torch.randint(0, 64, (1, 8), generator=g)}
    spec = fxmerge.infer_groups(model, ids)  # strict: every op has a rule
    assert spec.verification is not None and not spec.verification.frozen
    assert spec.coverage.permutable_fraction > 0.9
    fxmerge.verify_invariance(model, spec, ids)


class NormArgForms(nn.Module):
    """Norm calls whose trailing arguments differ by form: rms_norm(x, shape, weight, eps) has no bias slot."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.w, self.bias = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.rand(8) - 0.5)

    def forward(self, x):
        h = F.rms_norm(self.a(x), (8,), self.w, 1e-6)
        h = F.layer_norm(h, (8,), weight=self.w, bias=self.bias)
        return self.b(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_norm_arguments_bound_by_form(frontend):
    spec = _sound(NormArgForms(), torch.randn(3, 4), frontend=frontend)
    (g,) = spec.groups
    assert {(m.param, m.axis) for m in g.members} >= {("w", 0), ("bias", 0), ("a.weight", 0), ("b.weight", 1)}


class Im2Col(nn.Module):
    """Unfold into patches (TNT / VOLO style), then a linear layer over the patch features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.lin = nn.Conv2d(3, 4, 1), nn.Linear(4 * 4, 5)

    def forward(self, x):
        patches = F.unfold(self.conv(x), kernel_size=2, stride=2)  # [N, 4*2*2, L]
        return self.lin(patches.transpose(1, 2))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unfold_keeps_channels_with_fixed_taps(frontend):
    spec = _sound(Im2Col(), torch.randn(2, 3, 6, 6), frontend=frontend)
    assert [g.size for g in spec.groups] == [4]


class GatedUnits(nn.Module):
    """GLU over the feature axis (module and functional forms) and over conv channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.glu, self.b = nn.Linear(6, 8), nn.GLU(), nn.Linear(4, 5)
        self.c, self.d = nn.Conv2d(3, 12, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x, y):
        return self.b(self.glu(self.a(x))), self.d(F.glu(self.c(y), dim=1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_glu_halves_share_one_permutation(frontend):
    spec = _sound(GatedUnits(), (torch.randn(3, 6).double(), torch.randn(2, 3, 4, 4).double()), frontend=frontend)
    assert sorted(g.size for g in spec.groups) == [4, 6]  # one group per gate, half the producer's width
    # the producer's rows are the two halves permuted alike: row i and row i + half move together
    m = GatedUnits().double()
    x = (torch.randn(3, 6).double(), torch.randn(2, 3, 4, 4).double())
    perm = torch.tensor([1, 0, 3, 2])
    bad = GatedUnits().double()
    bad.load_state_dict(m.state_dict())
    with torch.no_grad():  # permuting only the first half of the producer is NOT a symmetry: the check must see it
        bad.a.weight[:4] = bad.a.weight[:4][perm]
        bad.a.bias[:4] = bad.a.bias[:4][perm]
        bad.b.weight[:] = bad.b.weight[:, perm]
    assert not torch.allclose(bad(*x)[0], m(*x)[0])
