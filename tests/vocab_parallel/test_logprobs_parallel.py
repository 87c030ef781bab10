"""Vocab-parallel dk.linear_logprobs and dk.logprobs on a 2-rank gloo group (uneven slices 19 + 18 of V = 37)
against the float64 reference on the whole head: log-probs, entropy, the statistics of return_stats, dX and
each rank's dW/db (dlogits) slice under random upstream gradients of both outputs; scalar and per-token
temperature, softcap, bias, shift, ignored targets, a chunk smaller than the batch, a peaked distribution
(T = 0.05), process-group and DTensor operands, and is_top1 with the maximum tied across the slices."""

from __future__ import annotations

import pytest
from logprobs_ranks import CASES, run_cases
from process_group import run_ranks

TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5,
       # bf16 logits (the "dtype" of a logits case is the logits'): float32 math on the rounded values the
       # reference sees too, so only the bf16 dlogits slice carries a rounding, bf16's unit roundoff 2^-8
       "torch.bfloat16": 2.0 ** -8}


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


def test_is_top1_with_the_maximum_tied_across_slices(results):
    for res in results:
        assert res["ties"]["ours"] == res["ties"]["reference"] == [True, False, False, False]
