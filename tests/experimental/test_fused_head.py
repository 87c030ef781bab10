"""The experimental triton fused head (``fused_head=True``): the logits GEMM writes the factored
gradient, no logits tensor exists.

Against the row kernel on the same logits (materialised here for the check only): the same losses
and stats to float32 accuracy and the same gradient to one rounding, including rows whose max is
more than 40 nats above the target (recomputed tiles), ignored rows and tails of every tile size;
through the chunk loop, the float64 reference's loss and gradients within 3x the two-pass path's
error, with the fused head really taking every chunk.  Where it does not apply, the option raises
with the reason, and without it the chunk loop's own GEMMs serve the same call.  Its kernels
compile for sm_90 (wgmma) and sm_80 without spills or local memory (tests/codegen.py); nothing
here runs on a GPU.
"""

import types

import pytest
import torch

import dft_kernels as dk
from codegen import CAPABILITIES, run_script
from dft_kernels.backends import triton as tb
from dft_kernels.experimental import fused_head as tf
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.options import make_loss_params
from helpers import leaf, make_inputs, rel_err

interpreted = pytest.mark.skipif(not tb._interpreting(), reason="runs the triton kernels under TRITON_INTERPRET=1")


def _inputs(n, h, v, dtype, far_rows=True):
    x, w, _, t = make_inputs(n, h, v, dtype, bias=False, ignore="none")
    t[:3] = -100
    t[3] = v + 7  # out of range: ignored
    if far_rows:  # rows 4, 5: a max ~60 and ~95 nats above the target logit
        for row, gap in ((4, 60.0), (5, 95.0)):
            x[row] = 0
            x[row, 0] = 10
            w[(t[row] + 1) % v, 0] = gap / 10
            w[t[row], 0] = 0
    return x, w, t


@interpreted
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_head_is_the_row_kernel_on_materialised_logits(objective, dtype, softcap):
    n, h, v = 70, 45, 333  # no multiple of the interpreter's 32 x 64 x 32 tiles
    x, w, t = _inputs(n, h, v, dtype)
    params = make_loss_params(objective, softcap=softcap, with_stats=True)
    tw = torch.rand(n)
    scale = torch.rand(n) + 0.5
    z = x.float() @ w.float().t()  # exact products of the inputs, float32 sums: what the tiles compute
    want = torch.empty(n, v)
    ref = tb.row_loss_grad(z.clone(), t, params, tw, scale, grad_out=want)
    grad_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    g = torch.full((n, v), float("nan"), dtype=grad_dtype)
    row_scale = torch.full((n,), float("nan"))
    out = tf.linear_loss_grad_fused(x, w, t, params, tw, scale, g, row_scale)
    # one float32 sum order apart (the tiles and the gathered target dot vs the materialised GEMM):
    # nll = lse - z_y may differ by a few float32 ulps of the row's logits, whatever its own size
    ulps = 2.0 ** -20 * z.abs().amax(dim=1)
    for name, a, b in zip(out._fields, out, ref):
        if b is not None:
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a)), name
            bound = 1e-5 * b.abs() + 1e-6 + ulps
            assert ((a - b).abs()[finite] <= bound[finite]).all(), (name, (a - b).abs().max())
    assert torch.isfinite(g.float()).all() and torch.isfinite(row_scale).all()
    assert (row_scale[:4] == 0).all() and (g[:4].float() == 0).all()
    full = row_scale[:, None] * g.float()
    unit = (2.0 ** -7 if grad_dtype == torch.bfloat16 else 0.0) + 2.0 ** -12
    assert ((full - want).abs() <= unit * want.abs() + 1e-30 + 1e-6 * want.abs().max()).all(), \
        float(((full - want).abs() / want.abs()).nan_to_num().max())
    # forward only: the same outputs, nothing written
    fwd = tf.linear_loss_grad_fused(x, w, t, params, tw, None, None, None)
    for a, b in zip(fwd, out):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@interpreted
def test_fused_head_refuses_what_it_does_not_fuse():
    x, w, t = _inputs(8, 16, 50, torch.float32, far_rows=False)
    g = torch.full((8, 50), 7.0)
    for params, xx, ww in ((make_loss_params("dft", label_smoothing=0.1), x, w),
                           (make_loss_params("dft", z_loss=1e-4), x, w),
                           (make_loss_params("dft"), x.half(), w.half()),
                           (make_loss_params("dft"), x, w.double())):
        assert tf.linear_loss_grad_fused(xx, ww, t, params, None, torch.tensor(1.0), g, torch.empty(8)) is None
    assert (g == 7.0).all()
    with pytest.raises(ValueError, match="row_scale"):
        tf.linear_loss_grad_fused(x, w, t, make_loss_params("ce"), None, torch.tensor(1.0), g, None)


@pytest.fixture
def spy(monkeypatch):
    calls = types.SimpleNamespace(fused=0, row=0)
    real_fused = tf.linear_loss_grad_fused
    real_f, real_r = tb.row_loss_grad_factored, tb.row_loss_grad

    def fused(*args):
        out = real_fused(*args)
        calls.fused += out is not None
        return out

    def row(fn):
        def call(*args, **kwargs):
            calls.row += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(tf, "linear_loss_grad_fused", fused)
    monkeypatch.setattr(tb, "row_loss_grad_factored", row(real_f))
    monkeypatch.setattr(tb, "row_loss_grad", row(real_r))
    return calls


def _grads(x, w, b, t, dtype, **kwargs):
    """(loss, stats or None, gradients, grad_out) of ours on the triton backend."""
    xs, ws, bs = leaf(x.to(dtype)), leaf(w.to(dtype)), leaf(None if b is None else b.to(dtype))
    out = dk.linear_cross_entropy(xs, ws, t, bias=bs, backend="triton", chunk_size=16, **kwargs)
    out, stats = out if isinstance(out, tuple) else (out, None)
    grad_out = torch.rand(out.shape, dtype=torch.float64) + 0.5
    ins = [a for a in (xs, ws, bs) if a is not None]
    return out, stats, torch.autograd.grad(out, ins, grad_out.to(out.dtype)), grad_out


@interpreted
@pytest.mark.parametrize("dtype,logits_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, None)])
@pytest.mark.parametrize("objective", ["ce", "dft", "entropy"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_loop_with_the_fused_head(cuda_gemm_policy, spy, monkeypatch, dtype, logits_dtype, objective,
                                        reduction):
    x, w, _, t = make_inputs(40, 32, 300, bias=False)
    kw = dict(objective=objective, reduction=reduction, logits_dtype=logits_dtype, softcap=30.0, return_stats=True)
    out_f, stats_f, grads_f, grad_out = _grads(x, w, None, t, dtype, fused_head=True, **kw)
    assert spy.fused >= 2 and spy.row == 0
    out_t, stats_t, grads_t, _ = _grads(x, w, None, t, dtype, factored=False, **kw)
    kw.pop("return_stats")
    xr, wr = leaf(x.to(dtype).double()), leaf(w.to(dtype).double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, **kw)
    refs = torch.autograd.grad(ref, [xr, wr], grad_out)
    assert rel_err(out_f, ref) <= max(3 * rel_err(out_t, ref), 1e-6)
    # the same statistics as the two-pass path on float32 logits (the fast mode rounds its logits)
    for name in ("num_tokens", "nll", "mean_prob", "accuracy", "entropy") if logits_dtype is None else ():
        a, b = getattr(stats_f, name), getattr(stats_t, name)
        assert (a is None) == (b is None), name
        assert a is None or abs(float(a) - float(b)) <= 1e-5 * abs(float(b)) + 1e-6, name
    for name, gf, gt, rg in zip(("input", "weight"), grads_f, grads_t, refs):
        e_f, e_t = rel_err(gf, rg), rel_err(gt, rg)
        assert gf.dtype == dtype and e_f <= 3 * e_t + 1e-6, f"{name}: fused {e_f:.3e} > 3x two-pass {e_t:.3e}"


@interpreted
@pytest.mark.parametrize("case,reason", [("bias", "bias"), ("label_smoothing", "label smoothing"),
                                         ("float16", "float16")])
def test_fused_head_where_it_does_not_apply(cuda_gemm_policy, spy, case, reason):
    """``fused_head=True`` where the fused head does not apply raises with the reason, before any
    kernel runs; without the option the chunk loop's own GEMMs serve the same call."""
    x, w, b, t = make_inputs(24, 16, 200, bias=case == "bias")
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    kw = dict(label_smoothing=0.1) if case == "label_smoothing" else {}
    with pytest.raises(ValueError, match=f"fused_head: .*{reason}"):
        _grads(x, w, b, t, dtype, fused_head=True, **kw)
    assert spy.fused == 0 and spy.row == 0
    _grads(x, w, b, t, dtype, **kw)
    assert spy.fused == 0 and spy.row > 0


def test_fused_head_is_off_by_default_and_not_with_factored_false():
    assert not dk.options.LossOptions().fused_head
    with pytest.raises(ValueError, match="fused_head"):
        dk.options.LossOptions(fused_head=True, factored=False)


FUSED_CODEGEN = r"""
import sys
import torch
from codegen import compile_launch, emit, recording
from dft_kernels.experimental import fused_head as tf
from dft_kernels.options import make_loss_params

n, h, v = 2048, 4096, 128256  # the Llama-3-8B head, one 2048-row chunk
with recording(tf, "_target_logit_kernel", "_fused_logits_kernel", "_merge_tiles_kernel",
               "_target_entry_kernel") as launches:
    for dtype, objective, opts in ((torch.bfloat16, "dft", {}),
                                   (torch.bfloat16, "entropy", dict(softcap=30.0, with_stats=True)),
                                   (torch.float32, "ce", {})):
        x, w = torch.empty(n, h, dtype=dtype), torch.empty(v, h, dtype=dtype)
        g = torch.empty(n, v, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        tf.linear_loss_grad_fused(x, w, torch.zeros(n, dtype=torch.long), make_loss_params(objective, **opts), None,
                                  torch.tensor(1.0), g, torch.empty(n))
cap = int(sys.argv[1])  # the GPU target (tests/codegen.py runs this once per capability)
out = {}
for i, launch in enumerate(launches):
    r = out[f"sm{cap}-{i}-{launch.name}"] = compile_launch(launch, cap)
    r.update(recompute=bool(launch.kwargs.get("RECOMPUTE")), dtype=str(launch.args[0].dtype))
    print(f"sm{cap}-{i}-{launch.name}", r, file=sys.stderr, flush=True)
emit(out)
"""


def test_fused_kernels_codegen():
    """sm_90 and sm_80: no spill, no local memory; wgmma on sm_90 for 16-bit inputs."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    result = run_script(FUSED_CODEGEN)
    assert len(result) == len(CAPABILITIES) * 3 * 5  # five launches per call
    for case, r in result.items():
        assert r["spill_bytes"] == 0 and r["sass_local"] == 0 and r["local"] == 0, (case, r)
        if "_fused_logits_kernel" in case and "bfloat16" in r["dtype"] and r["capability"] == 90:
            assert r["wgmma"] > 0, (case, r)  # Hopper's tensor-core instruction, for 16-bit inputs
