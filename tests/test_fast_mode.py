"""The fast mode (``logits_dtype`` = the 16-bit input dtype: 16-bit chunk logits, float32 math in
the row kernel) against the float64 reference, bounded by the error of eager PyTorch on the same
16-bit logits: ours <= 3x eager's + 1e-6, over the option grid of the default mode
(tests/helpers.py option cases; docs/api.md lists the measured errors)."""

import pytest
import torch
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels.options import LossOptions
from helpers import LOSS_OPTIONS, leaf, make_inputs, option_cases, option_kwargs, rel_err

EPS = 1e-6


class _RoundGradient(torch.autograd.Function):
    """Identity forward; backward rounds the gradient once to ``dtype``."""

    @staticmethod
    def forward(ctx, z, dtype):
        ctx.dtype = dtype
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def check_fast_mode(x, w, b, t, dtype, backend="torch", chunk_size=16, **kwargs):
    xs, ws, bs = leaf(x.to(dtype)), leaf(w.to(dtype)), leaf(None if b is None else b.to(dtype))
    out = dk.linear_cross_entropy(xs, ws, t, bias=bs, backend=backend, chunk_size=chunk_size, logits_dtype=dtype,
                                  **kwargs)
    xr, wr, br = leaf(xs.double()), leaf(ws.double()), leaf(None if bs is None else bs.double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, **kwargs)
    # eager PyTorch on the same 16-bit logits: the 16-bit GEMM, then float32 math
    xe, we, be = leaf(xs), leaf(ws), leaf(bs)
    eager = dk.reference.cross_entropy(F.linear(xe, we, be).float(), t, **kwargs)
    # the mode's own error: the float64 reference on its logits rounded once to 16 bits, with
    # and without their gradient rounded once to 16 bits on the way back (as the GEMMs read it),
    # and (mean/sum) rounded for grad_output = 1 and scaled after.  A gradient that sums many
    # cancelling terms (a bias gradient) has a relative error that is mostly rounding noise, 3x
    # apart between such draws: one eager draw is a noisy scale, so the largest of these draws is
    xq, wq, bq = leaf(xs.double()), leaf(ws.double()), leaf(None if bs is None else bs.double())
    zq = F.linear(xq, wq, bq)
    zq = zq + (zq.to(dtype).double() - zq).detach()
    rounded = dk.reference.cross_entropy(_RoundGradient.apply(zq, dtype), t, **kwargs)
    unrounded = dk.reference.cross_entropy(zq, t, **kwargs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    e_ours, e_eager, e_mode = rel_err(out, ref), rel_err(eager, ref), rel_err(rounded, ref)
    assert e_ours <= 3 * max(e_eager, e_mode) + EPS, \
        f"loss rel err {e_ours:.3e} > 3x max(eager {e_eager:.3e}, rounded logits {e_mode:.3e})"
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    if dtype == torch.float16:  # a loss scale, as GradScaler runs float16 training
        grad_out = grad_out * (2.0 ** 14 if kwargs.get("reduction", "mean") == "mean" else 2.0 ** 8)
    ins = [a for a in (xs, ws, bs) if a is not None]
    ours = torch.autograd.grad(out, ins, grad_out.to(out.dtype))
    refs = torch.autograd.grad(ref, [a for a in (xr, wr, br) if a is not None], grad_out)
    eagers = torch.autograd.grad(eager, [a for a in (xe, we, be) if a is not None], grad_out.to(eager.dtype))
    q_ins = [a for a in (xq, wq, bq) if a is not None]
    draws = [torch.autograd.grad(rounded, q_ins, grad_out, retain_graph=True),
             torch.autograd.grad(unrounded, q_ins, grad_out, retain_graph=True)]
    if grad_out.dim() == 0:  # mean/sum: the gradient rounded for grad_output = 1, scaled after (as ours)
        draws.append([g * grad_out for g in torch.autograd.grad(rounded, q_ins, torch.ones_like(grad_out))])
    for i, (name, g, rg, ge, a) in enumerate(zip(("input", "weight", "bias"), ours, refs, eagers, ins)):
        assert g.dtype == a.dtype and g.shape == a.shape and torch.isfinite(g).all()
        # each draw rounded to the returned dtype, as ours and eager's are
        e_mode = max(rel_err(d[i].to(a.dtype).double(), rg) for d in draws)
        e_ours, e_eager = rel_err(g, rg), rel_err(ge, rg)
        # a 16-bit gradient cannot beat its own rounding: where eager's error happens to fall below
        # two roundings of the reference (tiny gradients dominated by one entry), that is the scale
        e_round = rel_err(rg.to(a.dtype).double(), rg)
        bound = 3 * max(e_eager, e_mode, 2 * e_round) + EPS
        assert e_ours <= bound, (f"{name} grad rel err {e_ours:.3e} > 3x max(eager {e_eager:.3e}, rounded logits "
                                 f"{e_mode:.3e}, 2x rounding {e_round:.3e})")


@pytest.mark.parametrize("objective,option,reduction", option_cases(LOSS_OPTIONS))
def test_fast_mode_option_grid_bf16(objective, option, reduction):
    lead = (3, 11) if option == "shift" else None
    x, w, b, t = make_inputs(33, 24, 300, lead=lead)
    check_fast_mode(x, w, b, t, torch.bfloat16, objective=objective, reduction=reduction,
                    **option_kwargs(LOSS_OPTIONS, option, t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["ce", "dft", "entropy"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fast_mode_cuda_policy(cuda_gemm_policy, backend, dtype, objective, reduction):
    x, w, b, t = make_inputs(40, 32, 400)
    check_fast_mode(x, w, b, t, dtype, backend=backend, objective=objective, reduction=reduction)


def test_fast_mode_is_opt_in_and_checked():
    x, w, _, t = make_inputs(8, 8, 50, dtype=torch.bfloat16)
    assert LossOptions().logits_dtype is None
    with pytest.raises(ValueError, match="logits_dtype"):
        dk.linear_cross_entropy(x.float(), w.float(), t, logits_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="logits_dtype"):
        dk.linear_cross_entropy(x, w, t, logits_dtype=torch.float32)
    with pytest.raises(TypeError, match="logits_dtype"):
        dk.LinearCrossEntropyLoss(logits_dtype="bf16")
    # the default mode (float32 logits) and the fast mode differ: the option is not ignored
    a = dk.linear_cross_entropy(x, w, t, backend="torch")
    f = dk.linear_cross_entropy(x, w, t, backend="torch", logits_dtype=torch.bfloat16)
    assert a.dtype == f.dtype == torch.float32 and not torch.equal(a, f)
