"""Weight-normalised layers (``w = g * v / ||v||``) in both of torch's forms: groups, soundness and merging.

The old ``torch.nn.utils.weight_norm`` keeps the computed ``weight`` as an autograd attribute, which plain
``copy.deepcopy`` refuses; every copy fxmerge makes must handle it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge
from fxmerge.testing import assert_merge_recovers

STYLES = {"parametrizations": nn.utils.parametrizations.weight_norm, "hook": torch.nn.utils.weight_norm}


class WeightNormNet(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        wn = STYLES[style]
        self.inp = wn(nn.Linear(6, 8))
        self.conv = wn(nn.Conv1d(8, 8, 3, padding=1), dim=0)
        self.out = wn(nn.Linear(8, 3), dim=None)  # one norm over the whole weight

    def forward(self, x):
        h = F.relu(self.inp(x)).transpose(1, 2)
        return self.out(F.relu(self.conv(h)).transpose(1, 2))


def _model(style: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = WeightNormNet(style).double().eval()
    with torch.no_grad():  # g away from ||v|| so that g and v both matter
        for name, p in model.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.mul_(torch.rand_like(p) + 0.5)
    return model


X = torch.randn(4, 5, 6, dtype=torch.float64)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("style", STYLES)
def test_weight_norm_groups_are_sound_and_merge_back(style, frontend):
    model = _model(style, 0)
    if style == "hook" and frontend == "fx":  # weight is recomputed by a pre-hook fx cannot see: a clear error
        with pytest.raises(fxmerge.CaptureError, match="frontend='export'"):
            fxmerge.infer_groups(model, X, frontend=frontend, verify=False)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = fxmerge.infer_groups(model, X, frontend=frontend, verify=False)
    assert [g.size for g in spec.groups] == [8, 8]  # both hidden widths free; g follows v's output axis
    for seed in range(3):
        fxmerge.verify_invariance(model, spec, X, seed=seed)
    gen = torch.Generator().manual_seed(1)
    perms = {g.id: torch.randperm(g.size, generator=gen) for g in spec.groups}
    assert_merge_recovers(model, spec, X, perms, method="act_align", atol=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is not modified


@pytest.mark.parametrize("style", STYLES)
def test_weight_norm_pair_merges_and_exports(style, tmp_path):
    a, b = _model(style, 0), _model(style, 1)
    data = [torch.randn(16, 5, 6, dtype=torch.float64) for _ in range(3)]
    merged = fxmerge.merge([a, b], method="zipit", data=data, example_inputs=X, progress=False).model
    assert merged(X).shape == (4, 5, 3)
    fxmerge.export_onnx(merged.float(), X.float(), tmp_path / "wn.onnx")
    assert (tmp_path / "wn.onnx").stat().st_size > 0
