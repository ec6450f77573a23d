"""``benchmarks/zoo_sweep.py``: the per-model stages on a few small models of the representative slice, and
the report it writes (``docs/compatibility.md``).

Each model goes through group inference (strict and not), the float64 invariance check on non-degenerate
random weights, and act_align self-merge recovery; ONNX export and rebasin are left to the sweep itself
(tests/export and tests/merge cover them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import load_benchmark

sweep = load_benchmark("zoo_sweep")

# small models of the representative slice: SE + hardswish, post-LN encoder, GQA decoder (sdpa and eager),
# residual CNN, timm ViT (fused qkv)
FAST = ["torchvision/mobilenet_v3_small", "hf/bert", "hf/llama[sdpa]"]
SLOW = ["torchvision/resnet18", "hf/llama[eager]", "timm/vision_transformer"]
CATALOG = {"vision_transformer": {"model": "vit_tiny_patch16_224"}}


def _check(key: str) -> None:
    assert key in sweep.REPRESENTATIVE
    rec = sweep.run_model(key, CATALOG, stages=("merge",), methods=("act_align",))
    assert not rec["errors"].get("build"), rec["errors"]
    assert rec["nonstrict_ok"], rec["errors"]
    assert rec["nonstrict_groups"] > 0
    assert rec["sound"], rec["errors"].get("verify")
    assert rec["frozen_no_reason"] == 0
    assert "permute" not in rec["errors"], rec["errors"]
    assert rec["moved"] > 1e-3, "the permuted copy is not a different point: recovery would prove nothing"
    assert isinstance(rec["act_align"], float), rec["errors"]
    assert rec["act_align"] <= sweep.RECOVERY_TOL, f"act_align recovers with error {rec['act_align']:.3g}"
    assert sweep.status(rec) == "green"


@pytest.mark.parametrize("key", FAST)
def test_sweep_stages_pass(key: str) -> None:
    _check(key)


@pytest.mark.slow
@pytest.mark.parametrize("key", SLOW)
def test_sweep_stages_pass_slow(key: str) -> None:
    _check(key)


def test_reinit_makes_norms_and_zero_init_layers_non_degenerate() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6), nn.Linear(6, 3))
    nn.init.zeros_(model[3].weight)
    sweep._reinit(model, 0)
    bn, ln = model[1], model[2]
    for t, (lo, hi) in [(bn.weight, (0.5, 1.5)), (bn.bias, (-0.5, 0.5)), (bn.running_mean, (-0.5, 0.5)),
                        (bn.running_var, (0.5, 1.5)), (ln.weight, (0.5, 1.5)), (ln.bias, (-0.5, 0.5))]:  # fmt: skip
        assert lo <= float(t.min()) < float(t.max()) <= hi
    assert float(model[3].weight.abs().min()) > 0
    assert torch.unique(model[3].bias).numel() == 3


def test_report_counts_targets_and_reasons(tmp_path: Path) -> None:
    green = {"family": "torchvision", "key": "torchvision/resnet18", "errors": {}, "nonstrict_ok": True,
             "strict_ok": True, "sound": True, "frozen_no_reason": 0, "n_frozen": 3, "permutable": 0.99,
             "act_align": 0.0, "rebasin": 0.0, "onnx": "ok", "params": 10}  # fmt: skip
    unsound = green | {
        "key": "torchvision/alexnet",
        "sound": False,
        "errors": {"verify": "InvarianceError: g3"},
    }
    cache = {"results": {r["key"]: r for r in (green, unsound)}, "timm_catalog": {}}
    out = tmp_path / "compat.md"
    sweep.write_report(cache, out, ["python benchmarks/zoo_sweep.py --only x"])
    text = out.read_text()
    assert "python benchmarks/zoo_sweep.py --only x" in text
    assert "| torchvision | 2 | 1 | 1 | 0 | 0 | 1 |" in text
    assert "| 0 unsound specs | 1 unsound of 2 verified | **no** |" in text
    assert "verify: InvarianceError: g3" in text
    assert sweep.status(unsound) == "red: unsound"


def test_resume_reruns_rows_that_missed_a_stage_and_fills_size_skips() -> None:
    import argparse

    base = {"family": "timm", "errors": {}, "stage": "done", "sound": True, "nonstrict_ok": True}
    results = {
        "timm/a": base | {"key": "timm/a", "params": 10, "stages": []},  # an earlier --stages none run
        "timm/b": base | {"key": "timm/b", "params": 50_000_000},  # too large for merge and onnx
        "timm/c": base | {"key": "timm/c", "params": 20_000_000},  # too large for merge only: onnx must run
        "timm/d": base | {"key": "timm/d", "params": 10, "act_align": 0.0, "onnx": "ok"},  # done (old record)
    }
    cache = {"results": results}
    entries = [sweep.Entry(k, "timm", "cnn", "-") for k in results]
    args = argparse.Namespace(family="timm", slice="all", only=None, exclude=None, rerun_failed=False,
                              resume=True, stages="merge,onnx", smallest_first=True)  # fmt: skip
    assert [e.key for e in sweep.select(entries, args, cache)] == ["timm/a", "timm/c"]
    assert results["timm/b"]["act_align"] == results["timm/b"]["onnx"] == "skipped: size"
    assert sweep.status(results["timm/b"]) == "green"
    args.stages = "none"
    assert sweep.select(entries, args, cache) == []


def test_float32_merge_stage_for_a_model_without_float64_kernels() -> None:
    import torch
    from torch import nn

    class Float32Only(nn.Module):  # like torch.nn.functional.grouped_mm on CPU: no float64 kernel
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.float64:
                raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
            return self.lin(x)

    batches = [torch.randn(4, 3) for _ in range(2)]
    data = [b.double() for b in batches]
    rec: dict = {}
    model, x, data = sweep._merge_precision(Float32Only().double(), (data[0],), data, batches, rec)
    assert model.lin.weight.dtype == x[0].dtype == data[1].dtype == torch.float32
    assert rec["merge_dtype"] == "float32" and "got Double" in rec["merge_dtype_why"]
    assert sweep.recovery_tol(rec) == sweep.RECOVERY_TOL_F32 == 1e-4
    assert sweep.rel_error(model, model, data) == 0.0
    green = {"family": "hf", "key": "hf/m", "errors": {}, "nonstrict_ok": True, "sound": True, "onnx": "ok"}
    assert sweep.status(green | rec | {"act_align": 3e-5}) == "green"  # float32 rounding, within 1e-4
    assert sweep.status(green | {"act_align": 3e-5}) == "red: act_align"  # a float64 row passes at 1e-6 only
    assert "merge stage in float32" in sweep._reason(green | rec)
    rec64: dict = {}
    model64 = nn.Linear(3, 2).double()
    assert (
        sweep._merge_precision(model64, (data[0].double(),), [d.double() for d in data], batches, rec64)[0]
        is model64
    )
    assert rec64 == {}


def test_onnx_tolerance_scales_with_the_outputs() -> None:
    import torch
    from torch import nn

    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1000.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.bias.zero_()
    x = torch.tensor([[3.0, -2.0]])
    assert sweep.onnx_atol(model, (x,)) == pytest.approx(1e-4 * 3000.0)
    assert sweep.onnx_atol(model, (x / 1e4,)) == 1e-4  # never below export_onnx's default


def _row(key: str, **fields: object) -> dict:
    return {"key": key, "family": key.split("/")[0], "errors": {}, "stage": "done", "strict_ok": True,
            "nonstrict_ok": True, "nonstrict_groups": 7, "sound": True, "frozen_no_reason": 0, "n_frozen": 2,
            "permutable": 1.0, "act_align": 0.0, "onnx": "ok", "params": 1_000_000, "input": "2x3x64x64",
            "frontend": "fx"} | fields  # fmt: skip


def test_report_only_renders_the_rows_of_a_cache_file(tmp_path: Path) -> None:
    cache_path, out = tmp_path / "results" / "compat.json", tmp_path / "compat.md"
    rebuilt = {"reconstructed": "docs/compatibility.md at abc"}
    resnet = _row("torchvision/resnet18", n_frozen=None, **rebuilt)
    del resnet["n_frozen"]  # reconstructed rows have no per-model count, only the lost total
    cache = {
        "commands": ["python benchmarks/zoo_sweep.py --family torchvision"],
        "libraries": {"torch": "9.9", "torchvision": "8.8", "timm": "7.7", "transformers": "6.6"},
        "lost_totals": {"n_frozen": {"total": 40, "keys": ["torchvision/resnet18"]}},
        "results": {
            "torchvision/resnet18": resnet,
            "torchvision/alexnet": _row("torchvision/alexnet", act_align=3e-3, trace="x" * 5000),
        },
        "timm_catalog": {},
    }
    sweep.save_cache(cache_path, cache)
    text = cache_path.read_text()
    loaded = sweep.load_cache(cache_path)
    assert len(loaded["results"]["torchvision/alexnet"]["trace"]) == sweep.TRACE_CHARS  # the tail only
    assert sum('"key": "torchvision/' in line for line in text.splitlines()) == 2  # one line per model
    assert not list(cache_path.parent.glob("*.tmp"))  # written atomically: no temporary left behind

    assert sweep.main(["--report-only", "--cache", str(cache_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert (
        "| resnet18 | 1.00M | 2x3x64x64 | fx | yes | yes (7) | yes | 100.0 | 0.0e+00 | - | ok | green |  |"
        in md
    )
    assert "| alexnet | 1.00M |" in md and "| red: act_align | act_align recovers with error 3.0e-03 |" in md
    assert "| torchvision | 2 | 1 | 1 |" in md
    assert "| 0 of 42 frozen axes without one |" in md  # 40 (lost total) + 2
    assert "python benchmarks/zoo_sweep.py --family torchvision" in md
    assert f"(`{cache_path}`" in md and "torch 9.9, torchvision 8.8" in md
    assert "1 of the 2 records were reconstructed from this page (docs/compatibility.md at abc)" in md
    assert sweep.main(["--report-only", "--cache", str(tmp_path / "none.json"), "--out", str(out)]) == 1
    assert out.read_text() == md  # an empty cache does not overwrite the page


def test_a_partial_run_merges_into_the_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_path, out = tmp_path / "compat.json", tmp_path / "compat.md"
    old = {"torchvision/alexnet": _row("torchvision/alexnet"),
           "torchvision/resnet18": _row("torchvision/resnet18", act_align=0.5, reconstructed="md")}  # fmt: skip
    sweep.save_cache(cache_path, {"commands": ["python benchmarks/zoo_sweep.py --family torchvision"],
                                  "results": old, "timm_catalog": {}})  # fmt: skip
    ran = []

    def fake_run_one(key: str, *args: object) -> dict:  # no model runs: the record a worker would return
        ran.append(key)
        return _row(key, act_align=1e-9, wall=1.0, trace="y" * 3000)

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    argv = ["--family", "torchvision", "--only", "resnet18", "--cache", str(cache_path), "--out", str(out)]
    assert sweep.main(argv) == 0
    assert ran == ["torchvision/resnet18"]
    cache = sweep.load_cache(cache_path)
    assert set(cache["results"]) == {"torchvision/alexnet", "torchvision/resnet18"}  # merged, not replaced
    assert cache["results"]["torchvision/alexnet"] == old["torchvision/alexnet"]
    new = cache["results"]["torchvision/resnet18"]
    assert new["act_align"] == 1e-9 and "reconstructed" not in new and len(new["trace"]) == sweep.TRACE_CHARS
    assert cache["commands"] == ["python benchmarks/zoo_sweep.py --family torchvision",
                                 "python benchmarks/zoo_sweep.py " + " ".join(argv)]  # fmt: skip
    assert set(cache["libraries"]) == {"torch", "torchvision", "timm", "transformers"}
    md = out.read_text()
    assert "| alexnet |" in md and "| resnet18 |" in md and "| torchvision | 2 | 2 | 0 |" in md
    assert "reconstructed" not in md
