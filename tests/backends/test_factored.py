"""The factored gradient: the triton kernel's one-read path (``row_loss_grad_factored``) and the
chunk loop that applies its per-row factor in the GEMMs.

``row_scale[:, None] * G~`` must be the gradient the two-pass kernel writes, entry by entry (one
16-bit rounding each), with the same losses and stats; rows whose max runs more than 40 nats above
the target take the rescale branch and stay float32-accurate against the float64 reference; the
chunk loop, with cuBLAS's precision policy emulated on CPU, gives the reference's loss and
gradients within 3x the two-pass path's error, and really takes the factored path.
"""

import logging
import types

import pytest
import torch

import dft_kernels as dk
from dft_kernels import backends, chunked
from dft_kernels.backends import triton as tb
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.options import make_loss_params
from helpers import leaf, make_inputs, rel_err

pytestmark = pytest.mark.skipif(not tb._interpreting(), reason="runs the triton kernel under TRITON_INTERPRET=1")

OBJ_NAMES = list(OBJECTIVES)


def _grads(logits, target, params, tw, scale, grad_dtype, in_place):
    """(two-pass gradient, two-pass outputs, factored matrix, row_scale, factored outputs)."""
    n, v = logits.shape
    two = torch.empty(n, v, dtype=grad_dtype)
    ref_out = tb.row_loss_grad(logits.clone(), target, params, tw, scale, grad_out=two)
    row_scale = torch.full((n,), float("nan"))
    if in_place:
        g = logits.clone()
        out = tb.row_loss_grad_factored(g, target, params, tw, scale, None, row_scale)
    else:
        g = torch.full((n, v), float("nan"), dtype=grad_dtype)
        out = tb.row_loss_grad_factored(logits, target, params, tw, scale, g, row_scale)
    return two, ref_out, g, row_scale, out


@pytest.mark.parametrize("objective", OBJ_NAMES)
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("layout", ["fp32->fp32", "fp32->bf16", "bf16-in-place", "fp16->fp32"])
def test_factored_is_the_two_pass_gradient(objective, softcap, layout, monkeypatch):
    monkeypatch.setattr(tb, "MAX_BLOCK_INTERPRETER", 512)  # several blocks per row
    n, v = 29, 1500
    in_dtype = {"fp32->fp32": torch.float32, "fp32->bf16": torch.float32, "bf16-in-place": torch.bfloat16,
                "fp16->fp32": torch.float16}[layout]
    grad_dtype = {"fp32->bf16": torch.bfloat16, "bf16-in-place": torch.bfloat16}.get(layout, torch.float32)
    logits = (torch.randn(n, v) * 3).to(in_dtype)
    logits[2, 700:1100] = float("-inf")  # a masked vocabulary slice, whole blocks included
    target = torch.randint(0, v, (n,))
    target[0], target[1], target[2] = -100, v + 5, 1200  # ignored, out of range, a row with a masked slice
    params = make_loss_params(objective, softcap=softcap, with_stats=True)
    tw = torch.rand(n)
    scale = torch.rand(n) + 0.5
    two, ref_out, g, row_scale, out = _grads(logits, target, params, tw, scale, grad_dtype, layout == "bf16-in-place")
    for a, b in zip(ref_out, out):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(g.float()).all() and torch.isfinite(row_scale).all()
    assert (row_scale[:2] == 0).all() and (g[:2].float() == 0).all()  # invalid rows: zeros, factor 0
    full = row_scale[:, None] * g.float()
    ref = two.float()
    # one rounding of the same value each side (grad_dtype), plus float32 exponentials of
    # arguments up to ~60 in magnitude (their rounding, 60 * 2^-24, is amplified by e^x)
    unit = (2.0 ** -7 if grad_dtype == torch.bfloat16 else 0.0) + 2.0 ** -16  # half an ulp each side: 2^-8
    tiny = ref.abs().max() * 1e-30
    worst = float(((full - ref).abs() / ref.abs()).nan_to_num().max())
    assert ((full - ref).abs() <= unit * ref.abs() + tiny).all(), worst


@pytest.mark.parametrize("objective", ["ce", "dft", "entropy"])
@pytest.mark.parametrize("softcap", [None, 60.0])
def test_rows_far_from_their_target_against_the_reference(objective, softcap, monkeypatch):
    """Rows whose max is more than 40 nats above the target logit move the shift and rescale
    what they wrote: max in the first block, in the last, rising twice, a -inf target."""
    monkeypatch.setattr(tb, "MAX_BLOCK_INTERPRETER", 256)
    n, v = 6, 1200
    logits = torch.randn(n, v, dtype=torch.float64) * 2
    target = torch.randint(0, v, (n,))
    target[0], logits[0, 10] = 1000, 50.0  # max in the first block, target far below
    logits[0, 1000] = -5.0
    target[1], logits[1, 1190] = 5, 55.0  # max in the last block
    target[2], logits[2, 300], logits[2, 900] = 0, 38.0, 79.0  # the max rises twice (p stays a normal float32)
    logits[2, 0] = -3.0
    target[3] = 400  # a masked (-inf) target, when there is no softcap
    logits[3, 400] = float("-inf") if softcap is None else -60.0
    target[4], logits[4, 600:] = 700, -70.0  # a long low tail containing the target
    logits[4, 3] = 0.0
    params = make_loss_params(objective, softcap=softcap, with_stats=True)
    z = logits.float()
    g = torch.empty(n, v)
    row_scale = torch.empty(n)
    out = tb.row_loss_grad_factored(z, target, params, None, torch.tensor(1.0), g, row_scale)
    zr = z.double().requires_grad_()
    loss = dk.reference.cross_entropy(zr, target, objective=objective, softcap=softcap, reduction="none")
    (dz,) = torch.autograd.grad(loss.sum(), zr)
    full = row_scale.double()[:, None] * g.double()
    finite = torch.isfinite(loss)
    assert torch.isfinite(full).all()
    for i in range(n):
        if finite[i]:
            assert abs(out.loss[i].double() - loss[i]) <= 1e-5 * abs(loss[i]) + 1e-6, i
        assert rel_err(full[i], dz[i]) <= 1e-5, (i, rel_err(full[i], dz[i]))


def test_options_it_does_not_factor_raise_and_write_nothing():
    logits = torch.randn(4, 100)
    target = torch.randint(0, 100, (4,))
    for opts, reason in ((dict(label_smoothing=0.1), "label smoothing"), (dict(z_loss=1e-4), "z-loss")):
        g = torch.full((4, 100), 7.0)
        row_scale = torch.full((4,), 7.0)
        params = make_loss_params("dft", **opts)
        assert reason in tb.supports("factored", params)
        with pytest.raises(ValueError, match=reason):
            tb.row_loss_grad_factored(logits, target, params, None, torch.tensor(1.0), g, row_scale)
        assert (g == 7.0).all() and (row_scale == 7.0).all()
    # below float32's range the option is off, as in the two-pass kernel
    assert tb.supports("factored", make_loss_params("dft", label_smoothing=1e-50)) == ""


def test_row_scale_is_checked():
    logits = torch.randn(4, 100)
    target = torch.randint(0, 100, (4,))
    params = make_loss_params("ce")
    for bad in (torch.empty(4, dtype=torch.float64), torch.empty(5), torch.empty(8)[::2]):
        with pytest.raises(ValueError, match="row_scale"):
            tb.row_loss_grad_factored(logits, target, params, None, torch.tensor(1.0), None, bad)


def _run(x, w, b, t, dtype, **kwargs):
    xs, ws, bs = leaf(x.to(dtype)), leaf(w.to(dtype)), leaf(None if b is None else b.to(dtype))
    out = dk.linear_cross_entropy(xs, ws, t, bias=bs, backend="triton", chunk_size=16, **kwargs)
    grad_out = torch.rand(out.shape, dtype=torch.float64) + 0.5
    ins = [a for a in (xs, ws, bs) if a is not None]
    return out, torch.autograd.grad(out, ins, grad_out.to(out.dtype)), grad_out


def _reference(x, w, b, t, dtype, grad_out, **kwargs):
    xr, wr = leaf(x.to(dtype).double()), leaf(w.to(dtype).double())
    br = leaf(None if b is None else b.to(dtype).double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, **kwargs)
    return ref, torch.autograd.grad(ref, [a for a in (xr, wr, br) if a is not None], grad_out)


@pytest.fixture
def spy(monkeypatch):
    """Counts the factored and the two-pass kernel calls."""
    calls = types.SimpleNamespace(factored=0, two_pass=0)
    real_f, real_r = tb.row_loss_grad_factored, tb.row_loss_grad

    def factored(*args, **kwargs):
        out = real_f(*args, **kwargs)
        calls.factored += out is not None
        return out

    def two_pass(*args, **kwargs):
        calls.two_pass += 1
        return real_r(*args, **kwargs)

    monkeypatch.setattr(tb, "row_loss_grad_factored", factored)
    monkeypatch.setattr(tb, "row_loss_grad", two_pass)
    return calls


@pytest.mark.parametrize("dtype,logits_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, None)])
@pytest.mark.parametrize("objective", ["ce", "dft", "focal"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_loop_with_the_factored_gradient(cuda_gemm_policy, spy, monkeypatch, dtype, logits_dtype, objective,
                                               reduction):
    """Same loss as the two-pass path, gradients within 3x its error against the float64 reference
    (the factored dW rounds the scaled x rows once more), and the factored kernel really ran."""
    x, w, _, t = make_inputs(40, 32, 400, bias=False)
    kw = dict(objective=objective, reduction=reduction, logits_dtype=logits_dtype, softcap=30.0)
    out_f, grads_f, grad_out = _run(x, w, None, t, dtype, **kw)
    chunks = spy.factored
    assert chunks >= 2 and spy.two_pass == (chunks if reduction == "none" else 0)  # none: forward is loss-only
    spy.factored = spy.two_pass = 0
    out_t, grads_t, _ = _run(x, w, None, t, dtype, factored=False, **kw)
    assert spy.factored == 0 and spy.two_pass == (2 * chunks if reduction == "none" else chunks)
    assert torch.equal(out_f, out_t)
    _, refs = _reference(x, w, None, t, dtype, grad_out, **kw)
    for name, gf, gt, rg in zip(("input", "weight"), grads_f, grads_t, refs):
        assert gf.dtype == dtype and torch.isfinite(gf).all()
        e_f, e_t = rel_err(gf, rg), rel_err(gt, rg)
        assert e_f <= 3 * e_t + 1e-6, f"{name}: factored {e_f:.3e} > 3x two-pass {e_t:.3e}"


@pytest.mark.parametrize("case", ["bias", "float16", "label_smoothing", "given logits"])
def test_where_the_gradient_is_not_factored(cuda_gemm_policy, spy, case):
    x, w, b, t = make_inputs(24, 16, 200, bias=case == "bias")
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    kw = dict(label_smoothing=0.1) if case == "label_smoothing" else {}
    if case == "given logits":
        z = leaf((x @ w.t()).to(dtype))
        dk.cross_entropy(z, t, backend="triton", **kw).backward()
    else:
        _run(x, w, b, t, dtype, **kw)
    assert spy.factored == 0 and spy.two_pass > 0


@pytest.mark.parametrize("case", ["bias", "float16", "label_smoothing"])
def test_factored_true_where_it_does_not_apply_raises_with_the_reason(cuda_gemm_policy, case):
    x, w, b, t = make_inputs(24, 16, 200, bias=case == "bias")
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    kw = dict(label_smoothing=0.1) if case == "label_smoothing" else {}
    reason = {"bias": "bias", "float16": "float16", "label_smoothing": "label smoothing"}[case]
    with pytest.raises(ValueError, match=f"factored=True: .*{reason}"):
        _run(x, w, b, t, dtype, factored=True, **kw)


def test_auto_falls_back_to_the_two_pass_kernel_for_the_call_when_the_factored_one_raises(monkeypatch, caplog):
    """backend="auto": a factored kernel that raises hands the rest of the call to the next step,
    with a logged reason; the next call tries it again (nothing is switched off for the process)."""
    mod = types.ModuleType("fake_factored")
    mod.calls = 0

    def row_loss_grad_factored(*args):
        mod.calls += 1
        raise RuntimeError("ptxas: out of registers")

    mod.row_loss_grad_factored, mod.row_loss_grad = row_loss_grad_factored, lambda *a, **k: "two-pass"
    monkeypatch.setattr(chunked, "get_backend", lambda name: mod)
    monkeypatch.setattr(backends, "_logged", set())
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    opts = dk.options.LossOptions(backend="auto")
    plan = dk.options.LossPlan(opts, (("triton", "factored"), ("triton", "rows")), 8, torch.float32, torch.float32,
                               torch.float32, True, True)
    scale, grad = torch.ones(()), torch.empty(2, 3)
    for call in range(1, 3):
        rows = chunked.RowSteps(plan)
        assert rows(None, None, None, scale, grad, torch.empty(2)) == ("two-pass", None)
        assert rows(None, None, None, scale, grad, torch.empty(2)) == ("two-pass", None)  # the rest of the call
        assert mod.calls == call
    messages = [r.getMessage() for r in caplog.records if r.name == "dft_kernels"]
    assert len(messages) == 1 and "factored" in messages[0] and "out of registers" in messages[0]


def test_a_named_backend_raises_instead_of_falling_back(monkeypatch):
    mod = types.ModuleType("fake_factored")
    mod.row_loss_grad_factored = lambda *a: (_ for _ in ()).throw(RuntimeError("ptxas: out of registers"))
    monkeypatch.setattr(chunked, "get_backend", lambda name: mod)
    opts = dk.options.LossOptions(backend="triton")
    plan = dk.options.LossPlan(opts, (("triton", "factored"),), 8, torch.float32, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="out of registers"):
        chunked.RowSteps(plan)(None, None, None, torch.ones(()), torch.empty(2, 3), torch.empty(2))
