"""Property tests: on random architectures every inferred group is a symmetry, and frozen positions never move."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxmerge
from fxmerge.testing import archs
from fxmerge.testing.perms import assert_frozen_untouched, assert_invariant, spec_permutations

SETTINGS = settings(max_examples=70, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _check(model_inputs, data) -> None:
    model, inputs = model_inputs
    spec = fxmerge.infer_groups(model, inputs)
    fxmerge.verify_invariance(model, spec, inputs, seed=data.draw(st.integers(0, 2**16)))
    perms = data.draw(spec_permutations(spec))
    assert_frozen_untouched(spec, perms)
    assert_invariant(model, spec, inputs, perms)


@SETTINGS
@given(archs.mlps(), st.data())
def test_random_mlps_invariant(model_inputs, data):
    _check(model_inputs, data)


@SETTINGS
@given(archs.cnns(), st.data())
def test_random_cnns_invariant(model_inputs, data):
    _check(model_inputs, data)


@SETTINGS
@given(archs.transformers(), st.data())
def test_random_transformers_invariant(model_inputs, data):
    _check(model_inputs, data)
