"""Unit tests of the export helpers against hand-computed references: input parsing, random inputs,
output flattening, tolerance arithmetic, exporter-error parsing and tied-tensor detection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fxmerge.errors import ExportError
from fxmerge.export._compare import compare_outputs
from fxmerge.export._diagnose import blocking_op, normalize_op, summary, user_code
from fxmerge.export._flat import flatten_outputs, output_name
from fxmerge.export._inputs import other_batch_size, parse_example_inputs, random_inputs
from fxmerge.export._tensors import split_aliases


class _Net(torch.nn.Module):
    def forward(self, pixels, *extra, mask=None, flag=True):
        return pixels


def test_parse_splits_positional_keyword_and_constant_inputs():
    a, b, m = torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3, dtype=torch.long)
    parsed = parse_example_inputs(_Net(), (a, b, {"mask": m, "flag": False}))
    assert parsed.names == ("pixels", "extra_0", "mask")
    assert parsed.batch_size() == 2 and parsed.batch_flags() == (True, True, True)
    args, kwargs = parsed.rebuild(parsed.tensors)
    assert args[0] is parsed.tensors[0] and kwargs["flag"] is False and kwargs["mask"] is parsed.tensors[2]


def test_batch_flags_only_mark_inputs_whose_dim0_is_the_batch():
    parsed = parse_example_inputs(_Net(), (torch.zeros(4, 2), torch.zeros(7), torch.tensor(1.0)))
    assert parsed.batch_flags() == (True, False, False)
    assert [other_batch_size(b) for b in (1, 2, 4)] == [3, 3, 5]


def test_random_inputs_keep_dtype_and_observed_range():
    ids = torch.tensor([[5, 17, 9], [6, 11, 12]])
    scores = torch.tensor([[-0.5, 2.0, 0.0], [1.0, 1.5, -0.25]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    parsed = parse_example_inputs(_Net(), (ids, scores, {"mask": mask}))
    new_ids, new_scores, new_mask = random_inputs(parsed, 50, torch.Generator().manual_seed(0))

    assert new_ids.shape == (50, 3) and new_ids.dtype == torch.int64
    assert int(new_ids.min()) == 5 and int(new_ids.max()) == 17  # 150 draws from 13 values hit both ends
    assert new_scores.dtype == torch.float32 and new_scores.min() >= -0.5 and new_scores.max() <= 2.0
    assert torch.equal(new_mask, torch.ones(50, 3, dtype=torch.bool))  # constant examples stay constant
    again = random_inputs(parsed, 50, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], new_ids), "same seed, same draws"


def test_flatten_outputs_orders_dicts_dataclasses_and_tuples():
    @dataclass
    class Out:
        logits: torch.Tensor
        hidden: tuple | None = None

    t1, t2, t3 = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    flat = flatten_outputs({"a": Out(t1, (t2, None)), "b": [t3, "skip"]})
    assert [path for path, _ in flat] == [("a", "logits"), ("a", "hidden", 0), ("b", 0)]
    assert [t.item() for _, t in flat] == [0.0, 1.0, 2.0]
    assert [output_name(p) for p in [(), (0,), (1, "x"), ("logits",)]] == [
        "output",
        "output_0",
        "output_1.x",
        "logits",
    ]


def test_tolerance_follows_allclose_and_relative_difference_is_hand_computed():
    want = torch.tensor([1.0, 2.0, 0.0, 4.0])
    got = np.array([1.0, 2.001, 5e-5, 4.0])
    result = compare_outputs(["y"], [got], [want], atol=1e-4, rtol=1e-3, label="l", batch_size=4)
    # |2.001 - 2| = 1e-3 <= 1e-4 + 1e-3 * 2: passes; rel = 1e-3 / 2; the 0-reference element only uses atol
    assert result.passed
    assert result.max_abs_diff == pytest.approx(1e-3, rel=1e-9)
    assert result.max_rel_diff == pytest.approx(5e-4, rel=1e-9)
    failing = compare_outputs(
        ["y"], [got + np.array([0, 0, 0, 0.01])], [want], atol=1e-4, rtol=1e-3, label="l", batch_size=4
    )
    assert not failing.passed and failing.max_abs_diff == pytest.approx(0.01, rel=1e-9)


def test_nan_matches_nan_but_not_a_number():
    want = torch.tensor([float("nan"), 1.0])
    assert compare_outputs(
        ["y"], [np.array([np.nan, 1.0])], [want], atol=0, rtol=0, label="l", batch_size=2
    ).passed
    bad = compare_outputs(["y"], [np.array([0.0, 1.0])], [want], atol=0, rtol=0, label="l", batch_size=2)
    assert not bad.passed and bad.max_abs_diff == float("inf")


def test_shape_mismatch_is_reported_as_a_batch_problem():
    with pytest.raises(ExportError, match=r"shape \(2, 3\) in the exported model but \(4, 3\)"):
        compare_outputs(
            ["y"], [np.zeros((2, 3))], [torch.zeros(4, 3)], atol=0, rtol=0, label="l", batch_size=4
        )


def test_exporter_messages_are_parsed_for_the_op():
    dynamo = "## Exception summary\n<class 'x.DispatchError'>: No ONNX function found for <OpOverload(op='aten._linalg_svd', overload='default')>."
    script = "Exporting the operator 'aten::kthvalue' to ONNX opset version 20 is not supported"
    assert blocking_op([dynamo, script]) == "aten._linalg_svd"
    assert blocking_op(["nothing here", script]) == "aten.kthvalue"
    assert blocking_op(["aten_histc with min == max is not supported"]) == "aten.histc"
    assert blocking_op(["plain failure"]) is None
    assert normalize_op("aten.add.Tensor") == "aten.add" and normalize_op("mylib::op") == "mylib.op"
    assert summary(RuntimeError(dynamo)).startswith("DispatchError: No ONNX function found")
    trace = 'The following call raised this error:\n  File "/m.py", line 7, in forward\n    if y.sum() > 0:\n'
    assert user_code([trace]) == "/m.py:7 in forward: if y.sum() > 0:"


def test_split_aliases_keeps_one_copy_per_view_and_clones_partial_overlaps():
    base = torch.arange(12.0)
    state = {
        "a": base,
        "b": base,
        "c": base[:6],
        "d": torch.ones(2),
        "e": torch.zeros(0),
        "f": torch.zeros(0),
    }
    tensors, aliases = split_aliases(state)
    assert aliases == {"b": "a"}
    assert set(tensors) == {"a", "c", "d", "e", "f"}
    assert tensors["a"].untyped_storage().data_ptr() != tensors["c"].untyped_storage().data_ptr()
    assert torch.equal(tensors["c"], torch.arange(6.0)) and torch.equal(state["a"], torch.arange(12.0))
