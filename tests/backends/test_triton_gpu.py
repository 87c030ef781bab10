"""The triton backend on a CUDA GPU at real LM-head shapes, against the float64 reference.

Every test carries the ``gpu`` marker (skipped cleanly without CUDA, see conftest).  The
float64 reference is computed in chunks of rows so that its [rows, V] logits stay bounded;
its dW is accumulated over the chunks in float64.
"""

import pytest
import torch

import dft_kernels as dk
from helpers import TOL, make_inputs, rel_err

pytestmark = pytest.mark.gpu

REF_ROWS = 256

# (name, V, H): Llama-3-8B's head, and Qwen2.5-Math-1.5B's vocabulary with a smaller H
SHAPES = [("llama3-8b", 128256, 4096), ("qwen2.5-math-1.5b", 151936, 1536)]


def _inputs(n, h, v, dtype, seed):
    x, w, _, t = make_inputs(n, h, v, dtype, bias=False, seed=seed, device="cuda", ignore_fraction=0.1)
    return x, w, t


def chunked_reference(x, w, t, grad_out, reduction, **kw):
    """float64 loss (mean or per-token) and grads (dx, dw) of the reference, rows chunk by chunk."""
    n = x.shape[0]
    n_valid = (t != -100).sum().clamp_min(1).double()
    wd = w.double()
    dx = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    dw = torch.zeros(w.shape, dtype=torch.float64, device=x.device)
    per_token = torch.empty(n, dtype=torch.float64, device=x.device)
    for s in range(0, n, REF_ROWS):
        e = min(s + REF_ROWS, n)
        xc = x[s:e].double().requires_grad_()
        wc = wd.detach().requires_grad_()
        loss_c = dk.reference.linear_cross_entropy(xc, wc, t[s:e], reduction="none", **kw)
        per_token[s:e] = loss_c.detach()
        weight = {"mean": lambda: grad_out / n_valid, "sum": lambda: grad_out}.get(reduction, lambda: grad_out[s:e])()
        gx, gw = torch.autograd.grad((loss_c * weight).sum(), [xc, wc])
        dx[s:e] = gx
        dw += gw
        del gx, gw, loss_c, wc
    loss = {"mean": lambda: per_token.sum() / n_valid, "sum": per_token.sum}.get(reduction, lambda: per_token)()
    return loss, dx, dw


def _check(x, w, t, reduction, loss_scale=1.0, **kw):
    """``loss_scale`` multiplies the incoming gradient, as a GradScaler's scale does."""
    dtype = x.dtype
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = dk.linear_cross_entropy(xs, ws, t, backend="triton", reduction=reduction, **kw)
    shape = (x.shape[0],) if reduction == "none" else ()
    grad_out = (torch.rand(shape, dtype=torch.float64, device="cuda") + 0.5) * loss_scale
    loss.backward(grad_out.to(loss.dtype))
    ref, rdx, rdw = chunked_reference(x, w, t, grad_out, reduction, **kw)
    tol = TOL[dtype]
    if dtype == torch.float16:
        # well-posed in float16: the exact gradients lie in its normal range (else they underflow
        # whatever computes them), bar a negligible share of the norm
        for g in (rdx, rdw):
            tiny = g.abs() < torch.finfo(torch.float16).tiny
            assert g.abs().max() < torch.finfo(torch.float16).max / 4
            assert g[tiny].norm() <= 1e-3 * g.norm(), "test not well-posed in float16: raise the loss scale"
    assert torch.isfinite(loss).all() and torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all()
    assert rel_err(loss, ref) <= tol, f"loss {rel_err(loss, ref):.2e}"
    assert rel_err(xs.grad, rdx) <= tol, f"input grad {rel_err(xs.grad, rdx):.2e}"
    assert rel_err(ws.grad, rdw) <= tol, f"weight grad {rel_err(ws.grad, rdw):.2e}"


@pytest.mark.parametrize("objective", ["dft", "ce", dk.DFT(min_weight=0.1), "entropy", "focal", "prob"],
                         ids=lambda o: o if isinstance(o, str) else repr(o))
@pytest.mark.parametrize("name,v,h", SHAPES, ids=[s[0] for s in SHAPES])
def test_real_head_bf16(name, v, h, objective):
    x, w, t = _inputs(4096, h, v, torch.bfloat16, seed=int(torch.randint(0, 2**31 - 1, ())))
    _check(x, w, t, "mean", objective=objective)


@pytest.mark.parametrize("name,v,h", SHAPES, ids=[s[0] for s in SHAPES])
def test_real_head_bf16_options_per_token(name, v, h):
    x, w, t = _inputs(4096, h, v, torch.bfloat16, seed=7)
    _check(x, w, t, "none", objective="chord", softcap=30.0, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("dtype,reduction,loss_scale",
                         [(torch.float16, "sum", 2.0 ** 15), (torch.float32, "mean", 1.0)],
                         ids=["fp16-sum-scaled", "fp32-mean"])
def test_fp16_and_fp32_heads(dtype, reduction, loss_scale):
    """float16 as it is trained: with a loss scale.  At random init the DFT weight is p ~ 1e-6, so
    unscaled gradients (mean: ~1e-11 per entry; sum: median ~4e-8 in dX) underflow float16; the
    sum times 2^15 puts them in its normal range (max |dX| ~ 7, |dW| ~ 100), as a GradScaler would."""
    x, w, t = _inputs(1024, 1024, 128256, dtype, seed=11)
    _check(x, w, t, reduction, loss_scale=loss_scale, objective="dft", chunk_size=512)


def test_autotune_path():
    x, w, t = _inputs(512, 1024, 151936, torch.bfloat16, seed=13)
    _check(x, w, t, "mean", objective="entropy", chunk_size=256, autotune=True)


def test_auto_picks_triton_on_cuda():
    assert dk.backends.candidates("auto", torch.device("cuda"))[0] == "triton"


def test_compiled_step_on_gpu():
    x, w, t = _inputs(1024, 1024, 32000, torch.bfloat16, seed=17)

    def step(inp, weight, target):
        loss = dk.linear_cross_entropy(inp, weight, target, backend="triton", validate=False)
        loss.backward()
        return loss.detach()

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = compiled(xs, ws, t)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = step(xe, we, t)
    assert rel_err(loss, eager) <= 1e-5
    assert rel_err(xs.grad, xe.grad) <= 1e-5 and rel_err(ws.grad, we.grad) <= 1e-5
