"""dk.cross_entropy on given logits, and the DFT identity of docs/design.md, Math."""

import pytest
import torch

import dft_kernels as dk
from helpers import OBJECTIVES, TOL, obj_id, rel_err, skip_if_declined


@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_entropy_matches_reference(backend, objective, reduction, dtype):
    skip_if_declined(backend, objective)
    logits = (torch.randn(3, 11, 700, dtype=torch.float64) * 2).to(dtype)
    target = torch.randint(0, 700, (3, 11))
    target[0, :4] = -100
    kw = dict(objective=objective, reduction=reduction, softcap=20.0, shift=True)
    ours_in = logits.clone().requires_grad_()
    before = ours_in.detach().clone()
    out = dk.cross_entropy(ours_in, target, backend=backend, chunk_size=5, **kw)
    assert torch.equal(ours_in.detach(), before), "the caller's logits must not be modified"
    ref_in = logits.double().requires_grad_()
    ref = dk.reference.cross_entropy(ref_in, target, **kw)
    tol = TOL[dtype]
    assert out.shape == ref.shape and rel_err(out, ref) <= tol
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, ours_in, go.to(out.dtype))
    (rg,) = torch.autograd.grad(ref, ref_in, go)
    assert g.dtype == dtype and rel_err(g, rg) <= tol


def test_dft_logits_gradient_is_the_gradient_of_minus_p(backend):
    """-sg(p) log p and -p have the same gradient wrt the logits: d(-p)/dz = p (softmax - onehot)."""
    z = torch.randn(40, 300, dtype=torch.float64) * 3
    t = torch.randint(0, 300, (40,))
    z32 = z.float().requires_grad_()
    dk.cross_entropy(z32, t, objective="dft", reduction="sum", backend=backend).backward()
    z64 = z.clone().requires_grad_()
    minus_p = -torch.softmax(z64, -1).gather(1, t[:, None]).sum()
    (g_minus_p,) = torch.autograd.grad(minus_p, z64)
    assert rel_err(z32.grad, g_minus_p) <= 1e-5
    # and it is not the CE gradient
    zce = z.float().requires_grad_()
    dk.cross_entropy(zce, t, objective="ce", reduction="sum", backend=backend).backward()
    assert rel_err(zce.grad, g_minus_p) > 0.1


def test_ce_matches_torch_cross_entropy_with_smoothing(backend):
    z = torch.randn(30, 200) * 2
    t = torch.randint(0, 200, (30,))
    t[:3] = -100
    ours = dk.cross_entropy(z, t, objective="ce", label_smoothing=0.1, backend=backend)
    want = torch.nn.functional.cross_entropy(z.double(), t, label_smoothing=0.1)
    assert rel_err(ours, want) <= 1e-6


@pytest.mark.skipif(not hasattr(torch.nn.functional, "linear_cross_entropy"),
                    reason=f"F.linear_cross_entropy needs torch >= 2.13 (this is {torch.__version__})")
def test_linear_ce_matches_torch_linear_cross_entropy(backend):
    x, w = torch.randn(50, 16), torch.randn(300, 16) * 0.5
    t = torch.randint(0, 300, (50,))
    ours = dk.linear_cross_entropy(x, w, t, objective="ce", backend=backend, chunk_size=8)
    want = torch.nn.functional.linear_cross_entropy(x.double(), w.double(), t)
    assert rel_err(ours, want) <= 1e-6


def test_focal_below_one_at_p_equal_one(backend):
    """Focal with gamma < 1 where p == 1 exactly (V = 1, and a row whose other logits are 60
    below): the true gradient is 0 there; the reference gave NaN (inf * 0 in autograd)."""
    for logits, target in ((torch.randn(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.int64)),
                           (torch.cat([torch.full((2, 1), 60.0), torch.randn(2, 40)], 1).double(),
                            torch.tensor([0, 0]))):
        for objective in (dk.Focal(gamma=0.5), dk.Focal(gamma=0.0), dk.Focal(gamma=2.0)):
            ours_in = logits.float().requires_grad_()
            ref_in = logits.clone().requires_grad_()
            out = dk.cross_entropy(ours_in, target, objective=objective, reduction="sum", backend=backend)
            ref = dk.reference.cross_entropy(ref_in, target, objective=objective, reduction="sum")
            (g,) = torch.autograd.grad(out, ours_in)
            (rg,) = torch.autograd.grad(ref, ref_in)
            assert torch.isfinite(rg).all() and torch.isfinite(g).all()
            assert abs(float(out) - float(ref)) <= 1e-6 and (g.double() - rg).abs().max() <= 1e-6
