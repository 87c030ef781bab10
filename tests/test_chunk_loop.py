"""The chunk loop's choices (docs/design.md, Data path and Chunk size): the default chunk size and its
byte budget, the compaction of ignored rows, and the ``grad_out`` of the backend contract, each
against the float64 reference or the in-place path."""

import pytest
import torch

import dft_kernels as dk
from dft_kernels import chunked
from dft_kernels.backends import get_backend
from dft_kernels.options import CHUNK_BYTES, LossOptions, LossParams, default_chunk_size, plan_linear
from helpers import check_linear_against_reference, leaf, make_inputs


@pytest.mark.parametrize("n,v,row_bytes,expected", [
    (16384, 128256, 6, 2048),     # bf16 on CUDA: fp32 logits + bf16 gradient, 1.5 GiB
    (16384, 151936, 6, 1536),     # a power of two would halve it to 1024
    (16384, 128256, 2, 6144),     # the fast mode: one 16-bit buffer
    (300, 128256, 6, 512),        # few tokens: rounded up to a multiple of 256, no more
    (100, 128256, 6, 128),        # fewer than 256: the next power of two
    (1, 1000, 4, 1),
    (16384, 2 ** 31 // 64, 6, 8),  # not even 256 rows fit: what fits
])
def test_default_chunk_size(n, v, row_bytes, expected):
    assert default_chunk_size(n, v, row_bytes, device_type="cuda") == expected


def test_chunk_budget_per_device_and_option():
    x, w = torch.randn(10 ** 5, 8), torch.randn(1000, 8)
    plan = lambda **kw: plan_linear(LossOptions(**kw), x, w, None, True, True, False)  # noqa: E731
    assert plan().chunk_size == CHUNK_BYTES["cpu"] // (1000 * 4) // 256 * 256
    assert plan(chunk_bytes=256 * 1000 * 4).chunk_size == 256
    assert plan(chunk_bytes=256 * 1000 * 4, chunk_size=7).chunk_size == 7
    with pytest.raises(ValueError, match="chunk_bytes"):
        LossOptions(chunk_bytes=-3)


def _ignored_tail(n, v, valid, seed=0, **kw):
    x, w, b, t = make_inputs(n, 16, v, ignore="none", seed=seed, **kw)
    t[valid:] = -100  # whole chunks of ignored rows: compaction drops them
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return x, w, b, t[perm]  # ... spread over the batch


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", [False, True], ids=["", "token_weights"])
def test_compaction_of_ignored_rows(backend, reduction, weights, monkeypatch):
    """With most rows ignored the loop runs over the valid ones only, and every reduction and
    gradient still matches the reference (ignored rows: zero loss, zero gradient)."""
    x, w, b, t = _ignored_tail(64, 300, valid=13)
    calls = []
    real = chunked._Compaction.plan
    monkeypatch.setattr(chunked._Compaction, "plan", staticmethod(lambda *a: calls.append(real(*a)) or calls[-1]))
    kw = dict(token_weights=torch.rand(t.shape) * 2) if weights else {}
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, chunk_size=8, reduction=reduction, **kw)
    assert calls and all(c is not None and c.index.numel() == 13 for c in calls)


def test_no_compaction_without_validate(monkeypatch):
    """Finding the valid rows costs a host sync: only done where validate=True syncs anyway."""
    x, w, b, t = _ignored_tail(64, 300, valid=13)
    monkeypatch.setattr(chunked._Compaction, "__init__", lambda *a: pytest.fail("compacted"))
    check_linear_against_reference(x, w, b, t, torch.float32, chunk_size=8, validate=False)


def test_compaction_with_every_row_ignored():
    x, w, b, t = make_inputs(40, 8, 50, ignore="all")
    x, w, b = leaf(x), leaf(w), leaf(b)
    loss = dk.linear_cross_entropy(x, w, t, bias=b, chunk_size=8, backend="torch")
    loss.backward()
    assert loss == 0 and all((a.grad == 0).all() for a in (x, w, b))


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_grad_out_matches_the_in_place_gradient(backend, logits_dtype, grad_dtype, softcap):
    """grad_out receives the gradient the in-place path computes (from float32 math), rounded
    once to its own dtype; the logits are left untouched."""
    be = get_backend(backend)
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 301, generator=g) * 3).to(logits_dtype)
    target = torch.randint(0, 301, (9,), generator=g)
    target[2] = -100
    params = LossParams(dk.get_objective("dft"), -100, softcap, 0.1, 1e-3, True)
    scale, tw = torch.tensor(0.37), torch.rand(9, generator=g)
    wide = logits.to(torch.float32, copy=True)
    ref = be.row_loss_grad(wide, target, params, tw, scale)  # float32, in place
    before = logits.clone()
    grad_out = torch.full((9, 301), float("nan"), dtype=grad_dtype)
    out = be.row_loss_grad(logits, target, params, tw, scale, grad_out=grad_out)
    assert torch.equal(logits, before)
    if logits_dtype == torch.float32:
        if grad_dtype == torch.float32:
            assert torch.equal(grad_out, wide)
        else:  # one rounding of the same float32 value (Triton's interpreter may round otherwise: 1 ulp)
            ulp = 2.0 ** -7 if grad_dtype == torch.bfloat16 else 2.0 ** -10
            torch.testing.assert_close(grad_out.float(), wide.to(grad_dtype).float(), rtol=ulp, atol=1e-7)
        assert torch.equal(out.loss, ref.loss)
    else:  # logits rounded to 16 bits: compare with the in-place run on the same logits
        in_place = logits.clone()
        be.row_loss_grad(in_place, target, params, tw, scale)
        tol = 1e-2 if grad_dtype != torch.float32 else 1e-5
        torch.testing.assert_close(grad_out.float(), in_place.float(), rtol=tol, atol=1e-3 * float(scale))


def test_grad_out_is_checked():
    be = get_backend("torch")
    params = LossParams(dk.get_objective("ce"), -100, None, 0.0, 0.0, False)
    logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="grad_out"):
        be.row_loss_grad(logits, target, params, None, torch.tensor(1.0), grad_out=torch.empty(4, 11))
    with pytest.raises(TypeError, match="grad_out"):
        be.row_loss_grad(logits, target, params, None, torch.tensor(1.0), grad_out=torch.empty(4, 10).long())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accum_dtype", [None, torch.float32, torch.float64])
def test_accumulator_dtypes_under_the_cuda_policy(monkeypatch, dtype, accum_dtype):
    """dW written by the first chunk and accumulated in place in every accumulator dtype, with the
    CUDA GEMM policy emulated (16-bit operands, float32 products)."""
    from dft_kernels import options
    from helpers import cublas_mm_out_dtype

    monkeypatch.setitem(options.MM_OUT_DTYPE, "cpu", cublas_mm_out_dtype)
    monkeypatch.setattr(chunked, "_DW_BLOCK_ROWS", 64)  # several row blocks of dW
    x, w, b, t = make_inputs(48, 16, 200)
    check_linear_against_reference(x, w, b, t, dtype, chunk_size=16, accum_dtype=accum_dtype)
