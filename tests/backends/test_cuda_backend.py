"""The cuda backend (csrc/ kernel) on a GPU, beyond the correctness suite it shares with the other
backends (tests/test_correctness.py's ``backend`` fixture): the largest vocabulary, the row contract
against the torch backend in float64, the op's own input checks, the fallback of ``auto`` to it.

Every test carries the ``gpu`` marker (skipped without CUDA, see conftest).  Inputs are made
on the CPU, moved to the GPU; the reference runs in float64 on the same values.
Tolerances (docs/design.md, Tests): relative error <= 1e-5 in float32, <= 1e-2 in bfloat16/float16.
"""

import logging
import sys
import types

import pytest
import torch

import dft_kernels as dk
from dft_kernels import backends
from dft_kernels.backends import cuda as cuda_backend
from dft_kernels.backends import torch as torch_backend
from dft_kernels.options import make_loss_params
from helpers import (
    TOL,
    check_linear_against_reference,
    make_inputs,
    rel_err,
)

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda", 0) if torch.cuda.is_available() else None
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    ok, reason = cuda_backend.is_available(DEV)
    if not ok:
        pytest.skip(f"cuda backend unavailable on this GPU machine: {reason}")


def check(x, w, b, t, dtype, *, chunk_size=16, check_grads=True, **kwargs):
    """Ours (backend="cuda", dtype) vs the float64 reference, all on the GPU."""
    check_linear_against_reference(x, w, b, t, dtype, backend="cuda", chunk_size=chunk_size,
                                   check_grads=check_grads, device=DEV, **kwargs)


# The correctness matrix (every objective, reduction, option, dtype, odd shapes, chunk sizes, stats,
# out-of-range targets) runs on the cuda backend through the `backend` fixture of
# tests/test_correctness.py; here only what the CPU suite cannot run.


@pytest.mark.parametrize("objective", ["ce", "dft", "focal", "prob", "entropy"])
def test_qwen_vocabulary(objective):
    """V 152064 (Qwen2.5's head): rows longer than any block, on the GPU only (too slow on CPU)."""
    x, w, b, t = make_inputs(17, 32, 152064, ignore="none")
    for reduction in REDUCTIONS:
        check(x, w, b, t, torch.float32, objective=objective, reduction=reduction, chunk_size=4)


# ---- the row contract directly, against the torch backend in float64 ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("vocab,offset", [(1, 0), (7, 1), (1000, 3), (4099, 5), (152064, 1)])
def test_row_contract(dtype, vocab, offset):
    """Misaligned rows (offset), ignored and out-of-range targets, per-row scale, forward-only call."""
    n = 12
    buf = (torch.randn(n * vocab + offset, dtype=torch.float64, device=DEV) * 3).to(dtype)
    logits = buf[offset:].view(n, vocab)
    target = torch.randint(0, vocab, (n,), device=DEV)
    target[2], target[5], target[9] = -100, vocab, -7
    params = make_loss_params("entropy", softcap=8.0, label_smoothing=0.1, z_loss=1e-3, with_stats=True)
    weights = torch.rand(n, device=DEV) + 0.5
    ref_logits = logits.double()
    scale = torch.rand(n, dtype=torch.float64, device=DEV) + 0.5
    ref = torch_backend.row_loss_grad(ref_logits, target, params, weights.double(), scale)
    if dtype == torch.float16:  # per-row loss scale to max |g| = 1 (float16 range)
        row_max = ref_logits.abs().amax(dim=1)
        factor = torch.where(row_max > 0, 1.0 / row_max, torch.ones_like(row_max))
        scale, ref_logits = scale * factor, ref_logits * factor[:, None]
    before, head_before = logits.clone(), buf[:offset].clone()
    fwd = cuda_backend.row_loss_grad(logits, target, params, weights)
    assert torch.equal(logits, before), "forward-only call modified logits"
    out = cuda_backend.row_loss_grad(logits, target, params, weights, scale.float())
    torch.cuda.synchronize()
    assert torch.equal(buf[:offset], head_before), "wrote outside the rows"
    for name in ("loss", "nll", "prob", "entropy"):
        assert torch.equal(getattr(fwd, name), getattr(out, name))
        assert rel_err(getattr(out, name), getattr(ref, name)) <= 1e-5, name
    assert torch.equal(out.correct, ref.correct.float())
    assert rel_err(logits, ref_logits) <= TOL[dtype]


def test_op_input_checks_name_the_argument():
    op = cuda_backend._op()
    logits = torch.randn(4, 10, device=DEV)
    target = torch.zeros(4, dtype=torch.long, device=DEV)
    args = (0, 0.0, 0.0, -100, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="grad_scale must have shape"):
        op(logits, target, None, torch.ones(3, device=DEV), *args)
    with pytest.raises(RuntimeError, match="target must be int64"):
        op(logits, target.int(), None, None, *args)
    with pytest.raises(RuntimeError, match="token_weights must be float32"):
        op(logits, target, torch.ones(4, device=DEV, dtype=torch.float64), None, *args)
    with pytest.raises(RuntimeError, match="kernel_id must be in"):
        op(logits, target, None, None, 9, *args[1:])
    with pytest.raises(RuntimeError, match="logits rows must be contiguous"):
        op(torch.randn(10, 4, device=DEV).t(), target, None, None, *args)


def test_auto_falls_back_to_cuda_when_triton_raises(monkeypatch, caplog):
    broken = types.ModuleType("broken_triton")
    broken.is_available = lambda device: (True, "")

    def row_loss_grad(*a, **k):
        raise RuntimeError("simulated Triton compile failure")

    broken.row_loss_grad = row_loss_grad
    broken.supports = lambda path, params: "" if path == "rows" else "no factored kernel"
    monkeypatch.setitem(sys.modules, "broken_triton", broken)
    monkeypatch.setitem(backends.BACKENDS, "triton", "broken_triton")
    monkeypatch.setattr(backends, "_logged", set())
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    x, w, b, t = make_inputs(33, 16, 1000)
    loss = dk.linear_cross_entropy(x.to(DEV), w.to(DEV), t.to(DEV), bias=b.to(DEV), backend="auto")
    ref = dk.reference.linear_cross_entropy(x.double(), w.double(), t, bias=b.double())
    assert rel_err(loss.cpu(), ref) <= 1e-5
    assert backends.candidates("auto", DEV)[:2] == ("triton", "cuda")  # the next call tries triton again
    assert any("simulated Triton compile failure" in r.getMessage() and "'cuda'" in r.getMessage()
               for r in caplog.records)
