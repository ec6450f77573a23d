"""Streaming over safetensors / HF directories equals in-memory merging; atomic output; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tv_refs import make_models

from fxmerge.errors import TaskVectorError, TaskVectorPathError
from fxmerge.taskvector import LazyStateDict, TaskVectorWarning, merge_task_vectors
from fxmerge.taskvector.sources import open_source

CASES = [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5, "seed": 3}),
         ("della", {"density": 0.5, "epsilon": 0.1}), ("dppa", {"density": 0.3}),
         ("ties", {"density": 0.3, "scope": "global"}), ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
         ("model_stock", {})]


def _hf_dir(path: Path, sd: dict, shard_every: int = 3) -> Path:
    """Write ``sd`` as a sharded HF directory (index + config)."""
    path.mkdir(parents=True)
    names = list(sd)
    groups = [names[i : i + shard_every] for i in range(0, len(names), shard_every)]
    weight_map = {}
    for j, g in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in g}, str(path / fname))
        weight_map.update(dict.fromkeys(g, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    return path


@pytest.mark.parametrize(("method", "kw"), CASES)
def test_streaming_output_equals_in_memory(tmp_path: Path, method: str, kw: dict) -> None:
    base, models = make_models(seed=20)
    mem = merge_task_vectors(base, models, method=method, **kw)
    b = _hf_dir(tmp_path / "base", base)
    ms = [_hf_dir(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    out = merge_task_vectors(b, ms, method=method, out=tmp_path / "out", shard_size=300, **kw)
    assert isinstance(out, LazyStateDict) and sorted(out) == sorted(mem)
    for k in mem:
        assert torch.equal(out[k], mem[k]), k
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(mem) and len(set(index["weight_map"].values())) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_single_file_inputs_out_dtype_and_config(tmp_path: Path) -> None:
    base, models = make_models(seed=21)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        save_file(m, str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
    mem = merge_task_vectors(base, models, method="ties", density=0.5, out_dtype="bfloat16")
    out = merge_task_vectors(tmp_path / "base.safetensors", paths, method="ties", density=0.5, out_dtype="bfloat16",
                             out=tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".fxmerge-manifest.json", "model.safetensors"]
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as h:
        assert h.get_tensor("emb.weight").dtype == torch.bfloat16
        assert torch.equal(h.get_tensor("emb.weight"), mem["emb.weight"])
    assert all(torch.equal(out[k], mem[k]) for k in mem)
    b = _hf_dir(tmp_path / "hf", base)
    merge_task_vectors(b, paths, method="task_arithmetic", out=tmp_path / "o2", out_dtype="float16")
    cfg = json.loads((tmp_path / "o2" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"


def test_seeds_bit_identical_and_order_independent() -> None:
    base, models = make_models(seed=22)
    a = merge_task_vectors(base, models, method="dare_ties", density=0.4, seed=7)
    rev = [dict(reversed(list(m.items()))) for m in models]
    b = merge_task_vectors(dict(reversed(list(base.items()))), rev, method="dare_ties", density=0.4, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_delta_aborts_without_output(tmp_path: Path) -> None:
    base, models = make_models(seed=23)
    models[1]["blocks.1.proj.weight"][2, 3] = float("nan")  # the last float tensor
    with pytest.raises(TaskVectorError, match=r"models\[1\].*blocks\.1\.proj\.weight.*NaN"):
        merge_task_vectors(base, models, method="ties", density=0.5, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TaskVectorError, match="NaN"):
        merge_task_vectors(base, models, method="dare_linear", density=0.1)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    base, models = make_models(seed=24)
    with pytest.raises(TaskVectorError, match="does not exist"):
        merge_task_vectors(tmp_path / "nope.safetensors", models, method="ties")
    save_file(base, str(tmp_path / "b.safetensors"))
    raw = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 50])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!!!!")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    for bad, msg in (("trunc", "outside the file"), ("junk", "not valid JSON"), ("tiny", "shorter than")):
        with pytest.raises(TaskVectorError, match=f"corrupt safetensors.*{msg}"):
            merge_task_vectors(tmp_path / "b.safetensors", [tmp_path / f"{bad}.safetensors"], method="ties",
                               out=tmp_path / "out")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(TaskVectorError, match=r"not a \.safetensors file"):
        open_source(tmp_path / "w.bin", "m")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(TaskVectorError, match=r"only \.bin/\.pt weights"):
        open_source(tmp_path / "d", "m")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kw", "msg"), [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": "ties", "density": 0.0}, r"density 0 .* outside \(0, 1\]"),
    ({"method": "ties", "density": 1.5}, r"outside \(0, 1\]"),
    ({"method": "ties", "density": [0.5, 0.5]}, "2 values for 3 models"),
    ({"method": "ties", "scope": "layer"}, "scope"),
    ({"method": "ties", "bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
    ({"method": "slerp"}, "exactly one model"),
    ({"method": "della", "density": 0.1, "epsilon": 0.2}, "epsilon"),
    ({"method": "ties", "weights": [[{"filter": "mlp", "value": 1.0}]] * 3}, "no filter entry matches"),
])
def test_bad_options_fail_before_writing(tmp_path: Path, kw: dict, msg: str) -> None:
    base, models = make_models(seed=25)
    with pytest.raises(TaskVectorError, match=msg):
        merge_task_vectors(base, models, out=tmp_path / "out", **kw)
    assert list(tmp_path.iterdir()) == []


def test_shape_policies() -> None:
    base, models = make_models(n_models=2, seed=26)
    big = dict(models[0])
    big["emb.weight"] = torch.cat([models[0]["emb.weight"], torch.full((3, 4), 5.0)])  # 3 added tokens
    small = dict(models[1])
    small["emb.weight"] = models[1]["emb.weight"][:5]
    with pytest.warns(TaskVectorWarning, match="shapes differ"):
        common = merge_task_vectors(base, [big, small], method="task_arithmetic")
    d = (big["emb.weight"][:5] - base["emb.weight"][:5]) + (small["emb.weight"] - base["emb.weight"][:5])
    torch.testing.assert_close(common["emb.weight"], base["emb.weight"][:5] + d)
    with pytest.warns(TaskVectorWarning):
        union = merge_task_vectors(base, [big, small], method="ties", density=0.5, shape_policy="union")
    assert union["emb.weight"].shape == (10, 4)
    assert torch.equal(union["emb.weight"][7:], torch.full((3, 4), 5.0))  # raw rows, never sparsified
    with pytest.warns(TaskVectorWarning):
        based = merge_task_vectors(base, [big, small], method="task_arithmetic", normalize=True, shape_policy="base")
    rows57 = base["emb.weight"][5:] + (big["emb.weight"][5:7] - base["emb.weight"][5:])  # only `big` covers them
    torch.testing.assert_close(based["emb.weight"][5:], rows57)
    with pytest.raises(TaskVectorError, match="shape_policy='error'"):
        merge_task_vectors(base, [big, small], method="ties", shape_policy="error")


def test_output_dir_rules(tmp_path: Path) -> None:
    """A non-empty folder needs overwrite=True, and even then only an earlier fxmerge output is replaced."""
    base, models = make_models(seed=27)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(TaskVectorPathError, match="not empty; pass overwrite=True"):
        merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "out")
    with pytest.raises(TaskVectorPathError, match=r"holds files fxmerge did not write \(keep.txt\)"):
        merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]

    merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "ours")
    first = (tmp_path / "ours" / "model.safetensors").read_bytes()
    merge_task_vectors(base, models, method="task_arithmetic", lam=0.5, out=tmp_path / "ours", overwrite=True)
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() != first
    (tmp_path / "ours" / "notes.md").write_text("mine")  # the user adds a file: the folder is no longer ours alone
    with pytest.raises(TaskVectorPathError, match=r"notes\.md"):
        merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "ours", overwrite=True)
    assert (tmp_path / "ours" / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]  # no staging folder left


@pytest.mark.parametrize("method", ["task_arithmetic", "model_stock"])
def test_nan_found_for_unsparsified_methods(tmp_path: Path, method: str) -> None:
    base, models = make_models(seed=28)
    models[2]["emb.weight"][0, 0] = float("inf")
    with pytest.raises(TaskVectorError, match=r"models\[2\].*'emb\.weight'.*NaN/Inf"):
        merge_task_vectors(base, models, method=method, out=tmp_path / "out")
    base2 = {k: v.clone() for k, v in base.items()}
    base2["blocks.0.fc.bias"][1] = float("nan")
    with pytest.raises(TaskVectorError, match=r"base.*'blocks\.0\.fc\.bias'.*base must be finite"):
        merge_task_vectors(base2, models[:2], method=method)
    big = [{k: v * 1e38 if v.is_floating_point() else v for k, v in m.items()} for m in models[:2]]
    with pytest.raises(TaskVectorError, match="overflowed"):
        merge_task_vectors(base, big, method="task_arithmetic", weights=[10.0, 10.0])
    assert list(tmp_path.iterdir()) == []


PIECE_CASES = [("task_arithmetic", {"weights": [0.5, -0.25, 2.0], "lam": 0.7}),
               ("task_arithmetic", {"normalize": True, "out_dtype": "float16"}),
               ("ties", {"density": 1.0}), ("dare_linear", {"density": 1.0, "seed": 4}),
               ("ties", {"density": 0.5})]  # sparsified: never pieced, must be unaffected


@pytest.mark.parametrize(("method", "kw"), PIECE_CASES)
def test_elementwise_merges_in_pieces_equal_whole_tensors(tmp_path: Path, method: str, kw: dict) -> None:
    """piece_size=7 cuts most tensors mid-row into pieces (streamed and in memory, bf16 inputs, one
    mismatched-shape tensor merged whole by the 'common' policy); the output equals whole-tensor merging."""
    base, models = make_models(seed=29)
    models[1]["emb.weight"] = torch.cat([models[1]["emb.weight"], torch.ones(2, 4)])  # a vocabulary mismatch
    base = {k: v.bfloat16() if v.is_floating_point() else v for k, v in base.items()}
    models = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in m.items()} for m in models]
    with pytest.warns(TaskVectorWarning):
        whole = merge_task_vectors(base, models, method=method, **kw)
    with pytest.warns(TaskVectorWarning):
        mem = merge_task_vectors(base, models, method=method, piece_size=7, **kw)
    b = _hf_dir(tmp_path / "base", base)
    ms = [_hf_dir(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    with pytest.warns(TaskVectorWarning):
        out = merge_task_vectors(b, ms, method=method, piece_size=7, out=tmp_path / "out", shard_size=100, **kw)
    assert sorted(out) == sorted(whole)
    for k in whole:
        assert mem[k].shape == whole[k].shape and mem[k].dtype == whole[k].dtype, k
        torch.testing.assert_close(mem[k], whole[k], atol=0, rtol=0)
        torch.testing.assert_close(out[k], whole[k], atol=0, rtol=0)


def test_piece_size_is_validated() -> None:
    base, models = make_models(seed=30)
    with pytest.raises(TaskVectorError, match="piece_size"):
        merge_task_vectors(base, models, method="task_arithmetic", piece_size=0)
