"""The anchored objective (ASFT): the objective's loss plus ``kl_coef * KL`` to a frozen reference head,
from both heads' hidden states, chunk by chunk (docs/objectives.md, Anchored objectives (ASFT) and
distillation).

Checked against an eager float64 formula written here from LLaMA-Factory's ``asft_loss_func`` (both
models' whole logits, the causal shift, DFT's mean over the valid tokens plus ``asft_alpha`` times the
masked mean of ``F.kl_div(log_softmax(policy), softmax(ref))``), and over the option grid against the
library's oracle (``dk.reference.linear_cross_entropy`` with the reference head).  Bounds: docs/design.md,
Tests (float64 1e-10, float32 1e-5 relative, loss and every gradient).
"""

import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dft_kernels as dk
from dispatch_recorder import LargestOutput
from helpers import TOL, leaf, make_inputs, rel_err

B, T, H, H_REF, V, CHUNK = 3, 11, 16, 12, 97, 8  # 33 tokens: five chunks of 8 (and the last of 1)
ERRORS: dict = {}  # measured max relative errors, per (dtype, what): printed by the last test


def _record(backend, dtype, what, err):
    key = (backend, str(dtype).removeprefix("torch."), what)
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)


def _ref_head(lead, seed, dtype=torch.float64):
    """Hidden states of a *different* model at the same positions (another hidden size) and its head."""
    g = torch.Generator().manual_seed(seed)
    xr = torch.randn(*lead, H_REF, dtype=torch.float64, generator=g)
    wr = torch.randn(V, H_REF, dtype=torch.float64, generator=g) * (2.0 / H_REF ** 0.5)
    br = torch.randn(V, dtype=torch.float64, generator=g) * 0.5
    return xr.to(dtype), wr.to(dtype), br.to(dtype)


def llamafactory_asft(policy_logits, ref_logits, labels, asft_alpha, kl="forward", ignore_index=-100):
    """LLaMA-Factory's ``asft_loss_func`` semantics, re-derived: shift (logits ``[:, :-1]`` predict labels
    ``[:, 1:]``), DFT ``-sg(p) log p`` averaged over the valid tokens, plus ``asft_alpha`` times the token
    KL summed over the vocabulary and averaged over the same tokens.  ``kl="reverse"`` swaps the two
    distributions in ``F.kl_div`` (our ``KL(pi_theta || pi_ref)``)."""
    logits = policy_logits[..., :-1, :].reshape(-1, policy_logits.shape[-1])
    ref = ref_logits[..., :-1, :].reshape(-1, ref_logits.shape[-1])
    labels = labels[..., 1:].reshape(-1)
    valid = labels != ignore_index
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")[valid]
    dft = (ce * torch.exp(-ce).detach()).mean()
    if kl == "forward":
        token_kl = F.kl_div(F.log_softmax(logits, dim=-1), F.softmax(ref, dim=-1), reduction="none").sum(-1)
    else:
        token_kl = F.kl_div(F.log_softmax(ref, dim=-1), F.softmax(logits, dim=-1), reduction="none").sum(-1)
    mask = valid.to(token_kl.dtype)
    return dft + asft_alpha * (token_kl * mask).sum() / mask.sum()


def _grads(loss, tensors, grad_out=None):
    return torch.autograd.grad(loss, tensors, grad_out)


# (backend, dtype): the triton backend takes no float64 (it runs under Triton's interpreter here)
BACKEND_DTYPES = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)]


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_matches_llamafactory_asft(backend, dtype, kl):
    """LLaMA-Factory's ASFT value and gradients (w.r.t. input, weight, bias) on the same values: ours from
    hidden states with ``objective="dft"``, ``shift=True``, ``kl_coef=asft_alpha``, several chunks."""
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T), seed=11)
    xr, wr, br = _ref_head((B, T), seed=12)
    ours_in = [leaf(a.to(dtype)) for a in (x, w, b)]
    loss = dk.linear_cross_entropy(*ours_in[:2], t, bias=ours_in[2], objective="dft", shift=True,
                                   ref_input=xr.to(dtype), ref_weight=wr.to(dtype), ref_bias=br.to(dtype),
                                   kl_coef=0.1, kl=kl, chunk_size=CHUNK, backend=backend)
    eager_in = [leaf(a) for a in (x, w, b)]
    want = llamafactory_asft(F.linear(eager_in[0], eager_in[1], eager_in[2]), F.linear(xr, wr, br), t, 0.1, kl)
    err = rel_err(loss, want)
    _record(backend, dtype, f"asft-lf-{kl} loss", err)
    assert err <= TOL[dtype], f"loss rel err {err:.2e}"
    for name, g, e in zip(("input", "weight", "bias"), _grads(loss, ours_in), _grads(want, eager_in)):
        err = rel_err(g, e)
        _record(backend, dtype, f"asft-lf-{kl} d{name}", err)
        assert g.dtype == dtype and err <= TOL[dtype], f"{name} grad rel err {err:.2e}"


def test_num_items_in_batch_normalises_the_sum_of_both_terms():
    """With ``num_items_in_batch`` the summed per-token (objective + kl_coef KL) is divided by it; with the
    micro-batch's own valid count that is LLaMA-Factory's value (its two means over the same tokens)."""
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T), seed=13)
    xr, wr, br = _ref_head((B, T), seed=14)
    n_valid = int((t[:, 1:] != -100).sum())
    kw = dict(bias=b, objective="dft", shift=True, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.3,
              chunk_size=CHUNK)
    want = llamafactory_asft(F.linear(x, w, b), F.linear(xr, wr, br), t, 0.3)
    assert rel_err(dk.linear_cross_entropy(x, w, t, num_items_in_batch=n_valid, **kw), want) <= 1e-12
    total = dk.linear_cross_entropy(x, w, t, reduction="sum", **kw)
    got = dk.linear_cross_entropy(x, w, t, num_items_in_batch=torch.tensor(4 * n_valid), **kw)
    assert rel_err(got, total / (4 * n_valid)) <= 1e-12


# ---- the option grid against the oracle ----

ANCHOR_OBJECTIVES = ["ce", "dft", dk.DFT(min_weight=0.1), "focal", "prob", "entropy", dk.Power(alpha=0.5), "eaft",
                     dk.EAFT(alpha=2.0, top_k=5, normalizer=3.0)]
ANCHOR_OPTIONS = {
    "plain": {},
    "softcap": dict(softcap=3.0),
    "smooth+zloss": dict(label_smoothing=0.1, z_loss=1e-3),
    "token_weights": "tw",
    "shift": dict(shift=True),
    "num_items": dict(num_items_in_batch=23),
    "stats": dict(return_stats=True),
}


def _cases():
    """Every objective x option x reduction on the torch backend in float64 and float32; on the triton
    backend (float32, under the interpreter) every objective x option once, the reduction rotating (as
    the suite's reduced grid; DFT_KERNELS_FULL_GRID=1 crosses them)."""
    import os

    full = os.environ.get("DFT_KERNELS_FULL_GRID", "") not in ("", "0")
    cases = []
    for i, objective in enumerate(ANCHOR_OBJECTIVES):
        for j, option in enumerate(ANCHOR_OPTIONS):
            if option == "smooth+zloss" and not dk.get_objective(objective).is_weighted_nll:
                continue
            reductions = ("mean", "sum") if option == "num_items" else ("mean", "sum", "none")
            for reduction in reductions:
                name = objective if isinstance(objective, str) else repr(objective)
                for backend, dtype in BACKEND_DTYPES:
                    if backend == "triton" and not full and reduction != reductions[(i + j) % len(reductions)]:
                        continue
                    if backend == "triton" and getattr(objective, "top_k", None) is not None:
                        continue  # declined (test_triton_declines_a_top_k_entropy_weight)
                    cases.append(pytest.param(backend, dtype, objective, option, reduction,
                                              id=f"{backend}-{str(dtype)[6:]}-{name}-{option}-{reduction}"))
    return cases


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("backend,dtype,objective,option,reduction", _cases())
def test_against_the_oracle(backend, dtype, objective, option, reduction, kl):
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    kw = dict(ANCHOR_OPTIONS[option]) if option != "token_weights" else dict(
        token_weights=torch.rand(B, T, dtype=torch.float64) * 2)
    kw.update(objective=objective, reduction=reduction, kl_coef=0.25, kl=kl)
    ours_in = [leaf(a.to(dtype)) for a in (x, w, b)]
    tw = kw.pop("token_weights", None)
    out = dk.linear_cross_entropy(*ours_in[:2], t, bias=ours_in[2], ref_input=xr.to(dtype), ref_weight=wr.to(dtype),
                                  ref_bias=br.to(dtype), chunk_size=CHUNK, backend=backend,
                                  token_weights=None if tw is None else tw.to(dtype), **kw)
    ref_in = [leaf(a) for a in (x, w, b)]
    ref = dk.reference.linear_cross_entropy(*ref_in[:2], t, bias=ref_in[2], ref_input=xr, ref_weight=wr, ref_bias=br,
                                            token_weights=tw, **kw)
    if kw.get("return_stats"):
        (out, stats), (ref, ref_stats) = out, ref
        for field in ("num_tokens", "nll", "mean_prob", "accuracy"):
            assert rel_err(getattr(stats, field), getattr(ref_stats, field)) <= TOL[dtype], field
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_err(out, ref)
    _record(backend, dtype, f"oracle-{kl} loss", err)
    assert err <= TOL[dtype], f"loss rel err {err:.2e}"
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    for name, g, e in zip(("input", "weight", "bias"), _grads(out, ours_in, grad_out.to(out.dtype)),
                          _grads(ref, ref_in, grad_out)):
        err = rel_err(g, e)
        _record(backend, dtype, f"oracle-{kl} d{name}", err)
        assert torch.isfinite(g).all() and err <= TOL[dtype], f"{name} grad rel err {err:.2e}"


def test_triton_declines_a_top_k_entropy_weight():
    x, w, b, t = make_inputs(B * T, H, V, torch.float32, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=9)
    kw = dict(ref_input=xr.float(), ref_weight=wr.float(), kl_coef=0.25, chunk_size=CHUNK,
              objective=dk.EAFT(top_k=5, normalizer=3.0))
    with pytest.raises(ValueError, match="top"):
        dk.linear_cross_entropy(x, w, t, backend="triton", **kw)
    got = dk.linear_cross_entropy(x, w, t, backend="auto", **kw)  # auto: the torch backend
    want = dk.reference.linear_cross_entropy(x.double(), w.double(), t, ref_input=xr, ref_weight=wr, kl_coef=0.25,
                                             objective=dk.EAFT(top_k=5, normalizer=3.0))
    assert rel_err(got, want) <= TOL[torch.float32]


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T), ignore="all")
    xr, wr, br = _ref_head((B, T), seed=3)
    x, w = leaf(x), leaf(w)
    loss = dk.linear_cross_entropy(x, w, t, ref_input=xr, ref_weight=wr, kl_coef=0.5, chunk_size=CHUNK)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_kl_coef_zero_is_the_plain_loss():
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=5)
    plain = dk.linear_cross_entropy(x, w, t, bias=b, chunk_size=CHUNK)
    assert torch.equal(dk.linear_cross_entropy(x, w, t, bias=b, ref_input=xr, ref_weight=wr, chunk_size=CHUNK), plain)
    same = dk.linear_cross_entropy(x, w, t, bias=b, ref_input=x, ref_weight=w, ref_bias=b, kl_coef=2.0,
                                   chunk_size=CHUNK)  # the reference is the policy itself: KL = 0
    assert rel_err(same, plain) <= 1e-14


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_head_gets_no_gradient_and_is_not_modified(reduction):
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T))
    xr, wr, br = (leaf(a) for a in _ref_head((B, T), seed=7))
    before = [a.detach().clone() for a in (xr, wr, br)]
    x, w, b = leaf(x), leaf(w), leaf(b)
    loss = dk.linear_cross_entropy(x, w, t, bias=b, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.5,
                                   reduction=reduction, chunk_size=CHUNK)
    loss.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    for a, old in zip((xr, wr, br), before):
        assert a.grad is None
        assert torch.equal(a.detach(), old)


# ---- memory: no [tokens, vocab] tensor for either head ----

N_MEM, V_MEM, CHUNK_MEM = 256, 1000, 64


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tensor_of_n_times_v_elements(reduction, dtype, backend):
    """Forward and backward of the anchored loss: no tensor of N * V elements (the chunk logits are seen:
    the recorder works)."""
    x, w, b, t = make_inputs(N_MEM, H, V_MEM, dtype=dtype)
    xr, wr, br, _ = make_inputs(N_MEM, H_REF, V_MEM, dtype=dtype, seed=1)
    x, w, b = leaf(x), leaf(w), leaf(b)
    with LargestOutput() as rec:
        loss = dk.linear_cross_entropy(x, w, t, bias=b, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.1,
                                       objective="entropy", softcap=20.0, reduction=reduction, chunk_size=CHUNK_MEM,
                                       backend=backend)
        loss.sum().backward()
    assert rec.largest < N_MEM * V_MEM, f"{rec.largest_op} produced {rec.largest} elements"
    assert rec.largest >= CHUNK_MEM * V_MEM


def test_recorder_catches_the_materialising_oracle():
    x, w, b, t = make_inputs(N_MEM, H, V_MEM)
    xr, wr, br, _ = make_inputs(N_MEM, H_REF, V_MEM, seed=1)
    with LargestOutput() as rec:
        dk.reference.linear_cross_entropy(leaf(x), w, t, ref_input=xr, ref_weight=wr, kl_coef=0.1).backward()
    assert rec.largest >= N_MEM * V_MEM


# ---- backends: a backend without the two-head path declines it ----


def test_cuda_declines_the_path_with_its_reason():
    from dft_kernels.backends import cuda as cuda_backend

    assert "no 'anchor' path" in cuda_backend.supports("anchor", None)


def test_auto_skips_a_backend_without_the_path_and_logs_why(monkeypatch, caplog):
    """``backend="auto"`` whose first backend declines the path (as the cuda backend does on a GPU): the
    call runs on the next one, the reason is logged; a named backend that declines raises with it."""
    from dft_kernels import backends
    from dft_kernels.backends import triton as triton_backend

    supports = triton_backend.supports
    monkeypatch.setattr(triton_backend, "supports",
                        lambda path, params: "declined here" if path == "anchor" else supports(path, params))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    message = ("dft_kernels: backend 'auto': 'triton' has no anchor path (declined here); this call uses the "
               "next backend")
    backends._logged.discard(message)
    x, w, b, t = make_inputs(B * T, H, V, torch.float64)
    xr, wr, br = _ref_head((B * T,), seed=10)
    kw = dict(bias=b, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.2, chunk_size=CHUNK)
    with caplog.at_level(logging.WARNING, logger="dft_kernels"):
        got = dk.linear_cross_entropy(x, w, t, **kw)
    assert message in caplog.text
    assert rel_err(got, dk.reference.linear_cross_entropy(x, w, t, **kw)) <= 1e-12
    with pytest.raises(ValueError, match="backend: 'triton' cannot compute the anchor loss: declined here"):
        dk.linear_cross_entropy(x.float(), w.float(), t, ref_input=xr.float(), ref_weight=wr.float(), kl_coef=0.1,
                                backend="triton")


# ---- argument checks: errors name the argument ----


@pytest.mark.parametrize("change,exc,match", [
    (dict(ref_weight=None), ValueError, "ref_weight is missing"),
    (dict(ref_input=None), ValueError, "ref_input is missing"),
    (dict(ref_input=None, ref_weight=None, ref_bias=None), ValueError, "ref_input and ref_weight are needed"),
    (dict(ref_input=None, ref_weight=None, kl_coef=0.0), ValueError, "ref_bias is given without"),
    (dict(kl_coef=-0.1), ValueError, "kl_coef must be >= 0"),
    (dict(kl_coef=float("nan")), ValueError, "kl_coef must be finite"),
    (dict(kl_coef="0.1"), TypeError, "kl_coef must be a real number"),
    (dict(kl="sideways"), ValueError, "kl must be one of"),
    (dict(kl=1), TypeError, "kl must be a string"),
    (dict(ref_input=torch.randn(2, T, H_REF, dtype=torch.float64)), ValueError, "ref_input has shape"),
    (dict(ref_weight=torch.randn(V + 1, H_REF, dtype=torch.float64)), ValueError, "ref_weight has shape"),
    (dict(ref_weight=torch.randn(V, H_REF + 1, dtype=torch.float64)), ValueError, "ref_weight has shape"),
    (dict(ref_weight=torch.randn(V + 1, H_REF, dtype=torch.float64), kl_coef=0.0), ValueError, "ref_weight has shape"),
    (dict(ref_bias=torch.randn(V + 1, dtype=torch.float64)), ValueError, "ref_bias must have shape"),
    (dict(ref_weight=torch.randn(V, H_REF)), TypeError, "ref_weight has dtype"),
    (dict(ref_input=torch.zeros(B, T, H_REF, dtype=torch.int64)), TypeError, "ref_input must be a floating"),
    (dict(ref_input=[1.0]), TypeError, "ref_input must be a torch.Tensor"),
    (dict(factored=True), ValueError, "factored: the anchored loss"),
    (dict(fused_head=True), ValueError, "fused_head: the anchored loss"),
])
def test_errors_name_the_argument(change, exc, match):
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=2)
    kw = dict(bias=b, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.1)
    kw.update(change)
    with pytest.raises(exc, match=match):
        dk.linear_cross_entropy(x, w, t, **kw)
    with pytest.raises(exc, match=match):  # the oracle checks the same
        dk.reference.linear_cross_entropy(x, w, t, **kw)


def test_process_group_needs_torch_distributed():
    """The vocab-parallel anchor (tests/vocab_parallel/test_pair_parallel.py) needs an initialised group."""
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    x, w, b, t = make_inputs(B * T, H, V, torch.float64)
    xr, wr, _ = _ref_head((B * T,), seed=4)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        dk.linear_cross_entropy(x, w, t, ref_input=xr, ref_weight=wr, kl_coef=0.1, process_group=group)


def test_module_takes_the_anchor():
    x, w, b, t = make_inputs(B * T, H, V, torch.float64)
    xr, wr, br = _ref_head((B * T,), seed=6)
    loss_fn = dk.LinearCrossEntropyLoss("dft", kl_coef=0.1, kl="reverse", chunk_size=CHUNK)
    kw = dict(objective="dft", kl_coef=0.1, kl="reverse", ref_input=xr, ref_weight=wr, ref_bias=br)
    assert rel_err(loss_fn(x, w, t, b, ref_input=xr, ref_weight=wr, ref_bias=br),
                   dk.reference.linear_cross_entropy(x, w, t, bias=b, **kw)) <= 1e-12
    with pytest.raises(ValueError, match="kl must be one of"):
        dk.LinearCrossEntropyLoss(kl="both")


def test_patch_takes_the_anchor_options():
    """dk.patch carries the anchor (its forward takes the reference per call: tests/hf/test_hf.py)."""
    assert dk.hf.check_loss_kwargs({"kl_coef": 0.1, "kl": "reverse"}) == {"kl_coef": 0.1, "kl": "reverse"}


# ---- torch.compile ----


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_step_matches_eager(reduction):
    """fullgraph=True through the two-head custom op (no graph break), forward and backward."""
    x, w, b, t = make_inputs(B * T, H, V, dtype=torch.float32, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=8, dtype=torch.float32)

    def step(x, w, b, t):
        loss = dk.linear_cross_entropy(x, w, t, bias=b, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.1,
                                       kl="reverse", shift=True, reduction=reduction, validate=False, chunk_size=CHUNK)
        loss.sum().backward()
        return loss.detach()

    def run(fn):
        ins = [leaf(a) for a in (x, w, b)]
        loss = fn(ins[0], ins[1], ins[2], t)
        return [loss] + [a.grad for a in ins]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for name, g, e in zip(("loss", "input", "weight", "bias"), got, run(step)):
        assert rel_err(g, e) <= 1e-6, name


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mostly_ignored_rows_are_compacted_for_both_heads(reduction, monkeypatch):
    """With ``validate=True`` and most rows ignored the chunk loop runs over the valid rows only, gathering
    both heads' rows; the result is the oracle's."""
    from dft_kernels import chunked

    seen = []
    plan = chunked._Compaction.plan
    monkeypatch.setattr(chunked._Compaction, "plan",
                        staticmethod(lambda *a: seen.append(plan(*a)) or seen[-1]))
    x, w, b, t = make_inputs(64, H, V, torch.float64, ignore_fraction=0.8)
    xr, wr, br = _ref_head((64,), seed=15)
    kw = dict(bias=b, ref_input=xr, ref_weight=wr, ref_bias=br, kl_coef=0.4, kl="reverse", reduction=reduction,
              objective="entropy")
    ours_in, ref_in = [leaf(a) for a in (x, w, b)], [leaf(a) for a in (x, w, b)]
    out = dk.linear_cross_entropy(ours_in[0], ours_in[1], t, chunk_size=CHUNK, **{**kw, "bias": ours_in[2]})
    ref = dk.reference.linear_cross_entropy(ref_in[0], ref_in[1], t, **{**kw, "bias": ref_in[2]})
    assert any(c is not None for c in seen), "no compaction happened"
    assert rel_err(out, ref) <= 1e-10
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    for g, e in zip(_grads(out, ours_in, grad_out), _grads(ref, ref_in, grad_out)):
        assert rel_err(g, e) <= 1e-10


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_masked_column_and_online_blocks(kl, backend, monkeypatch):
    """A masked (-inf) column in both heads carries no mass and gets no gradient; on the triton backend the
    rows span many column blocks (16 columns a block, V = 97: seven blocks, the last partial), so its online
    statistics over both rows merge across blocks."""
    from dft_kernels.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "block_config", lambda vocab, options=False: (4, 16, 1))
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=16)
    b[5], br[5] = float("-inf"), float("-inf")
    t = torch.where(t == 5, 6, t)
    kw = dict(objective="dft", kl_coef=0.3, kl=kl, softcap=None, reduction="none")
    ours_in = [leaf(a.float()) for a in (x, w, b)]
    out = dk.linear_cross_entropy(ours_in[0], ours_in[1], t, bias=ours_in[2], ref_input=xr.float(),
                                  ref_weight=wr.float(), ref_bias=br.float(), chunk_size=CHUNK, backend=backend,
                                  **kw)
    ref_in = [leaf(a) for a in (x, w, b)]
    ref = dk.reference.linear_cross_entropy(ref_in[0], ref_in[1], t, bias=ref_in[2], ref_input=xr, ref_weight=wr,
                                            ref_bias=br, **kw)
    assert rel_err(out, ref) <= TOL[torch.float32]
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    gs = _grads(out, ours_in[:2], grad_out.float())
    for g, e in zip(gs, _grads(ref, ref_in[:2], grad_out)):
        assert torch.isfinite(g).all() and rel_err(g, e) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, backend):
    """16-bit inputs (both heads): loss and gradients within 1e-2 of the float64 oracle on the same values,
    and within 3x the error of eager PyTorch on the same 16-bit inputs (the oracle run in that dtype)."""
    x, w, b, t = make_inputs(B * T, H, V, torch.float64, lead=(B, T))
    xr, wr, br = _ref_head((B, T), seed=17)
    x, w, b, xr, wr, br = (a.to(dtype) for a in (x, w, b, xr, wr, br))
    kw = dict(objective="dft", kl_coef=0.2, kl="reverse", shift=True)
    ours_in = [leaf(a) for a in (x, w, b)]
    out = dk.linear_cross_entropy(*ours_in[:2], t, bias=ours_in[2], ref_input=xr, ref_weight=wr, ref_bias=br,
                                  chunk_size=CHUNK, backend=backend, **kw)
    exact_in = [leaf(a.double()) for a in (x, w, b)]
    exact = dk.reference.linear_cross_entropy(*exact_in[:2], t, bias=exact_in[2], ref_input=xr.double(),
                                              ref_weight=wr.double(), ref_bias=br.double(), **kw)
    eager_in = [leaf(a) for a in (x, w, b)]
    eager = dk.reference.linear_cross_entropy(*eager_in[:2], t, bias=eager_in[2], ref_input=xr, ref_weight=wr,
                                              ref_bias=br, **kw)
    pairs = [(out, eager, exact)]
    pairs += list(zip(_grads(out, ours_in), _grads(eager, eager_in), _grads(exact, exact_in)))
    for name, (got, base, want) in zip(("loss", "input", "weight", "bias"), pairs):
        err, err_eager = rel_err(got, want), rel_err(base, want)
        _record(backend, dtype, f"16-bit {name}", err)
        assert err <= TOL[dtype] and err <= 3 * err_eager + 1e-6, f"{name}: {err:.2e} (eager {err_eager:.2e})"


def test_zz_report_measured_errors(capsys):
    """Not a check: prints the largest relative errors the tests above measured (pytest -s shows them)."""
    with capsys.disabled():
        for key in sorted(ERRORS):
            print(f"\nanchor max rel err {key}: {ERRORS[key]:.2e}", end="")
