"""dk.EAFT against LLaMA-Factory's EAFT loss, re-derived as an eager float64 formula on materialised
logits (docs/objectives.md, EAFT): loss and the input, weight and bias gradients, on the torch and
triton backends; the top-k decline of the compiled backends; parameter checks.

The triton backend computes in float32 (it takes no float64 logits), so its float64 bound is not
run; the torch backend is checked in both dtypes."""

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels import backends, options
from dft_kernels.backends import cuda as cuda_backend
from dft_kernels.backends import torch as torch_backend
from dft_kernels.options import LossOptions, make_loss_params
from helpers import TOL, leaf, make_inputs, rel_err

IGNORE = -100


def eaft_formula(logits, labels, *, alpha, top_k, normalizer, reduction="mean", num_items_in_batch=None):
    """LLaMA-Factory's ``use_eaft_loss`` (``eaft_loss_func`` in src/llamafactory/train/trainer_utils.py),
    written out again on ``logits`` ``[B, T, V]`` and ``labels`` ``[B, T]``:

    - the labels get one ignored position appended on the right and move left by one, so position ``t``
      is scored on ``labels[t + 1]`` and each sequence's last position on nothing (our ``shift=True``);
    - the per-token cross-entropy of the valid positions, times ``(H / normalizer)^alpha`` with no
      gradient, ``H`` the entropy of the softmax of the row's ``top_k`` largest logits renormalised
      (``top_k=None``: of the whole row); theirs is ``top_k=20``, ``normalizer=3.0``;
    - the sum over valid positions divided by ``num_items_in_batch`` when given, else their mean.

    Ours beyond theirs: ``top_k > V`` takes the ``V`` logits (their ``torch.topk`` raises), ``normalizer``
    None is ``log`` of the number of logits entering ``H``, and ``reduction`` ``"sum"``/``"none"`` (per
    position, ``[B, T - 1]`` as ours with ``shift=True``)."""
    b, t, vocab = logits.shape
    target = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    rows = logits.reshape(-1, vocab)
    per_token = F.cross_entropy(rows, target, ignore_index=IGNORE, reduction="none")
    with torch.no_grad():
        kept = rows.detach() if top_k is None else torch.topk(rows.detach(), min(top_k, vocab), dim=-1).values
        log_q = torch.log_softmax(kept, dim=-1)
        entropy = -(log_q.exp() * log_q).sum(dim=-1)
        if normalizer is None:
            count = kept.shape[-1]
            normalizer = math.log(count) if count > 1 else 1.0
        weight = torch.pow(entropy / normalizer, alpha)
    weighted = per_token * weight  # 0 at ignored positions (cross_entropy gives 0 there)
    valid = target != IGNORE
    if reduction == "none":
        return weighted.reshape(b, t)[:, :-1]
    if num_items_in_batch is not None:
        return weighted.sum() / num_items_in_batch
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / valid.sum().clamp_min(1)


B, T, H, V = 3, 9, 16, 300
VARIANTS = {
    "exact": dict(top_k=None, normalizer=None),            # H exact, / log(V)
    "exact-norm3": dict(top_k=None, normalizer=3.0),
    "top20-norm3": dict(top_k=20, normalizer=3.0),         # LLaMA-Factory's use_eaft_loss
    "top20": dict(top_k=20, normalizer=None),              # / log(20)
}
REDUCTIONS = {"mean": dict(reduction="mean"), "sum": dict(reduction="sum"), "none": dict(reduction="none"),
              "num_items": dict(num_items_in_batch=31)}
ALPHAS = [0.5, 1.0, 2.0]


def run_both(backend, dtype, variant, alpha, reduction, *, seed=0, vocab=V, t_len=T):
    """Ours in ``dtype`` on ``backend`` and the formula in float64 on the same values; returns the relative
    errors of the loss and of the input, weight and bias gradients."""
    x, w, b, labels = make_inputs(B * t_len, H, vocab, lead=(B, t_len), seed=seed)
    kw = dict(REDUCTIONS[reduction])
    obj = dk.EAFT(alpha=alpha, **VARIANTS[variant])
    xs, ws, bs = leaf(x.to(dtype)), leaf(w.to(dtype)), leaf(b.to(dtype))
    xr, wr, br = leaf(xs.double()), leaf(ws.double()), leaf(bs.double())
    out = dk.linear_cross_entropy(xs, ws, labels, bias=bs, objective=obj, shift=True, backend=backend,
                                  chunk_size=8, **kw)
    ref = eaft_formula(F.linear(xr, wr, br), labels, alpha=alpha, **VARIANTS[variant],
                       reduction=kw.get("reduction", "mean"), num_items_in_batch=kw.get("num_items_in_batch"))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(out, (xs, ws, bs), grad_out.to(out.dtype))
    rgrads = torch.autograd.grad(ref, (xr, wr, br), grad_out)
    errs = {"loss": rel_err(out, ref)}
    errs.update({name: rel_err(g, rg) for name, g, rg in zip(("input", "weight", "bias"), grads, rgrads)})
    return errs


CASES = [(backend, dtype, variant)
         for backend, dtype in (("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32))
         for variant in VARIANTS
         if backend == "torch" or VARIANTS[variant]["top_k"] is None]


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("backend,dtype,variant", CASES, ids=[f"{b}-{str(d)[6:]}-{v}" for b, d, v in CASES])
def test_matches_the_llamafactory_formula(backend, dtype, variant, alpha, reduction):
    if backend == "triton":
        pytest.importorskip("triton")
        from conftest import triton_cpu_unavailable_reason

        reason = triton_cpu_unavailable_reason()
        if reason:
            pytest.skip(reason)
    errs = run_both(backend, dtype, variant, alpha, reduction)
    tol = TOL[dtype]
    for name, err in errs.items():
        assert err <= tol, f"{name} rel err {err:.3e} > {tol}"


@pytest.mark.parametrize("top_k", [1, 7, V, V + 13])
def test_top_k_extremes(top_k):
    """k = 1: one logit, H = 0, so the weight is 0 (alpha > 0) and so are the loss and the gradients;
    k >= V: every logit, the exact entropy (their torch.topk raises for k > V)."""
    x, w, b, labels = make_inputs(B * T, H, V, torch.float64, lead=(B, T), seed=3)
    xs, ws, bs = leaf(x), leaf(w), leaf(b)
    out = dk.linear_cross_entropy(xs, ws, labels, bias=bs, objective=dk.EAFT(top_k=top_k, normalizer=2.0),
                                  shift=True, backend="torch", chunk_size=8)
    ref = eaft_formula(F.linear(x, w, b), labels, alpha=1.0, top_k=top_k, normalizer=2.0)
    assert rel_err(out, ref) <= TOL[torch.float64]
    out.backward()
    if top_k == 1:
        assert out == 0 and all((a.grad == 0).all() for a in (xs, ws, bs))
    if top_k >= V:
        exact = dk.linear_cross_entropy(x, w, labels, bias=b, objective=dk.EAFT(normalizer=2.0), shift=True,
                                        backend="torch", chunk_size=8)
        assert rel_err(out, exact) <= TOL[torch.float64]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_logit_rows(backend):
    """V = 1: H = 0 and normalizer None is taken as 1, so every weight is 0^alpha (1 at alpha = 0)."""
    if backend == "triton":
        from conftest import triton_cpu_unavailable_reason

        if triton_cpu_unavailable_reason():
            pytest.skip(triton_cpu_unavailable_reason())
    logits = torch.randn(5, 1, requires_grad=True)
    target = torch.tensor([0, 0, IGNORE, 0, 0])
    for alpha, want in ((1.0, 0.0), (0.0, 0.0)):  # alpha = 0: the cross-entropy, 0 with one logit
        loss = dk.cross_entropy(logits, target, objective=dk.EAFT(alpha=alpha), backend=backend)
        (g,) = torch.autograd.grad(loss, logits)
        assert loss.item() == want and torch.isfinite(g).all() and (g == 0).all()
    assert dk.EAFT().resolve(1).normalizer == 1.0 and dk.EAFT(top_k=1).resolve(50).normalizer == 1.0


def test_normalizer_none_is_the_largest_entropy():
    assert dk.EAFT().resolve(1000).normalizer == math.log(1000)
    assert dk.EAFT(top_k=20).resolve(1000).normalizer == math.log(20)
    assert dk.EAFT(top_k=20).resolve(7).normalizer == math.log(7)
    assert dk.EAFT(normalizer=3.0).resolve(1000) == dk.EAFT(normalizer=3.0)
    # a uniform row has the largest entropy: its weight is 1, whatever alpha
    logits = torch.zeros(4, 50, dtype=torch.float64)
    target = torch.tensor([1, 2, 3, 4])
    for alpha in (0.5, 2.0):
        loss = dk.cross_entropy(logits, target, objective=dk.EAFT(alpha=alpha), backend="torch")
        assert torch.allclose(loss, torch.tensor(math.log(50), dtype=torch.float64), rtol=1e-12)


# ---- the compiled backends decline top_k ----

def test_compiled_backends_decline_top_k_with_the_reason():
    params = make_loss_params(dk.EAFT(top_k=20, normalizer=3.0))
    reason = backends.top_k_reason(params.objective)
    assert "top-20" in reason and "exact entropy" in reason and "torch backend" in reason
    assert cuda_backend.supports("rows", params) == reason
    assert torch_backend.supports("rows", params) == ""
    exact = make_loss_params(dk.EAFT())
    assert cuda_backend.supports("rows", exact) == ""
    with pytest.raises(ValueError, match=re.escape(reason)):
        cuda_backend.row_loss_grad(torch.randn(2, 30), torch.tensor([1, 2]), params)
    pytest.importorskip("triton")
    from dft_kernels.backends import triton as triton_backend

    for path in ("rows", "factored"):
        assert triton_backend.supports(path, params) == reason
        assert triton_backend.supports(path, exact) == ""
    with pytest.raises(ValueError, match=re.escape(reason)):
        triton_backend.row_loss_grad(torch.randn(2, 30), torch.tensor([1, 2]), params)


def test_named_triton_raises_and_auto_falls_back_to_torch(monkeypatch, caplog):
    from conftest import triton_cpu_unavailable_reason

    if triton_cpu_unavailable_reason():
        pytest.skip(triton_cpu_unavailable_reason())
    obj = dk.EAFT(top_k=20, normalizer=3.0)
    reason = backends.top_k_reason(obj)
    x, w, b, t = make_inputs(20, 8, 100, dtype=torch.float32, seed=5)
    with pytest.raises(ValueError, match=r"backend: 'triton' does not run this call: " + re.escape(reason)):
        dk.linear_cross_entropy(x, w, t, bias=b, objective=obj, backend="triton")
    with pytest.raises(ValueError, match=re.escape(reason)):
        dk.cross_entropy(x @ w.T, t, objective=obj, backend="triton")
    with pytest.raises(ValueError, match=re.escape(reason)):
        options.plan_linear(LossOptions(objective=obj, backend="triton", fused_head=True), x, w, None, True, True,
                            False)
    # "auto" where triton comes first (as on CUDA): the plan leaves it out, says why, and runs torch
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="dft_kernels"):
        plan = options.plan_linear(LossOptions(objective=obj), x, w, b, True, True, True)
        auto = dk.linear_cross_entropy(x, w, t, bias=b, objective=obj)
    assert plan.steps == (("torch", "rows"),)
    assert any("'triton' does not run this call" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records)
    torch_loss = dk.linear_cross_entropy(x, w, t, bias=b, objective=obj, backend="torch")
    assert torch.equal(auto, torch_loss)
    # the exact entropy stays on triton
    plan = options.plan_linear(LossOptions(objective=dk.EAFT()), x, w, b, True, True, True)
    assert plan.steps[0] == ("triton", "rows")


def test_vocab_parallel_declines_top_k():
    obj = dk.EAFT(top_k=20, normalizer=3.0)
    with pytest.raises(ValueError, match=r"objective: .*no vocab-parallel path"):
        options.plan_vocab_parallel(LossOptions(objective=obj), torch.randn(4, 8), 50, torch.float32, True)
    options.plan_vocab_parallel(LossOptions(objective=dk.EAFT()), torch.randn(4, 8), 50, torch.float32, True)


# ---- parameters ----

@pytest.mark.parametrize("kwargs,error,name", [
    (dict(alpha=-0.5), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha="1"), TypeError, "alpha"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-3), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_k=20.0), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(normalizer=0.0), ValueError, "normalizer"),
    (dict(normalizer=-3.0), ValueError, "normalizer"),
    (dict(normalizer=float("inf")), ValueError, "normalizer"),
    (dict(normalizer="3"), TypeError, "normalizer"),
])
def test_parameter_errors_name_the_parameter(kwargs, error, name):
    with pytest.raises(error, match=f"EAFT: '{name}'"):
        dk.EAFT(**kwargs)


def test_parameters_and_registry():
    obj = dk.EAFT(alpha=2, top_k=20, normalizer=3)
    assert (obj.alpha, obj.top_k, obj.normalizer) == (2.0, 20, 3.0) and isinstance(obj.alpha, float)
    assert dk.get_objective("eaft") == dk.EAFT() and dk.objectives.OBJECTIVES["eaft"] is dk.EAFT
    assert dk.EAFT.needs_entropy and dk.EAFT.is_weighted_nll and obj.entropy_top_k == 20
    assert dk.EAFT().entropy_top_k is None and dk.DFT().entropy_top_k is None
    assert obj.kernel_params == (2.0, 3.0)
    with pytest.raises(dataclasses_frozen_error()):
        obj.alpha = 1.0
    # normalizer None needs V: used unresolved, the objective says so
    with pytest.raises(ValueError, match="normalizer=None"):
        dk.EAFT().coefficient(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="normalizer=None"):
        dk.EAFT().kernel_params  # noqa: B018
    # label smoothing and z-loss apply (a stop-gradient weight times the NLL)
    LossOptions(objective=obj, label_smoothing=0.1, z_loss=1e-3)


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError

