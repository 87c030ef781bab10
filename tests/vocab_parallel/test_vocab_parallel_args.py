"""Arguments of the vocab-parallel path that are checked in one process, before any communication
(the checks that need a process group run in tests/vocab_parallel/test_vocab_parallel.py)."""

import pytest
import torch.distributed as dist

import dft_kernels as dk
from helpers import make_inputs


def _inputs():
    x, w, _, t = make_inputs(4, 8, 10, bias=False, ignore="none")
    return x, w, t


def test_process_group_must_be_a_process_group():
    x, w, t = _inputs()
    with pytest.raises(TypeError, match="process_group"):
        dk.linear_cross_entropy(x, w, t, process_group="tp")
    with pytest.raises(TypeError, match="process_group"):
        dk.cross_entropy(x @ w.t(), t, process_group=0)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs no default process group")
def test_process_group_without_init_process_group_is_named():
    x, w, t = _inputs()
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        dk.linear_cross_entropy(x, w, t, process_group=group)


def test_allreduce_dgrad_must_be_a_bool():
    x, w, t = _inputs()
    with pytest.raises(TypeError, match="allreduce_dgrad"):
        dk.linear_cross_entropy(x, w, t, allreduce_dgrad="no")


def test_reference_runs_in_one_process_only():
    x, w, t = _inputs()
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    with pytest.raises(ValueError, match="process_group: the reference"):
        dk.reference.linear_cross_entropy(x, w, t, process_group=group)
    with pytest.raises(ValueError, match="process_group: the reference"):
        dk.reference.cross_entropy(x @ w.t(), t, process_group=group)
