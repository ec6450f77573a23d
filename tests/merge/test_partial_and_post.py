"""Partial zipping (multi-head result), REPAIR, the similarity report and a JSON-loaded spec driving a merge.

References: the unpermuted model (a merge of a model with its permuted copy must reproduce it, also through
the cut), each parent model (a cut before the first layer keeps both models exactly), and direct statistics
of the parents' aligned activations (REPAIR targets).
"""

from __future__ import annotations

import pytest
import torch

import fxmerge
from fxmerge.testing import zoo

ATOL = 1e-9


def _double(name: str, seed: int = 0):
    model, inputs = zoo.build(name, seed)
    model = model.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    return model, inputs


def _data(inputs, n_batches: int = 4, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    x = inputs[0]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *x.shape[1:]), generator=g, dtype=x.dtype) for _ in range(n_batches)]


def _permuted(model, spec, seed: int = 1):
    return spec.apply(model, spec.random_perms(torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    ("name", "stop_at"),
    [("mlp", "fc3"), ("resnet20a", "layers"), ("vit_small", "encoder.layers.encoder_layer_1")],
)
def test_partial_zip_of_permuted_copy_gives_the_model_on_every_head(name, stop_at):
    model, inputs = _double(name)
    spec = fxmerge.infer_groups(model, inputs)
    other = _permuted(model, spec)
    res = fxmerge.merge([model, other], method="act_align", data=_data(inputs), example_inputs=inputs,
                        progress=False, reset_bn=False, stop_at=stop_at)  # fmt: skip
    outs = res.model(*inputs)
    ref = model(*inputs)
    assert isinstance(outs, tuple) and len(outs) == 2
    for out in outs:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert res.report["partial"]["stop_at"] == stop_at
    assert res.report["partial"]["crossing"]


@pytest.mark.parametrize("name", ["mlp", "resnet20a"])
def test_cut_before_the_first_layer_keeps_both_models(name):
    a, inputs = _double(name, 0)
    b, _ = _double(name, 1)
    first = next(n for n, _ in a.named_children())
    res = fxmerge.merge([a, b], method="zipit", data=_data(inputs), example_inputs=inputs, progress=False,
                        reset_bn=False, stop_at=first)  # fmt: skip
    out_a, out_b = res.model(*inputs)
    torch.testing.assert_close(out_a, a(*inputs), atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, b(*inputs), atol=ATOL, rtol=0)


def test_partial_zip_of_different_models_mixes_trunk_and_keeps_tails():
    a, inputs = _double("mlp", 0)
    b, _ = _double("mlp", 1)
    res = fxmerge.merge([a, b], method="zipit", data=_data(inputs), example_inputs=inputs, progress=False,
                        stop_at="out")  # fmt: skip
    trunk = res.model.trunk
    full = fxmerge.merge([a, b], method="zipit", data=_data(inputs), example_inputs=inputs, progress=False)
    for name, p in full.model.named_parameters():
        if not name.startswith("out."):
            torch.testing.assert_close(dict(trunk.named_parameters())[name], p, atol=ATOL, rtol=0)
    # each tail is its parent's own output layer
    torch.testing.assert_close(res.model.get_submodule("tails.1.out").weight, b.out.weight, atol=0, rtol=0)


def test_bad_stop_at_names_the_problem():
    a, inputs = _double("mlp")
    with pytest.raises(fxmerge.MergeError, match="stop_at='nope' names no module"):
        fxmerge.merge([a, a], method="average", example_inputs=inputs, stop_at="nope", progress=False)


def test_repair_matches_the_parents_interpolated_statistics():
    a, inputs = _double("mlp", 0)
    b, _ = _double("mlp", 1)
    data = _data(inputs, n_batches=4, batch=64)
    res = fxmerge.merge([a, b], method="act_align", data=data, example_inputs=inputs, progress=False,
                        repair=True)  # fmt: skip
    probes = res.report["post_passes"]["repair"]
    assert probes, "REPAIR found no producer layers"
    # the targets are the aligned parents' unit statistics; a permutation does not change their mean
    parents = (a, b)
    x = torch.cat(data)
    merged_std = _unit_std(res.model, probes[0], x)
    parent_std = [_unit_std(p, probes[0], x) for p in parents]
    # the first probe sees the same input in all models, so the mean std must match the parents' mean std
    assert merged_std.mean().item() == pytest.approx(sum(s.mean().item() for s in parent_std) / 2, rel=1e-6)


def _unit_std(model, module: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = model.get_submodule(module).register_forward_hook(lambda _m, _i, o: out.setdefault("y", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["y"].std(dim=0)


def test_repair_rejects_zip_matchers():
    a, inputs = _double("mlp")
    with pytest.raises(fxmerge.MergeError, match="one-to-one"):
        fxmerge.merge([a, a], method="zipit", data=_data(inputs), example_inputs=inputs, repair=True)


def test_similarity_report_improves_on_permuted_copy_and_details_match():
    model, inputs = _double("resnet20a")
    spec = fxmerge.infer_groups(model, inputs)
    res = fxmerge.merge([model, _permuted(model, spec)], method="act_align", data=_data(inputs),
                        example_inputs=inputs, progress=False, reset_bn=False)  # fmt: skip
    sims = res.report["similarity"]
    assert sims and set(sims) == set(res.details)
    for name, row in sims.items():
        assert row["after"] == pytest.approx(1.0, abs=1e-6), name  # every unit paired with its own copy
        assert row["before"] < row["after"]
        d = res.details[name]
        assert d.similarity.shape == (2 * d.size, 2 * d.size)


def test_json_roundtrip_spec_drives_an_activation_merge():
    model, inputs = _double("mlp")
    spec = fxmerge.infer_groups(model, inputs)
    loaded = fxmerge.PermutationSpec.from_json(spec.to_json())
    assert loaded.layout_probes == spec.layout_probes
    assert loaded.shapes == spec.shapes
    other = _permuted(model, spec)
    res = fxmerge.merge([model, other], method="act_align", data=_data(inputs), example_inputs=inputs,
                        spec=loaded, progress=False)  # fmt: skip
    torch.testing.assert_close(res.model(*inputs), model(*inputs), atol=ATOL, rtol=0)
