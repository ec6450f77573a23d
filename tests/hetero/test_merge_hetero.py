"""End-to-end heterogeneous merges: exactness on identity-padded models, reports, plots and errors."""

from __future__ import annotations

import pytest
import torch

import fxmerge
from fxmerge.errors import MergeError
from fxmerge.hetero import merge_hetero

from .models import MLP, VGG, ResNet, Transformer, seeded, with_identities

GEN = torch.Generator().manual_seed(0)
IMAGES = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=GEN)
IMAGE_DATA = [torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=GEN) for _ in range(3)]
TOKENS = torch.randn(8, 4, 5, dtype=torch.float64, generator=GEN)
TOKEN_DATA = [torch.randn(16, 4, 5, dtype=torch.float64, generator=GEN) for _ in range(3)]
VECTOR_DATA = [torch.randn(32, 5, dtype=torch.float64, generator=GEN) for _ in range(3)]

PADDED = [  # (class, shallow depth, deep depth, slots of the shallow blocks in the deep model, inputs, data)
    (ResNet, (2, 2), (3, 3), [0, 1, 3, 4], IMAGES, IMAGE_DATA),
    (VGG, (2, 2), (3, 4), [0, 1, 3, 4], IMAGES, IMAGE_DATA),
    (Transformer, 2, 3, [0, 1], TOKENS, TOKEN_DATA),
    (MLP, 3, 4, [0, 1, 2], VECTOR_DATA[0], VECTOR_DATA),
]


CASES = [(*c, "act_align") for c in PADDED] + [(*c, "zipit") for c in (PADDED[0], PADDED[2])]


@pytest.mark.parametrize(("cls", "sd", "dd", "slots", "x", "data", "method"), CASES,
                         ids=[f"{c[0].__name__}-{c[-1]}" for c in CASES])  # fmt: skip
def test_identity_padded_deep_model_merges_with_its_shallow_original(cls, sd, dd, slots, x, data, method) -> None:
    """The deep model is the shallow one plus identity blocks: alignment finds the real blocks, the twin equals
    the deep model, and the merge is the same function. (ZipIt merges units that are constant over the data,
    e.g. dead ReLUs of the random MLP and VGG, with arbitrary partners, so its exactness needs every unit to vary.)"""
    shallow = seeded(cls, 0, sd)
    deep = with_identities(shallow, seeded(cls, 1, dd), slots)
    result = merge_hetero([deep, shallow], method=method, data=data, example_inputs=x, depth="lma",
                          reset_bn=False, progress=False)  # fmt: skip
    assert result.report["segmentation"]["slots"] == slots
    torch.testing.assert_close(result.model(x), deep(x), rtol=0, atol=1e-10)
    cka = torch.tensor(result.report["cka"])
    assert cka.shape == (sum(result.report["stages"][0]), sum(result.report["stages"][1]))
    for k, j in enumerate(slots):
        assert cka[j, k] == pytest.approx(1.0, abs=1e-9)  # a real block is identical to its original


def test_report_and_model_order() -> None:
    shallow = seeded(ResNet, 0, (2, 2))
    deep = with_identities(shallow, seeded(ResNet, 1, (3, 3)), [0, 1, 3, 4])
    result = merge_hetero([shallow, deep], method="zipit", data=IMAGE_DATA, example_inputs=IMAGES, depth="sma",
                          where="end", progress=False)  # fmt: skip
    rep = result.report
    assert rep["deep_model"] == 1 and rep["stages"] == [[2, 2], [3, 3]]
    seg = rep["segmentation"]
    assert seg["method"] == "sma" and seg["where"] == "end" and seg["shallow_model"] == 0
    assert seg["slots"] == [0, 1, 3, 4] and seg["segments"] == [[0, 0], [1, 1], [3, 3], [4, 4]]
    assert len(rep["cka"]) == 6 and all(len(row) == 4 for row in rep["cka"])
    assert rep["widths"]["g0"] == {"sizes": [4, 4], "target": 4}
    assert rep["padded_blocks"] == {0: [2, 5]} and rep["identity_max_error"][0] == 0.0
    assert rep["engine"]["absent_spaces"] == 2
    assert len(result.model.blocks) == 6
    result.spec.check_model(result.model)


def test_uniform_without_data_and_plot(tmp_path) -> None:
    shallow, deep = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (4, 3))
    result = merge_hetero([deep, shallow], method="average", example_inputs=IMAGES, depth="uniform", progress=False)
    assert result.report["cka"] is None
    assert result.report["segmentation"]["segments"] == [[0, 0], [1, 3], [4, 4], [5, 6]]
    path = tmp_path / "cka.png"
    result = merge_hetero([deep, shallow], method="zipit", data=IMAGE_DATA, example_inputs=IMAGES, depth="lma",
                          cka_plot=path, progress=False)  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.report["cka_plot"] == str(path)


def test_depth_and_width_together() -> None:
    shallow, deep = seeded(ResNet, 0, (2, 2), 4), seeded(ResNet, 1, (3, 3), 6)
    result = merge_hetero([deep, shallow], method="zipit", data=IMAGE_DATA, example_inputs=IMAGES, depth="lma",
                          width="max", progress=False)  # fmt: skip
    assert result.model.stem[0].out_channels == 6 and len(result.model.blocks) == 6
    assert result.report["widths"]["g0"] == {"sizes": [6, 4], "target": 6}
    assert result.model(IMAGES).shape == (8, 6) and torch.isfinite(result.model(IMAGES)).all()


@pytest.mark.parametrize("method", ["average", "mudsc", "rebasin", "wzip"])
def test_other_methods_on_equal_widths(method) -> None:
    shallow, deep = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (3, 3))
    sweeps = {"max_sweeps": 2} if method != "average" else {}  # average has no sweeps (an error if given)
    result = merge_hetero([deep, shallow], method=method, data=IMAGE_DATA, example_inputs=IMAGES, depth="lma",
                          progress=False, **sweeps)  # fmt: skip
    assert torch.isfinite(result.model(IMAGES)).all()


def test_inputs_are_not_modified() -> None:
    shallow, deep = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (3, 3))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (deep, shallow)]
    merge_hetero([deep, shallow], method="zipit", data=IMAGE_DATA, example_inputs=IMAGES, depth="lma", progress=False)
    for m, b in zip((deep, shallow), before, strict=True):
        assert all(torch.equal(b[k], v) for k, v in m.state_dict().items())


def test_argument_and_structure_errors() -> None:
    shallow, deep = seeded(ResNet, 0, (2, 2)), seeded(ResNet, 1, (3, 3))
    kw = {"method": "zipit", "data": IMAGE_DATA, "example_inputs": IMAGES, "progress": False}
    with pytest.raises(MergeError, match="differ in depth"):
        merge_hetero([deep, shallow], **kw)
    with pytest.raises(MergeError, match=r"cannot be aligned.*2 stages"):
        merge_hetero([seeded(ResNet, 1, (5,)), shallow], depth="lma", **kw)
    with pytest.raises(MergeError, match="at least as deep in every stage"):
        merge_hetero([seeded(ResNet, 1, (3, 1)), shallow], depth="lma", **kw)
    with pytest.raises(MergeError, match="fixed"):
        merge_hetero([deep, seeded(ResNet, 0, (2, 2), out=4)], depth="lma", **kw)
    with pytest.raises(MergeError, match="incompatible stems"):
        merge_hetero([deep, seeded(VGG, 0, (2, 2))], depth="lma", **kw)
    with pytest.raises(MergeError, match="exactly 2 models"):
        merge_hetero([deep, shallow, shallow], depth="lma", **kw)
    with pytest.raises(MergeError, match="depth='deepest': Input should be 'lma', 'sma' or 'uniform'"):
        merge_hetero([deep, shallow], depth="deepest", **kw)
    with pytest.raises(MergeError, match="where='middle': Input should be 'start' or 'end'"):
        merge_hetero([deep, shallow], depth="lma", where="middle", **kw)
    with pytest.raises(MergeError, match="unknown merge option 'colour'"):
        merge_hetero([deep, shallow], depth="lma", colour="red", **kw)
    with pytest.raises(MergeError, match="CKA on data"):
        merge_hetero([deep, shallow], method="average", example_inputs=IMAGES, depth="lma")
    with pytest.raises(MergeError, match="needs data"):
        merge_hetero([deep, shallow], method="zipit", example_inputs=IMAGES, depth="uniform")
    with pytest.raises(MergeError, match="repair"):
        merge_hetero([deep, shallow], depth="lma", repair=True, **kw)
    with pytest.raises(MergeError, match="one list of block module names"):
        merge_hetero([deep, shallow], depth="lma", blocks=[["blocks.0"]], **kw)


def test_through_fxmerge_merge() -> None:
    shallow = seeded(ResNet, 0, (2, 2))
    deep = with_identities(shallow, seeded(ResNet, 1, (3, 3)), [0, 1, 3, 4])
    result = fxmerge.merge([deep, shallow], method="zipit", data=IMAGE_DATA, example_inputs=IMAGES, depth="lma",
                           reset_bn=False, progress=False)  # fmt: skip
    assert result.report["segmentation"]["slots"] == [0, 1, 3, 4]
    torch.testing.assert_close(result.model(IMAGES), deep(IMAGES), rtol=0, atol=1e-10)
