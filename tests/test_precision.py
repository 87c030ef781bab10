"""Precision paths the CPU suite would otherwise not reach: the CUDA GEMM policy for float16
(run on CPU with an exact emulation of cuBLAS' ``mm(out_dtype=float32)``), ``torch.autocast``
around float32 tensors, and float64 inputs end to end (docs/design.md, Precision policy)."""

import pytest
import torch

import dft_kernels as dk
from helpers import OBJECTIVES, TOL, leaf, make_inputs, obj_id, rel_err

LOSS_SCALE = 65536.0  # torch.amp.GradScaler's initial scale


def _reference_grads(x, w, t, grad_out, reduction, chunk=256, **kw):
    """float64 loss and (dx, dw) of the reference for ``loss.backward(grad_out)``, rows in chunks."""
    wd = w.double()
    n_valid = (t != -100).sum().clamp_min(1).double()
    dx = torch.empty(x.shape, dtype=torch.float64)
    dw = torch.zeros(w.shape, dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        xc, wc = x[s:s + chunk].double().requires_grad_(), wd.detach().requires_grad_()
        loss_c = dk.reference.linear_cross_entropy(xc, wc, t[s:s + chunk], reduction="none", **kw)
        g = grad_out / n_valid if reduction == "mean" else grad_out[s:s + chunk]
        gx, gw = torch.autograd.grad((loss_c * g).sum(), [xc, wc])
        dx[s:s + chunk] = gx
        dw += gw
    return dx, dw


@pytest.mark.parametrize("reduction,objective,v", [("mean", "dft", 32000), ("none", "ce", 4096)])
def test_fp16_gradients_under_a_loss_scale_cuda_policy(cuda_gemm_policy, reduction, objective, v):
    """float16 with GradScaler's scale 65536 under the CUDA policy: the 1/N-scaled DFT gradient
    (entries ~p/N, p ~ 1/V) must not flush to zero when cast to float16 (mean; at the shape of
    the fp16 GPU test, tests/backends/test_triton_gpu.py, dX was 73% and dW 20% off before the fix), nor
    overflow float16 when grad_output carries the scale (none: CE's target entry is ~ -1)."""
    n, h = 256, 256
    g = torch.Generator().manual_seed(11)
    # none: small hidden states, so that dW at the loss scale itself fits float16
    x = (torch.randn(n, h, generator=g) / (1 if reduction == "mean" else 16)).to(torch.float16)
    w = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(torch.float16)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.1] = -100
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = dk.linear_cross_entropy(xs, ws, t, objective=objective, reduction=reduction, backend="torch",
                                  chunk_size=128)
    grad_out = torch.full(loss.shape, LOSS_SCALE, dtype=torch.float64)
    if reduction == "none":
        grad_out = grad_out * (torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
    loss.backward(grad_out.to(loss.dtype))
    rdx, rdw = _reference_grads(x, w, t, grad_out, reduction, objective=objective)
    assert torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all()
    assert rel_err(xs.grad, rdx) <= TOL[torch.float16], f"input grad {rel_err(xs.grad, rdx):.2e}"
    assert rel_err(ws.grad, rdw) <= TOL[torch.float16], f"weight grad {rel_err(ws.grad, rdw):.2e}"


def _loss_and_grads(x, w, b, t, reduction, **kw):
    x, w, b = (a.detach().clone().requires_grad_() for a in (x, w, b))
    loss = dk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, backend="torch", chunk_size=8, **kw)
    loss.backward(torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)).to(loss.dtype) + 0.5)
    return loss.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("policy", ["cpu", "cuda-emulated"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_equals_the_loss_on_cast_inputs(request, policy, reduction):
    """Under torch.autocast, float32 inputs give the loss (and gradients) of the same inputs cast to
    the autocast dtype, with the bf16 precision policy; gradients come back in float32.  Before the
    fix the ops fell through autocast and their float32 GEMMs silently ran in bfloat16."""
    if policy == "cuda-emulated":
        request.getfixturevalue("cuda_gemm_policy")
    g = torch.Generator().manual_seed(5)
    n, h, v = 24, 32, 300
    x, w, b = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h ** 0.5, torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    expected = _loss_and_grads(x.bfloat16(), w.bfloat16(), b.bfloat16(), t, reduction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(x, w, b, t, reduction)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], expected[0])
    for gg, eg in zip(got[1:], expected[1:]):
        assert gg.dtype == torch.float32
        assert torch.equal(gg, eg.float())


def test_autocast_compiles_fullgraph():
    """A training step with autocast around the loss compiles with fullgraph=True (no graph break)."""
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(16, 32, generator=g), torch.randn(200, 32, generator=g) / 32 ** 0.5
    t = torch.randint(0, 200, (16,), generator=g)

    def step(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = dk.linear_cross_entropy(x, w, t, backend="torch", validate=False, chunk_size=8)
        loss.backward()
        return loss.detach()

    torch._dynamo.reset()
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(xs, ws)
    xe, we = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    expected = dk.linear_cross_entropy(xe, we, t, backend="torch", chunk_size=8)
    expected.backward()
    assert rel_err(loss, expected) <= 1e-6
    assert xs.grad.dtype == torch.float32 and rel_err(xs.grad, xe.grad) <= 1e-2 and rel_err(ws.grad, we.grad) <= 1e-2


# ---------------------------------------------------------------- float64 end to end


@pytest.mark.parametrize("objective", ["ce", "focal", "prob"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck_float64(objective, reduction):
    """torch.autograd.gradcheck (finite differences in float64) of input, weight and bias; before
    the fix per-token losses and the mean divisor were float32 and it failed even for ce/sum.
    DFT-type objectives (a stop-gradient weight) have by definition a gradient that is not the
    derivative of their loss value: the next test checks them against the reference instead."""
    g = torch.Generator().manual_seed(8)
    n, h, v = 6, 5, 7
    x = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[1] = -100

    def loss(x, w, b):
        return dk.linear_cross_entropy(x, w, t, bias=b, objective=objective, reduction=reduction,
                                       backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(loss, (x, w, b))


@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_fast_path_matches_reference(objective, reduction):
    """float64 inputs: loss, stats and gradients of the fast path agree with the float64 reference
    to 1e-10 (stats are float64 for float64 inputs; docs/api.md)."""
    x, w, b, t = make_inputs(20, 12, 50, torch.float64, seed=9)
    tw = torch.rand(t.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    kw = dict(bias=b, objective=objective, reduction=reduction, token_weights=tw)
    if dk.get_objective(objective).is_weighted_nll:
        kw.update(label_smoothing=0.1, z_loss=1e-3)
    grad_out = torch.rand(() if reduction != "none" else t.shape, dtype=torch.float64) + 0.5
    outs = []
    for fn, extra in ((dk.linear_cross_entropy, dict(backend="torch", chunk_size=8)),
                      (dk.reference.linear_cross_entropy, {})):
        xs, ws, bs = leaf(x), leaf(w), leaf(b)
        loss, stats = fn(xs, ws, t, return_stats=True, **{**kw, "bias": bs}, **extra)
        loss.backward(grad_out)
        outs.append((loss, xs.grad, ws.grad, bs.grad, stats))
    (loss, dx, dw, db, stats), (rloss, rdx, rdw, rdb, rstats) = outs
    assert loss.dtype == torch.float64 and stats.nll.dtype == torch.float64
    for name, got, want in (("loss", loss, rloss), ("input", dx, rdx), ("weight", dw, rdw), ("bias", db, rdb),
                            ("nll", stats.nll, rstats.nll), ("mean_prob", stats.mean_prob, rstats.mean_prob),
                            ("accuracy", stats.accuracy, rstats.accuracy)):
        assert rel_err(got, want) <= TOL[torch.float64], f"{name}: {rel_err(got, want):.2e}"
    if rstats.entropy is not None:
        assert rel_err(stats.entropy, rstats.entropy) <= TOL[torch.float64]
