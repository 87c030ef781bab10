"""Property test: random shapes, objectives, options and chunk sizes against the reference."""

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis, or the [dev] extra)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dft_kernels as dk
from helpers import OBJECTIVES, WEIGHTED_NLL, check_linear_against_reference, declined, make_inputs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 70),
    h=st.integers(1, 24),
    v=st.integers(2, 600),
    chunk=st.one_of(st.none(), st.integers(1, 80)),
    objective=st.sampled_from(OBJECTIVES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 2.0, 30.0]),
    smoothing=st.sampled_from([0.0, 0.3]),
    ignore=st.sampled_from(["none", "some", "all"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configurations(backend, n, h, v, chunk, objective, reduction, bias, softcap, smoothing, ignore,
                               seed):
    assume(not declined(backend, objective))  # the decline itself is checked by the correctness suite
    x, w, b, t = make_inputs(n, h, v, bias=bias, ignore=ignore, seed=seed)
    if dk.get_objective(objective).name not in [dk.get_objective(o).name for o in WEIGHTED_NLL]:
        smoothing = 0.0
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, chunk_size=chunk,
                                   objective=objective, reduction=reduction, softcap=softcap,
                                   label_smoothing=smoothing)
