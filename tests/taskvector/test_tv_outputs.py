"""Where a task-vector merge writes: never over its inputs, only complete shards, no stale staging folders."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tv_refs import make_models

from fxmerge.errors import TaskVectorPathError
from fxmerge.outputs import MANIFEST, STAGE_SUFFIX, Stage, foreign_entries, publish_dir, remove_stale
from fxmerge.taskvector import merge_task_vectors
from fxmerge.taskvector.sources import TensorInfo
from fxmerge.taskvector.writer import ShardedWriter


def _hf(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return folder


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    """``work/base``, ``work/ft0``, ``work/ft1`` as HF folders."""
    base, models = make_models(n_models=2, seed=40)
    return _hf(tmp_path / "work" / "base", base), [_hf(tmp_path / "work" / f"ft{i}", m) for i, m in enumerate(models)]


@pytest.mark.parametrize(("out", "fragment"), [
    ("work", "contains the input base"),  # the case: the folder holding base and fine-tunes
    ("work/base", "is the input base"),
    ("work/ft1/merged", "lies inside the input models[1]"),
])  # fmt: skip
def test_an_output_over_the_inputs_is_refused_even_with_overwrite(tmp_path, inputs, out, fragment):
    base, fts = inputs
    before = _tree(tmp_path)
    with pytest.raises(TaskVectorPathError, match=re.escape(f"out {tmp_path / out} {fragment}")):
        merge_task_vectors(base, fts, method="ties", density=0.5, out=tmp_path / out, overwrite=True)
    assert _tree(tmp_path) == before


def test_symlinks_are_resolved_before_comparing(tmp_path, inputs):
    """An output reached through a symlink, or shards that are symlinks into a blob store (the Hugging Face
    cache layout), are compared by their real paths."""
    base, fts = inputs
    (tmp_path / "link").symlink_to(base)
    with pytest.raises(TaskVectorPathError, match="is the input base"):
        merge_task_vectors(base, fts, method="task_arithmetic", out=tmp_path / "link", overwrite=True)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.replace(fts[0] / "model.safetensors", blobs / "abc123")
    (fts[0] / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(TaskVectorPathError, match=r"contains the input models\[0\]"):
        merge_task_vectors(base, fts, method="task_arithmetic", out=blobs, overwrite=True)
    assert (blobs / "abc123").is_file()


def test_a_config_file_is_an_input_too(tmp_path, inputs):
    from fxmerge.taskvector import load_tv_config, merge_from_config

    (tmp_path / "work" / "merge.yaml").write_text("merge_method: task_arithmetic\nbase_model: base\n"
                                                  "models: [{model: ft0}]\n")  # fmt: skip
    cfg = load_tv_config(tmp_path / "work" / "merge.yaml")
    with pytest.raises(TaskVectorPathError, match="contains the input config"):
        merge_from_config(cfg, tmp_path, overwrite=True)


def test_a_cut_short_shard_is_not_valid_safetensors(tmp_path):
    infos = {"a": TensorInfo((4, 4), torch.float32), "b": TensorInfo((8,), torch.float32)}
    writer = ShardedWriter(tmp_path / "out", infos, shard_size=1 << 20)
    writer.write("a", torch.ones(4, 4))  # "b" never comes: the run dies here
    writer._fh.flush()
    shard = writer.tmp / "model.safetensors"
    assert shard.stat().st_size == len(writer._header) + 96  # preallocated to its final size, header still zero
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own SafetensorError
        safe_open(str(shard), framework="pt")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".out.{'0' * 16}{STAGE_SUFFIX}"  # left by a killed run: nobody holds its lock
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 64)
    live = Stage(tmp_path, "out", TaskVectorPathError)  # a run in progress holds the lock
    other = tmp_path / f".other.{'1' * 16}{STAGE_SUFFIX}"  # another output's: not ours to judge
    other.mkdir()
    assert remove_stale(tmp_path, "out") == [dead]
    assert not dead.exists() and live.path.is_dir() and other.is_dir()
    live.discard()
    assert not live.path.exists()

    dead.mkdir()
    base, models = make_models(n_models=2, seed=41)
    merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "out")  # the next run cleans
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out"]


def test_the_manifest_lists_what_fxmerge_wrote(tmp_path):
    base, models = make_models(n_models=2, seed=42)
    merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "out", shard_size=2000)
    out = tmp_path / "out"
    assert (out / MANIFEST).is_file() and foreign_entries(out) == []
    (out / "model.safetensors.index.json").write_text("{}")  # changed by someone: no longer fxmerge's file
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("x")
    assert foreign_entries(out) == ["model.safetensors.index.json", "sub/x"]
    with pytest.raises(TaskVectorPathError, match=r"model.safetensors.index.json, sub/x"):
        merge_task_vectors(base, models, method="task_arithmetic", out=out, overwrite=True)


def test_an_output_that_appears_during_the_run_is_replaced_only_with_overwrite(tmp_path):
    base, models = make_models(n_models=2, seed=43)
    merge_task_vectors(base, models, method="task_arithmetic", out=tmp_path / "out")  # another run finished first
    theirs = _tree(tmp_path / "out")
    stage = Stage(tmp_path, "out", TaskVectorPathError)
    (stage.path / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(TaskVectorPathError, match="was filled while this run worked; pass overwrite=True"):
        publish_dir(stage.path, tmp_path / "out", TaskVectorPathError, overwrite=False)
    assert _tree(tmp_path / "out") == theirs
    publish_dir(stage.path, tmp_path / "out", TaskVectorPathError, overwrite=True)
    stage.discard()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
