"""Property tests: on random architectures (fxmerge.testing strategies), merging a model with a randomly
permuted copy of itself recovers the model exactly (float64), for MuDSC and activation alignment.

Two methods are left out where hypothesis finds genuine limits of the method, not of the engine: activation-only
alignment on MLPs (a linear MLP with a 1-d input has collinear hidden units that no activation statistic tells
apart) and weight matching (coordinate descent from the identity can stop in a local optimum on tiny layers,
e.g. 1 -> 2 -> 2 -> 9). The zoo identity tests cover both on non-degenerate models.

Transformer data draws token ids over the whole vocabulary (the default draws them below the example's largest
id, often just {0, 1}); activation alignment needs at least 3 distinct inputs (vocab ** seq_len >= 3): with two,
every activation takes two values, every correlation is +-1 and no statistic tells the units apart."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxmerge
from fxmerge.testing import archs, assert_merge_recovers, merge_permutations

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _check(model_inputs, data, method: str, batches=None) -> None:
    model, inputs = model_inputs
    spec = fxmerge.infer_groups(model, inputs)
    perms = data.draw(merge_permutations(spec))
    assert_merge_recovers(model, spec, inputs, perms, method=method, data=batches)


def _token_batches(model, inputs, n: int = 4, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.tok.num_embeddings, (size, *inputs[0].shape[1:]), generator=g) for _ in range(n)]


@SETTINGS
@given(archs.mlps(), st.data(), st.just("mudsc"))
def test_random_mlp_merges_recover_the_model(model_inputs, data, method):
    _check(model_inputs, data, method)


@SETTINGS
@given(archs.cnns(), st.data(), st.sampled_from(["mudsc", "act_align"]))
def test_random_cnn_merges_recover_the_model(model_inputs, data, method):
    _check(model_inputs, data, method)


@SETTINGS
@given(archs.transformers(), st.data(), st.sampled_from(["mudsc", "act_align"]))
def test_random_transformer_merges_recover_the_model(model_inputs, data, method):
    model, inputs = model_inputs
    assume(method != "act_align" or model.tok.num_embeddings ** inputs[0].shape[1] >= 3)
    _check(model_inputs, data, method, _token_batches(model, inputs))
