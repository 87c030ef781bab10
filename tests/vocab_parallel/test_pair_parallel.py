"""Vocab-parallel two-head losses on a 2-rank gloo group (uneven slices 19 + 18 of V = 37): the anchored
dk.linear_cross_entropy (ASFT; both KL directions, several objectives, every reduction, num_items_in_batch,
softcap, shift, token weights, bias, stats, the Triton split kernel under TRITON_INTERPRET=1, DTensor heads)
and dk.linear_distill (beta 0, 1 and in between, two temperatures, every reduction) against the float64
reference on the whole heads (tests/vocab_parallel/pair_ranks.py): loss, dX and each rank's dW/db slice,
the frozen head untouched; no tensor of N x V_local elements on any rank; and a second head split unlike the
first raises on every rank."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from conftest import triton_cpu_unavailable_reason
from pair_ranks import CASES, run_cases
from process_group import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

TOL = {"torch.float64": 1e-10, "torch.float32": 1e-5}


def _names():
    skip_triton = triton_cpu_unavailable_reason()
    return [n for n in sorted(CASES) if not (skip_triton and "triton" in n)]


@pytest.fixture(scope="module")
def results():
    return run_ranks(run_cases, 2, _names())


def _param(name):
    marks = []
    if "triton" in name and triton_cpu_unavailable_reason():
        marks.append(pytest.mark.skip(reason=f"triton backend on CPU tensors: {triton_cpu_unavailable_reason()}"))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_param(n) for n in sorted(CASES)])
def test_two_heads_vocab_parallel_match_reference(results, name):
    for rank, res in enumerate(results):
        errs = dict(res[name])
        tol = TOL[errs.pop("dtype")]
        assert errs.pop("frozen_head_changed") == 0.0, (rank, name)
        assert errs.pop("loss_dtype_ok") == 1.0, (rank, name)
        assert errs.pop("stats_entropy_missing", 0.0) == 0.0, (rank, name)
        for key, err in errs.items():
            assert err <= tol, (rank, name, key, err)


def test_second_head_split_unlike_the_first_raises_on_every_rank(results):
    for res in results:
        for kind in ("anchor", "distill"):
            message = res["errors"][kind]
            assert "same vocabulary slice of both heads" in message and "[19, 18]" in message, (kind, message)


def test_no_tokens_x_vocab_tensor_on_any_rank(results):
    """Every tensor made in forward and backward of both two-head losses (mean and none) holds fewer elements
    than N x V_local, and the recorder saw the chunk's logits (so it was recording)."""
    for rank, res in enumerate(results):
        for kind, (of_all, of_chunk) in res["memory"].items():
            assert of_all < 1.0 and of_chunk >= 1.0, (rank, kind, of_all, of_chunk)
