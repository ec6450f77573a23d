"""save_program/load_program and save_state/load_state round trips, tied weights and strict checks."""

from __future__ import annotations

import json

import pytest
import torch
from export_test_models import MLP, SignBranch, SmallResCNN, TiedLM, build_tied_lm, reinit_
from safetensors import safe_open

from fxmerge.errors import ExportError, ExportInputError, ExportPathError
from fxmerge.export import load_program, load_state, save_program, save_state, sidecar_path

TIED = "export_test_models:build_tied_lm"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_program_round_trip_is_exact_and_keeps_a_dynamic_batch(tmp_path):
    model = reinit_(SmallResCNN(), seed=31).eval()
    x = torch.randn(2, 3, 10, 10, generator=_gen(32))
    path = save_program(model, x, tmp_path / "cnn.pt2")
    loaded = load_program(path)

    assert path == tmp_path / "cnn.pt2" and sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt2"]
    x5 = torch.randn(5, 3, 10, 10, generator=_gen(33))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(x5), model(x5))
    assert loaded.eval() is loaded and not loaded.training
    with pytest.raises(ExportError, match="captured in eval mode"):
        loaded.train()


def test_program_from_a_batch_of_one_still_accepts_other_batches(tmp_path):
    model = reinit_(MLP(), seed=47).eval()
    x1 = torch.randn(1, 6, generator=_gen(48))
    loaded = load_program(save_program(model, x1, tmp_path / "mlp.pt2"))
    x4 = torch.randn(4, 6, generator=_gen(49))
    with torch.no_grad():
        assert torch.equal(loaded(x1), model(x1)) and torch.equal(loaded(x4), model(x4))


def test_program_of_tiny_bert_keeps_keyword_inputs_and_model_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100
    )
    bert = reinit_(transformers.BertModel(config), seed=34, std=0.05).eval()
    ids = torch.randint(0, 100, (2, 7), generator=_gen(35))
    mask = torch.ones(2, 7, dtype=torch.long)
    loaded = load_program(save_program(bert, (ids, {"attention_mask": mask}), tmp_path / "bert.pt2"))

    ids3, mask3 = torch.randint(0, 100, (3, 7), generator=_gen(36)), torch.ones(3, 7, dtype=torch.long)
    with torch.no_grad():
        got, want = loaded(ids3, attention_mask=mask3), bert(ids3, attention_mask=mask3)
    assert type(got) is type(want)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_program_capture_failure_names_the_code_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError) as info:
        save_program(SignBranch(), torch.ones(2, 4), tmp_path / "branch.pt2")
    message = str(info.value)
    assert "torch.export could not capture SignBranch" in message
    assert "data-dependent" in message and "if x.sum() > 0:" in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="no program file"):
        load_program(tmp_path / "branch.pt2")


def test_state_round_trip_through_the_constructor_keeps_tied_weights(tmp_path):
    model = reinit_(build_tied_lm(vocab=13, dim=5), seed=37).eval()
    path = save_state(
        model,
        tmp_path / "lm.safetensors",
        constructor=TIED,
        constructor_kwargs={"vocab": 13, "dim": 5},
        meta={"method": "mudsc"},
    )

    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
    assert stored == {"emb.weight", "mix.weight", "mix.bias"}, "the tied head must be stored once"
    side = json.loads(sidecar_path(path).read_text())
    assert side["constructor"] == TIED and side["constructor_kwargs"] == {"vocab": 13, "dim": 5}
    assert side["aliases"] == {"head.weight": "emb.weight"} and side["meta"] == {"method": "mudsc"}
    assert side["model_class"] == "export_test_models.TiedLM" and side["training"] is False

    rebuilt = load_state(path)
    assert isinstance(rebuilt, TiedLM) and not rebuilt.training
    assert rebuilt.head.weight is rebuilt.emb.weight
    ids = torch.randint(0, 13, (4, 6), generator=_gen(38))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids))
    assert _same_state(rebuilt, model)


def test_loading_into_a_given_untied_model_fills_it_and_reties_the_weights(tmp_path):
    model = reinit_(TiedLM(), seed=39)
    path = save_state(model, tmp_path / "lm.safetensors")
    target = TiedLM(tie=False)
    assert target.head.weight is not target.emb.weight

    loaded = load_state(path, target)
    assert loaded is target and target.head.weight is target.emb.weight
    ids = torch.randint(0, 11, (2, 3), generator=_gen(40))
    with torch.no_grad():
        assert torch.equal(target(ids), model(ids))


def test_hf_masked_lm_with_tied_embeddings_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50
    )
    model = reinit_(transformers.BertForMaskedLM(config), seed=41, std=0.05).eval()
    path = save_state(model, tmp_path / "mlm.safetensors")
    fresh = transformers.BertForMaskedLM(config).eval()
    load_state(path, fresh)

    assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight
    ids = torch.randint(0, 50, (2, 8), generator=_gen(42))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_saved_float16_state_rebuilds_in_float16(tmp_path):
    model = reinit_(build_tied_lm(), seed=43).half()
    path = save_state(model, tmp_path / "half.safetensors", constructor=TIED)
    rebuilt = load_state(path)
    assert rebuilt.mix.weight.dtype == torch.float16 and _same_state(rebuilt, model)


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        (lambda: torch.nn.Linear(3, 5), r"shape mismatches weight: file \(4, 3\) vs model \(5, 3\)"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(3, 4)), "missing keys '0.weight'"),
        (lambda: torch.nn.Linear(3, 4, bias=False), "unexpected keys 'bias'"),
        (lambda: torch.nn.Linear(3, 4).double(), "dtype mismatches"),
    ],
)
def test_strict_checks_reject_mismatches_and_leave_the_model_untouched(tmp_path, target, fragment):
    path = save_state(reinit_(torch.nn.Linear(3, 4), seed=44), tmp_path / "lin.safetensors")
    model = target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=fragment):
        load_state(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_tie_that_the_file_contradicts_is_an_error(tmp_path):
    untied = reinit_(TiedLM(tie=False), seed=45)
    path = save_state(untied, tmp_path / "untied.safetensors")
    with pytest.raises(ExportError, match=r"ties 'emb\.weight'"):
        load_state(path, TiedLM())


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"constructor": "os:system"}, "standard library"),
        ({"constructor": "no_such_pkg_fx:build"}, "cannot import module 'no_such_pkg_fx'"),
        ({"constructor": "export_test_models:missing"}, "has no attribute 'missing'"),
        ({"constructor": "not a spec"}, "package.module:callable"),
        ({"constructor_kwargs": {"dim": 4}}, "without constructor"),
        ({"constructor": TIED, "constructor_kwargs": {"dim": object()}}, "constructor_kwargs must be JSON"),
        ({"meta": {"when": float("nan")}}, "meta must be JSON"),
    ],
)
def test_invalid_save_arguments_keep_the_existing_file(tmp_path, kwargs, fragment):
    target = save_state(TiedLM(), tmp_path / "lm.safetensors")
    old, old_sidecar = target.read_bytes(), sidecar_path(target).read_bytes()
    with pytest.raises(ExportInputError, match=fragment):
        save_state(TiedLM(), target, **kwargs)
    assert target.read_bytes() == old and sidecar_path(target).read_bytes() == old_sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.safetensors", "lm.safetensors.json"]


def test_save_state_bytes_are_reproducible_and_only_its_own_files_are_replaced(tmp_path):
    model = reinit_(TiedLM(), seed=47)
    path = save_state(model, tmp_path / "lm.safetensors", constructor=TIED, meta={"b": 1, "a": 2})
    first, side = path.read_bytes(), sidecar_path(path).read_bytes()
    save_state(model, path, constructor=TIED, meta={"a": 2, "b": 1})
    assert path.read_bytes() == first and sidecar_path(path).read_bytes() == side
    header = json.loads(first[8 : 8 + int.from_bytes(first[:8], "little")])
    assert list(header["__metadata__"]) == ["format", "fxmerge"]  # sorted keys: no per-run order
    assert _same_state(load_state(path), model)

    for name, foreign in (("a.safetensors", "a.safetensors"), ("b.safetensors", "b.safetensors.json")):
        (tmp_path / foreign).write_text("not fxmerge's")
        with pytest.raises(ExportPathError, match=f"{foreign} exists and was not written by fxmerge"):
            save_state(model, tmp_path / name)
        assert (tmp_path / foreign).read_text() == "not fxmerge's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors", "b.safetensors.json", "lm.safetensors", "lm.safetensors.json"]


def test_save_program_replaces_only_its_own_programs(tmp_path):
    model, x = reinit_(MLP(), seed=48).eval(), torch.randn(2, 6)
    (tmp_path / "other.pt2").write_bytes(b"PK not ours")
    with pytest.raises(ExportPathError, match="was not written by fxmerge"):
        save_program(model, x, tmp_path / "other.pt2")
    path = save_program(model, x, tmp_path / "mine.pt2")
    save_program(model, x, path)  # an fxmerge program is replaced
    assert torch.allclose(load_program(path)(x), model(x))
    assert (tmp_path / "other.pt2").read_bytes() == b"PK not ours"


def test_rebuild_needs_a_sidecar_with_a_constructor(tmp_path):
    path = save_state(TiedLM(), tmp_path / "plain.safetensors")
    with pytest.raises(ExportError, match="saved without a constructor"):
        load_state(path)
    sidecar_path(path).unlink()
    with pytest.raises(ExportError, match="no sidecar"):
        load_state(path)
    untied = load_state(path, TiedLM(tie=False))
    assert untied.head.weight is untied.emb.weight  # the aliases also live in the safetensors header
    with pytest.raises(ExportError, match="no safetensors file"):
        load_state(tmp_path / "absent.safetensors")


def test_save_state_does_not_modify_the_model(tmp_path):
    model = reinit_(MLP(), seed=46).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_state(model, tmp_path / "mlp.safetensors", constructor="export_test_models:MLP")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rebuilt = load_state(tmp_path / "mlp.safetensors")
    assert rebuilt.training and _same_state(rebuilt, model)
