"""Vocab-parallel dk.linear_logprobs on a 2-rank gloo group (uneven slices 19 + 18 of V = 37) against the
float64 reference on the whole head: log-probs, entropy, dX and each rank's dW/db slice under random
upstream gradients of both outputs; scalar and per-token temperature, softcap, bias, shift, ignored
targets, a chunk smaller than the batch, and a peaked distribution (T = 0.05)."""

from __future__ import annotations

import pytest
from logprobs_ranks import CASES, run_cases
from process_group import run_ranks

TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}


@pytest.fixture(scope="module")
def results():
    return run_ranks(run_cases, 2, sorted(CASES))


@pytest.mark.parametrize("name", sorted(CASES) + ["verl"])
def test_linear_logprobs_vocab_parallel_matches_reference(results, name):
    """"verl": the verl drop-in (dft_kernels.integrations.verl) with dist_process_group."""
    for rank, res in enumerate(results):
        errs = dict(res[name])
        if name == "verl":
            assert errs.pop("shape") == 1.0     # flattened (N,), as verl returns them
        tol = TOL[errs.pop("dtype")]
        for key, err in errs.items():
            assert err <= tol, (rank, name, key, err)


def test_logits_on_a_group_still_refused(results):
    for res in results:
        assert res["logits_refused"].startswith("process_group: logprobs on vocab-parallel logits")
