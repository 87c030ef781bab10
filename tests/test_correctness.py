"""Chunked linear_cross_entropy vs the float64 reference: loss and every gradient (docs/design.md, Tests).

Every backend runs this suite through the ``backend`` fixture: torch and triton on CPU tensors, cuda
(gpu-marked) on the GPU, with the inputs made on the CPU and moved there (``helpers.device_of``)."""

import pytest
import torch

import dft_kernels as dk
from helpers import (
    LOSS_OPTIONS,
    OBJECTIVES,
    WEIGHTED_NLL,
    check_linear_against_reference,
    device_of,
    make_inputs,
    obj_id,
    option_cases,
    option_kwargs,
    rel_err,
    skip_if_declined,
)

REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_objective_reduction_fp32(backend, objective, reduction, bias):
    x, w, b, t = make_inputs(37, 32, 1000, bias=bias)
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, objective=objective,
                                   reduction=reduction)


OPTIONS = {**LOSS_OPTIONS, "stats": dict(return_stats=True)}


@pytest.mark.parametrize("objective,option,reduction", option_cases(OPTIONS))
def test_options_fp32(backend, objective, option, reduction):
    lead = (3, 13) if option == "shift" else None
    x, w, b, t = make_inputs(39, 24, 1000, lead=lead)
    kwargs = option_kwargs(OPTIONS, option, t)
    if option == "stats":
        _check_stats(x, w, b, t, backend, objective, reduction)
        return
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, objective=objective,
                                   reduction=reduction, **kwargs)


def _check_stats(x, w, b, t, backend, objective, reduction):
    skip_if_declined(backend, objective)
    dev = device_of(backend)
    x, w, b, t = (None if a is None else a.to(dev) for a in (x, w, b, t))
    kw = dict(bias=None if b is None else b.float(), objective=objective, reduction=reduction, return_stats=True)
    loss, stats = dk.linear_cross_entropy(x.float(), w.float(), t, backend=backend, chunk_size=8, **kw)
    kw["bias"] = None if b is None else b.double()
    rloss, rstats = dk.reference.linear_cross_entropy(x.double(), w.double(), t, **kw)
    assert isinstance(stats, dk.LossStats)
    assert stats.num_tokens.dtype == torch.float32 and stats.num_tokens.dim() == 0
    assert stats.num_tokens == rstats.num_tokens
    for field in ("nll", "mean_prob", "accuracy"):
        got, want = getattr(stats, field), getattr(rstats, field)
        assert got.dim() == 0 and torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6), field
    if dk.get_objective(objective).needs_entropy:
        assert torch.allclose(stats.entropy.double(), rstats.entropy.double(), rtol=1e-5)
    else:
        assert stats.entropy is None


@pytest.mark.parametrize("objective", ["ce", "dft", "focal", "entropy"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(backend, objective, ignore, reduction):
    x, w, b, t = make_inputs(29, 16, 500, ignore=ignore, ignore_index=7)
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, objective=objective,
                                   reduction=reduction, ignore_index=7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_loss_and_zero_grads(backend, reduction):
    x, w, b, t = (a.to(device_of(backend)) for a in make_inputs(11, 8, 50, ignore="all"))
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    loss = dk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, backend=backend)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    for a in (x, w, b):
        assert torch.isfinite(a.grad).all() and (a.grad == 0).all()


@pytest.mark.parametrize("objective", ["ce", "dft", "focal", "prob", "entropy"])
@pytest.mark.parametrize("n,h,v", [(5, 16, 32001), (1, 16, 1000), (1, 8, 3), (33, 8, 7)],
                         ids=["V32001", "N1", "N1V3", "Vtiny"])
def test_odd_shapes(backend, objective, n, h, v):
    x, w, b, t = make_inputs(n, h, v, ignore="none")
    for reduction in REDUCTIONS:
        check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, objective=objective,
                                       reduction=reduction, chunk_size=4)


def test_non_contiguous_input(backend):
    x, w, b, t = (a.to(device_of(backend)) for a in make_inputs(24, 16, 1000))
    x_nc = x.reshape(4, 6, 16).transpose(0, 1)  # (6, 4, 16), not contiguous
    t_nc = t.reshape(4, 6).t()
    assert not x_nc.is_contiguous()
    for objective in ("dft", "ce"):
        check_linear_against_reference(x_nc, w, b, t_nc, torch.float32, backend=backend, objective=objective,
                                       reduction="none")
        check_linear_against_reference(x_nc, w, b, t_nc, torch.float32, backend=backend, objective=objective,
                                       shift=True)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_chunk_sizes(backend, chunk_size):
    x, w, b, t = make_inputs(50, 16, 300)
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision(backend, dtype, objective, reduction):
    x, w, b, t = make_inputs(40, 32, 1000)
    check_linear_against_reference(x, w, b, t, dtype, backend=backend, objective=objective, reduction=reduction)


@pytest.mark.parametrize("objective", WEIGHTED_NLL, ids=obj_id)
def test_low_precision_options(backend, objective):
    x, w, b, t = make_inputs(30, 32, 32001, lead=(3, 10))
    check_linear_against_reference(x, w, b, t, torch.bfloat16, backend=backend, objective=objective,
                                   softcap=10.0, z_loss=1e-3, label_smoothing=0.1, shift=True,
                                   token_weights=torch.rand(t.shape) + 0.5)  # moved with the inputs


@pytest.mark.parametrize("accum_dtype", [torch.float32, None], ids=["fp32acc", "native"])
def test_accum_dtype(backend, accum_dtype):
    x, w, b, t = make_inputs(64, 32, 1000)
    check_linear_against_reference(x, w, b, t, torch.bfloat16, backend=backend, accum_dtype=accum_dtype,
                                   chunk_size=8)
    check_linear_against_reference(x, w, b, t, torch.float32, backend=backend, accum_dtype=accum_dtype,
                                   chunk_size=8)


def test_out_of_range_targets_masked_without_validation(backend):
    x, w, b, t = (a.to(device_of(backend)) for a in make_inputs(20, 8, 100, ignore="none"))
    bad = t.clone()
    bad[3], bad[7], bad[11] = 100, -5, 10**6
    good = t.clone()
    good[3] = good[7] = good[11] = -100
    kw = dict(bias=b, backend=backend, reduction="none")
    out_bad = dk.linear_cross_entropy(x, w, bad, validate=False, **kw)
    out_good = dk.linear_cross_entropy(x, w, good, **kw)
    assert torch.equal(out_bad, out_good)


def test_input_only_or_weight_only_grads(backend):
    x, w, b, t = (a.to(device_of(backend)) for a in make_inputs(20, 8, 100))
    w.requires_grad_()
    loss = dk.linear_cross_entropy(x, w, t, bias=b, backend=backend, chunk_size=4)
    loss.backward()
    xr, wr = x.double(), w.detach().double().requires_grad_()
    dk.reference.linear_cross_entropy(xr, wr, t, bias=b.double()).backward()
    assert w.grad is not None and x.grad is None
    assert torch.allclose(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-7)


def test_no_grad_forward_matches(backend):
    x, w, b, t = (a.to(device_of(backend)) for a in make_inputs(20, 8, 100))
    with torch.no_grad():
        a = dk.linear_cross_entropy(x, w, t, bias=b, backend=backend)
    ref = dk.reference.linear_cross_entropy(x.double(), w.double(), t, bias=b.double())
    assert abs(a.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_module_matches_functional(backend):
    x, w, b, t = (a.to(device_of(backend)) for a in make_inputs(20, 8, 100))
    fn = dk.LinearCrossEntropyLoss(objective=dk.DFT(min_weight=0.1), backend=backend, chunk_size=4)
    assert "min_weight=0.1" in repr(fn)
    a = fn(x, w, t, b)
    c = dk.linear_cross_entropy(x, w, t, bias=b, objective="dft", backend=backend)
    d = dk.linear_cross_entropy(x, w, t, bias=b, objective=dk.DFT(min_weight=0.1), backend=backend)
    assert torch.allclose(a, d) and not torch.allclose(a, c)


def test_tied_maxima(backend):
    """Rows whose maximum is repeated (exactly tied logits), target at and away from the max."""
    dev = device_of(backend)
    logits = (torch.randn(6, 300, dtype=torch.float64) * 2).to(dev)
    logits[:, :4] = logits.max() + 1.0  # four tied maxima per row
    target = torch.tensor([0, 3, 10, 299, 2, 150], device=dev)
    for objective in ("ce", "dft", "entropy"):
        ours_in = logits.float().requires_grad_()
        out = dk.cross_entropy(ours_in, target, objective=objective, reduction="none", backend=backend)
        ref_in = logits.float().double().requires_grad_()
        ref = dk.reference.cross_entropy(ref_in, target, objective=objective, reduction="none")
        assert rel_err(out, ref) <= 1e-5
        out.sum().backward()
        ref.sum().backward()
        assert rel_err(ours_in.grad, ref_in.grad) <= 1e-5
