"""The cuda backend (csrc/ kernel) on a GPU: the correctness suite of the other backends.

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
    LOSS_OPTIONS,
    OBJECTIVES,
    TOL,
    WEIGHTED_NLL,
    check_linear_against_reference,
    make_inputs,
    obj_id,
    option_cases,
    option_kwargs,
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


@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_objective_reduction_fp32(objective, reduction, bias):
    x, w, b, t = make_inputs(37, 32, 1000, bias=bias)
    check(x, w, b, t, torch.float32, objective=objective, reduction=reduction)


@pytest.mark.parametrize("objective,option,reduction", option_cases(LOSS_OPTIONS))
def test_options_fp32(objective, option, reduction):
    lead = (3, 13) if option == "shift" else None
    x, w, b, t = make_inputs(39, 24, 1000, lead=lead)
    kwargs = option_kwargs(LOSS_OPTIONS, option, t)
    check(x, w, b, t, torch.float32, objective=objective, reduction=reduction, **kwargs)


@pytest.mark.parametrize("objective", ["ce", "dft", "focal", "entropy"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(objective, ignore, reduction):
    x, w, b, t = make_inputs(29, 16, 500, ignore=ignore, ignore_index=7)
    check(x, w, b, t, torch.float32, objective=objective, reduction=reduction, ignore_index=7)


@pytest.mark.parametrize("objective", ["ce", "dft", "focal", "prob", "entropy"])
@pytest.mark.parametrize("n,h,v", [(5, 16, 32001), (1, 16, 1000), (1, 8, 3), (33, 8, 7), (17, 32, 152064)],
                         ids=["V32001", "N1", "N1V3", "Vtiny", "V152064"])
def test_odd_shapes(objective, n, h, v):
    x, w, b, t = make_inputs(n, h, v, ignore="none")
    for reduction in REDUCTIONS:
        check(x, w, b, t, torch.float32, objective=objective, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_chunk_sizes(chunk_size):
    x, w, b, t = make_inputs(50, 16, 300)
    check(x, w, b, t, torch.float32, chunk_size=chunk_size)


def test_non_contiguous_input():
    x, w, b, t = make_inputs(24, 16, 1000)
    x_nc = x.reshape(4, 6, 16).transpose(0, 1)
    t_nc = t.reshape(4, 6).t()
    for objective in ("dft", "ce"):
        check(x_nc, w, b, t_nc, torch.float32, objective=objective, reduction="none")
        check(x_nc, w, b, t_nc, torch.float32, objective=objective, shift=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision(dtype, objective, reduction):
    x, w, b, t = make_inputs(40, 32, 1000)
    check(x, w, b, t, dtype, objective=objective, reduction=reduction)


@pytest.mark.parametrize("objective", WEIGHTED_NLL, ids=obj_id)
def test_low_precision_options(objective):
    x, w, b, t = make_inputs(30, 32, 32001, lead=(3, 10))
    check(x, w, b, t, torch.bfloat16, objective=objective, softcap=10.0, z_loss=1e-3, label_smoothing=0.1,
          shift=True, token_weights=torch.rand(t.shape) + 0.5)


def test_stats_match_reference():
    x, w, b, t = make_inputs(40, 16, 700)
    kw = dict(objective="entropy", return_stats=True)
    _, stats = dk.linear_cross_entropy(x.to(DEV), w.to(DEV), t.to(DEV), bias=b.to(DEV), backend="cuda", **kw)
    _, rstats = dk.reference.linear_cross_entropy(x.double(), w.double(), t, bias=b.double(), **kw)
    for field in ("num_tokens", "nll", "mean_prob", "accuracy", "entropy"):
        got, want = getattr(stats, field).cpu().double(), getattr(rstats, field).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), field


def test_out_of_range_targets_masked_without_validation():
    x, w, b, t = make_inputs(20, 8, 100, ignore="none")
    bad, good = t.clone(), t.clone()
    bad[3], bad[7], bad[11] = 100, -5, 10**6
    good[3] = good[7] = good[11] = -100
    kw = dict(bias=b.to(DEV), backend="cuda", reduction="none")
    out_bad = dk.linear_cross_entropy(x.to(DEV), w.to(DEV), bad.to(DEV), validate=False, **kw)
    out_good = dk.linear_cross_entropy(x.to(DEV), w.to(DEV), good.to(DEV), **kw)
    assert torch.equal(out_bad, out_good)


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
