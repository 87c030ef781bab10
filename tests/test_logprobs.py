"""dk.linear_logprobs / dk.logprobs (the RL primitive, docs/rl.md) against the float64 reference on the
same values: log-probs, entropy, stats and every gradient under random upstream gradients of both
outputs, with scalar and per-token temperatures, softcap, bias, ignored rows and shift, on each CPU
backend; float16/bfloat16 bounded by eager PyTorch's own error in that dtype (docs/design.md, Tests)."""

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels.options import LogprobOptions, LogprobParams, decode_plan, plan_logprobs_linear
from helpers import TOL, leaf, make_inputs, rel_err

EPS = 1e-6  # the +1e-6 of the low-precision bound (quack's style)
N, H, V = 37, 24, 300  # V not a power of two


def _temperature(kind, shape, dtype=torch.float32):
    """A scalar, per-token, per-sequence (..., 1) or 0-d tensor temperature for a target of ``shape``."""
    if kind == "scalar":
        return 0.7
    if kind == "per_token":
        return torch.rand(shape, dtype=dtype) + 0.5
    if kind == "per_sequence":
        return torch.rand((*shape[:-1], 1), dtype=dtype) * 1.5 + 0.25
    if kind == "0-d":
        return torch.tensor(1.3, dtype=dtype)
    return 1.0


def _outputs(result, kw):
    """(logp, entropy or None, stats or None) from a call's result."""
    if not isinstance(result, tuple):
        return result, None, None
    logp, *rest = result
    entropy = rest.pop(0) if kw.get("return_entropy") else None
    stats = rest.pop(0) if kw.get("return_stats") else None
    assert not rest
    return logp, entropy, stats


def _top1_agrees(top1, ref_top1, z_ref, target, margin):
    """``is_top1`` equal to the reference's wherever the reference's top-2 logits are ``margin`` apart
    (a closer pair may flip with the rounding of the logits)."""
    assert top1.dtype == torch.bool and top1.shape == ref_top1.shape
    if z_ref.shape[-1] == 1:  # one word: the target, where valid, is the argmax
        assert torch.equal(top1, ref_top1)
        return
    top2 = z_ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > margin
    assert torch.equal(top1[clear], ref_top1[clear])


def check_against_reference(x, w, b, t, dtype, *, backend="torch", linear=True, chunk_size=8, grads=("logp", "entropy"),
                            **kw):
    """Ours in ``dtype`` vs the reference in float64 on the same values: outputs, stats and the gradients
    of ``sum(a * logp + c * entropy)`` for random ``a``, ``c`` (the ``grads`` that get one).  Returns the
    measured relative errors, by name.  16-bit: each error at most 1e-2 and at most 3x that of eager
    PyTorch (the reference run in that dtype) + 1e-6."""
    kw.setdefault("return_entropy", "entropy" in grads)
    temp = kw.get("temperature", 1.0)
    ours_kw = dict(kw, temperature=temp.to(dtype) if isinstance(temp, torch.Tensor) else temp)
    ref_kw = dict(kw, temperature=temp.to(dtype).double() if isinstance(temp, torch.Tensor) else temp)  # same values
    if linear:
        ins = [leaf(x.to(dtype)), leaf(w.to(dtype)), leaf(None if b is None else b.to(dtype))]
        fn, ref_fn = dk.linear_logprobs, dk.reference.linear_logprobs
    else:
        ins = [leaf(F.linear(x, w, b).to(dtype)), None, None]
        fn, ref_fn = (lambda z, _w, target, bias=None, **k: dk.logprobs(z, target, **k),
                      lambda z, _w, target, bias=None, **k: dk.reference.logprobs(z, target, **k))
    refs = [leaf(None if a is None else a.double()) for a in ins]
    eagers = [leaf(a) for a in ins]
    out = _outputs(fn(ins[0], ins[1], t, bias=ins[2], backend=backend, chunk_size=chunk_size, **ours_kw), kw)
    ref = _outputs(ref_fn(refs[0], refs[1], t, bias=refs[2], **ref_kw), kw)
    low = dtype in (torch.float16, torch.bfloat16)
    eager = _outputs(ref_fn(eagers[0], eagers[1], t, bias=eagers[2], **ours_kw), kw) if low else None
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    errors = {}

    def bound(name, got, want, eager_value):
        e = rel_err(got, want)
        errors[name] = e
        assert e <= TOL[dtype], f"{name}: rel err {e:.3e} > {TOL[dtype]}"
        if low:
            e_eager = rel_err(eager_value, want)
            errors[name + " (eager)"] = e_eager
            assert e <= 3 * e_eager + EPS, f"{name}: rel err {e:.3e} > 3x eager {dtype} {e_eager:.3e} + {EPS}"

    for i, name in enumerate(("logp", "entropy")):
        if ref[i] is None:
            assert out[i] is None
            continue
        assert out[i].shape == ref[i].shape and out[i].dtype == wide and torch.isfinite(out[i]).all(), name
        bound(name, out[i], ref[i], None if eager is None else eager[i])
        # the outputs are float32 math on float32 logits of the 16-bit values (the precision policy):
        # as accurate as float32 whatever the input dtype
        assert rel_err(out[i], ref[i]) <= TOL[wide], f"{name}: {rel_err(out[i], ref[i]):.3e} > {TOL[wide]}"
    if kw.get("return_stats"):
        stats, rstats = out[2], ref[2]
        assert isinstance(stats, dk.LogprobStats) and not stats.sum_sq_probs.requires_grad
        assert stats.sum_sq_probs.dtype == wide and stats.sum_sq_probs.shape == rstats.sum_sq_probs.shape
        bound("sum_sq_probs", stats.sum_sq_probs, rstats.sum_sq_probs,
              None if eager is None else eager[2].sum_sq_probs)
        assert rel_err(stats.sum_sq_probs, rstats.sum_sq_probs) <= TOL[wide]
        z_ref = F.linear(x.to(dtype).double(), w.to(dtype).double(), None if b is None else b.to(dtype).double()) \
            if linear else ins[0].double()
        if kw.get("shift"):
            z_ref = z_ref[..., :-1, :]
        _top1_agrees(stats.is_top1, rstats.is_top1, z_ref, t[..., 1:] if kw.get("shift") else t,
                     0.0 if dtype == torch.float64 else 1e-4 * float(z_ref.detach().abs().max()))

    # gradients of sum(a logp + c H), fresh upstream values of both signs
    upstream = {"logp": torch.randn(ref[0].shape, dtype=torch.float64),
                "entropy": torch.randn(ref[0].shape, dtype=torch.float64)}
    pairs = [(i, name) for i, name in enumerate(("logp", "entropy")) if name in grads]
    if not pairs:
        return errors
    wrt = [a for a in ins if a is not None]
    g_ours = torch.autograd.grad(sum((out[i] * upstream[n].to(out[i].dtype)).sum() for i, n in pairs), wrt)
    g_ref = torch.autograd.grad(sum((ref[i] * upstream[n]).sum() for i, n in pairs), [a for a in refs if a is not None])
    g_eager = None
    if low:
        g_eager = torch.autograd.grad(sum((eager[i] * upstream[n].to(eager[i].dtype)).sum() for i, n in pairs),
                                      [a for a in eagers if a is not None])
    names = ["input", "weight", "bias"] if linear else ["logits"]
    for j, (name, g, rg, a) in enumerate(zip(names, g_ours, g_ref, wrt)):
        assert g.dtype == a.dtype and g.shape == a.shape and torch.isfinite(g).all(), name
        if rg.norm() == 0:
            assert g.abs().max() == 0, f"{name} grad should be exactly zero"
            continue
        bound(f"d{name}", g, rg, None if g_eager is None else g_eager[j])
    return errors


# ---------------------------------------------------------------- the option grid, float32 and float64

CASES = {
    "plain": dict(),
    "temperature": dict(temperature="scalar"),
    "per_token_temperature": dict(temperature="per_token"),
    "per_sequence_temperature": dict(temperature="per_sequence", lead=(3, 12)),
    "0-d_temperature": dict(temperature="0-d"),
    "softcap": dict(softcap=3.0),
    "softcap+temperature": dict(softcap=3.0, temperature="per_token"),
    "nobias": dict(bias=False, temperature="scalar"),
    "shift": dict(shift=True, lead=(3, 13)),
    "shift+per_token_temperature": dict(shift=True, temperature="per_token", lead=(3, 13), softcap=5.0),
    "stats": dict(return_stats=True, temperature="per_token"),
    "logp_grad_only": dict(grads=("logp",)),
    "entropy_grad_only": dict(grads=("entropy",), temperature="scalar"),
    "logp_only_no_entropy": dict(grads=("logp",), return_entropy=False, return_stats=True),
    "no_ignored": dict(ignore="none"),
}


def _case(name, dtype=torch.float32, n=N, v=V):
    spec = dict(CASES[name])
    lead, bias, ignore = spec.pop("lead", None), spec.pop("bias", True), spec.pop("ignore", "some")
    x, w, b, t = make_inputs(n, H, v, bias=bias, ignore=ignore, lead=lead)
    if "temperature" in spec:
        spec["temperature"] = _temperature(spec["temperature"], t.shape, dtype=torch.float64)
    return (x, w, b, t), spec


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32(backend, case, linear):
    args, kw = _case(case)
    check_against_reference(*args, torch.float32, backend=backend, linear=linear, **kw)


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp64_torch_backend(case, linear):
    args, kw = _case(case)
    check_against_reference(*args, torch.float64, backend="torch", linear=linear, **kw)


def test_triton_backend_takes_no_float64(backend):
    x, w, b, t = make_inputs(8, 8, 40, dtype=torch.float64)
    if backend == "torch":
        assert dk.linear_logprobs(x, w, t, bias=b, backend=backend).dtype == torch.float64
        return
    with pytest.raises(TypeError, match="logits: the triton backend takes float32"):
        dk.linear_logprobs(x, w, t, bias=b, backend=backend)
    # every row ignored and compacted away: the kernel still sees an empty chunk in that dtype
    with pytest.raises(TypeError, match="logits: the triton backend takes float32"):
        dk.linear_logprobs(x, w, torch.full_like(t, -100), bias=b, backend=backend, chunk_size=1)


def test_mostly_ignored_rows_are_compacted(backend, monkeypatch):
    """With most rows ignored (an RL batch's prompt tokens) the chunk loop runs over the valid rows
    only, in forward and in backward, and every output and gradient still matches the reference."""
    from dft_kernels import chunked

    x, w, b, t = make_inputs(64, H, V, ignore="none")
    t[torch.randperm(64)[:51]] = -100
    calls = []
    real = chunked._Compaction.plan
    monkeypatch.setattr(chunked._Compaction, "plan", staticmethod(lambda *a: calls.append(real(*a)) or calls[-1]))
    check_against_reference(x, w, b, t, torch.float32, backend=backend, chunk_size=8, return_stats=True,
                            temperature=_temperature("per_token", t.shape, torch.float64))
    assert len(calls) == 2 and all(c is not None and c.index.numel() == 13 for c in calls)


def test_all_ignored_gives_zeros_and_zero_gradients(backend):
    x, w, b, t = make_inputs(12, 8, 50, ignore="all")
    x, w, b = leaf(x), leaf(w), leaf(b)
    logp, ent, stats = dk.linear_logprobs(x, w, t, bias=b, backend=backend, return_entropy=True, return_stats=True,
                                          temperature=torch.zeros(t.shape))  # ignored tokens: any temperature
    assert torch.equal(logp, torch.zeros(12)) and torch.equal(ent, torch.zeros(12))
    assert torch.equal(stats.sum_sq_probs, torch.zeros(12)) and not stats.is_top1.any()
    (logp.sum() + ent.sum()).backward()
    for g in (x.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))


def test_result_structure_and_no_grad():
    x, w, b, t = make_inputs(2 * 5, 8, 30, lead=(2, 5))
    assert isinstance(dk.linear_logprobs(x, w, t), torch.Tensor)
    logp, ent = dk.linear_logprobs(x, w, t, return_entropy=True)
    assert logp.shape == ent.shape == (2, 5)
    logp, stats = dk.linear_logprobs(x, w, t, return_stats=True, shift=True)
    assert logp.shape == stats.sum_sq_probs.shape == stats.is_top1.shape == (2, 4)
    assert stats._fields == ("sum_sq_probs", "is_top1")
    logp, ent, stats = dk.logprobs(x @ w.t(), t, return_entropy=True, return_stats=True)
    assert logp.shape == ent.shape == (2, 5)
    xs = leaf(x)
    with torch.no_grad():
        out = dk.linear_logprobs(xs, w, t, return_entropy=True)
    assert all(o.grad_fn is None and not o.requires_grad for o in out)
    # zero at ignored positions, <= 0 elsewhere; entropy >= 0
    logp, ent = dk.linear_logprobs(x, w, t, return_entropy=True)
    assert (logp[t == -100] == 0).all() and (logp <= 0).all() and (ent >= 0).all()


def test_logits_are_not_modified(backend):
    z = torch.randn(20, 50) * 3
    z_copy = z.clone()
    zs = leaf(z)
    t = torch.randint(0, 50, (20,))
    logp, ent = dk.logprobs(zs, t, return_entropy=True, backend=backend, chunk_size=8, temperature=0.6)
    (logp.sum() - ent.sum()).backward()
    assert torch.equal(zs.detach(), z_copy)


def test_masked_vocabulary(backend):
    """-inf logits (a masked vocabulary) have no mass: finite outputs, zero gradient there."""
    z = torch.randn(16, 70, dtype=torch.float64) * 2
    z[:, 60:] = float("-inf")
    z[3, :40] = float("-inf")
    t = torch.randint(0, 40, (16,))
    t[3] = 50
    zs, zr = leaf(z.float()), leaf(z)
    out = dk.logprobs(zs, t, return_entropy=True, return_stats=True, backend=backend, chunk_size=8, temperature=1.5)
    ref = dk.reference.logprobs(zr, t, return_entropy=True, return_stats=True, temperature=1.5)
    for o, r in zip(out[:2], ref[:2]):
        assert torch.isfinite(o).all() and rel_err(o, r) <= TOL[torch.float32]
    a, c = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    (g,) = torch.autograd.grad((out[0] * a.float() + out[1] * c.float()).sum(), [zs])
    (rg,) = torch.autograd.grad((ref[0] * a + ref[1] * c).sum(), [zr])
    assert torch.isfinite(g).all() and (g[:, 60:] == 0).all() and rel_err(g, rg) <= TOL[torch.float32]


def test_target_probability_close_to_one(backend):
    """p ~ 1 - 1e-6: the target entry of the gradient (``a (1 - p)`` and the entropy's) is taken from
    ``expm1(logp)`` and ``(z - m) + gap``; ``1 - p`` in float32 would carry a ~6% error here."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(24, 500, generator=g, dtype=torch.float64)
    t = torch.randint(0, 500, (24,), generator=g)
    z[torch.arange(24), t] = 20.0  # 1 - p ~ 500 e^-20 ~ 1e-6
    zs, zr = leaf(z.float()), leaf(z.float().double())
    out = dk.logprobs(zs, t, return_entropy=True, backend=backend, chunk_size=8)
    ref = dk.reference.logprobs(zr, t, return_entropy=True)
    assert rel_err(out[0], ref[0]) <= TOL[torch.float32] and rel_err(out[1], ref[1]) <= TOL[torch.float32]
    for grads in ((1.0, 0.0), (0.0, 1.0), (1.0, -0.3)):
        (gz,) = torch.autograd.grad((grads[0] * out[0] + grads[1] * out[1]).sum(), [zs], retain_graph=True)
        (rz,) = torch.autograd.grad((grads[0] * ref[0] + grads[1] * ref[1]).sum(), [zr], retain_graph=True)
        assert rel_err(gz, rz) <= TOL[torch.float32], f"{grads}: {rel_err(gz, rz):.2e}"


# ---------------------------------------------------------------- 16-bit: bounded by eager PyTorch

LOW_CASES = ["plain", "softcap+temperature", "shift+per_token_temperature", "stats"]


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOW_CASES)
def test_16bit(backend, case, dtype, linear):
    args, kw = _case(case)
    check_against_reference(*args, dtype, backend=backend, linear=linear, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_cuda_gemm_policy(cuda_gemm_policy, backend, dtype):
    """The CUDA precision policy (float32 products of 16-bit operands, the gradient written in the
    dtype the GEMMs read) emulated on CPU."""
    args, kw = _case("softcap+temperature")
    check_against_reference(*args, dtype, backend=backend, **kw)


# ---------------------------------------------------------------- gradcheck, compile, autocast


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1, -100, 6], [0, 3, 3]])
    temp = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return dk.linear_logprobs(x, w, t, bias=b, temperature=temp, softcap=2.5, return_entropy=True,
                                  backend="torch", chunk_size=2)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    z = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t5 = torch.tensor([0, 5, -100, 2, 2])
    assert torch.autograd.gradcheck(lambda z: dk.logprobs(z, t5, temperature=0.8, shift=False, return_entropy=True,
                                                          backend="torch", chunk_size=2), (z,))


def _grpo_step(backend, **kw):
    """A GRPO-like step: a clipped ratio objective on the log-probs plus an entropy bonus."""
    def step(x, w, b, t, temp, old_logp, adv):
        logp, ent = dk.linear_logprobs(x, w, t, bias=b, temperature=temp, return_entropy=True, validate=False,
                                       backend=backend, chunk_size=8, **kw)
        ratio = torch.exp(logp - old_logp)
        mask = (t != -100).float()
        loss = -(torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * mask).sum() - 0.01 * (ent * mask).sum()
        loss.backward()
        return loss.detach()
    return step


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_grpo_step_matches_eager(backend):
    x, w, b, t = make_inputs(24, 16, 200)
    temp = torch.rand(t.shape) + 0.5
    old = dk.reference.linear_logprobs(x, w, t, bias=b, temperature=temp).detach() - 0.05
    adv = torch.randn(t.shape)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_grpo_step(backend, softcap=8.0), fullgraph=True, backend="aot_eager")
        got = [leaf(x), leaf(w), leaf(b)]
        loss = compiled(*got, t, temp, old, adv)
    want = [leaf(x), leaf(w), leaf(b)]
    expected = _grpo_step(backend, softcap=8.0)(*want, t, temp, old, adv)
    assert rel_err(loss, expected) <= 1e-6
    for g, e in zip(got, want):
        assert rel_err(g.grad, e.grad) <= 1e-6
    # and the reference in float64
    ref = [leaf(a.double()) for a in (x, w, b)]
    lp, ent = dk.reference.linear_logprobs(*ref[:2], t, bias=ref[2], temperature=temp.double(), softcap=8.0,
                                           return_entropy=True)
    ratio = torch.exp(lp - old.double())
    mask = (t != -100).double()
    adv64 = adv.double()
    rloss = -(torch.minimum(ratio * adv64, ratio.clamp(0.8, 1.2) * adv64) * mask).sum() - 0.01 * (ent * mask).sum()
    rloss.backward()
    for g, r in zip(got, ref):
        assert rel_err(g.grad, r.grad) <= 1e-5


def test_compiled_logprobs_on_logits_with_stats():
    z = torch.randn(20, 90) * 2
    t = torch.randint(0, 90, (20,))
    t[::4] = -100

    def fn(logits, target):
        logp, ent, stats = dk.logprobs(logits, target, return_entropy=True, return_stats=True, temperature=0.9,
                                       validate=False, backend="torch", chunk_size=8)
        (logp.sum() + ent.sum()).backward()
        return logp.detach(), stats.sum_sq_probs, stats.is_top1

    torch._dynamo.reset()
    zc, ze = leaf(z), leaf(z)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(zc, t)
    want = fn(ze, t)
    assert rel_err(got[0], want[0]) <= 1e-6 and rel_err(got[1], want[1]) <= 1e-6 and torch.equal(got[2], want[2])
    assert rel_err(zc.grad, ze.grad) <= 1e-6


def test_opcheck_logprob_ops():
    x, w, b, t = make_inputs(12, 8, 50)
    x, w, b = leaf(x), leaf(w), leaf(b)
    temp = torch.rand(12) + 0.5
    for flags in (dict(return_entropy=True, return_stats=True), dict()):
        opts = LogprobOptions(backend="torch", chunk_size=4, **flags)
        plan = plan_logprobs_linear(opts, x, w, b, True, True, True)
        torch.library.opcheck(dk.ops.linear_logprobs_forward, (x, w, b, t, temp, plan.encode()),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        z = leaf(torch.randn(12, 50))
        plan = dk.options.plan_logprobs_logits(opts, z, True)
        torch.library.opcheck(dk.ops.logprobs_forward, (z, t, None, plan.encode()),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_autocast_equals_the_call_on_cast_inputs():
    """Under torch.autocast the float32 operands are cast once to its dtype (gradients come back in
    float32), as the loss does: the same values as a call on bfloat16 inputs."""
    x, w, b, t = make_inputs(24, 32, 300)
    temp = torch.rand(t.shape) + 0.5

    def run(x, w, b):
        x, w, b = leaf(x), leaf(w), leaf(b)
        logp, ent = dk.linear_logprobs(x, w, t, bias=b, temperature=temp, return_entropy=True, backend="torch",
                                       chunk_size=8)
        (logp * 2 - ent).sum().backward()
        return logp.detach(), ent.detach(), x.grad, w.grad, b.grad

    expected = run(x.bfloat16(), w.bfloat16(), b.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(x, w, b)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for g, e in zip(got[2:], expected[2:]):
        assert g.dtype == torch.float32 and torch.equal(g, e.float())


# ---------------------------------------------------------------- errors, options, plan


@pytest.mark.parametrize("bad,error,match", [
    (0.0, ValueError, "temperature must be > 0"),
    (-1.0, ValueError, "temperature must be > 0"),
    (float("nan"), ValueError, "temperature must be finite"),
    (float("inf"), ValueError, "temperature must be finite"),
    (True, TypeError, "temperature must be a real number"),
    ("0.7", TypeError, "temperature must be a real number"),
])
def test_bad_scalar_temperature(bad, error, match):
    x, w, b, t = make_inputs(6, 8, 20)
    for call in (lambda: dk.linear_logprobs(x, w, t, temperature=bad),
                 lambda: dk.logprobs(x @ w.t(), t, temperature=bad),
                 lambda: dk.reference.linear_logprobs(x, w, t, temperature=bad)):
        with pytest.raises(error, match=match):
            call()


def test_bad_temperature_tensor():
    x, w, b, t = make_inputs(2 * 6, 8, 20, lead=(2, 6), ignore="none")
    t[0, 2] = -100
    call = lambda temp, **kw: dk.linear_logprobs(x, w, t, temperature=temp, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"temperature has shape \(3,\).*target \(2, 6\)"):
        call(torch.ones(3))
    with pytest.raises(ValueError, match=r"temperature has shape \(2, 6, 1\)"):
        call(torch.ones(2, 6, 1))
    with pytest.raises(TypeError, match="temperature must be a real"):
        call(torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="temperature must be a real"):
        call(torch.ones(2, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="temperature must not require grad"):
        call(torch.ones(2, 6, requires_grad=True))
    for value in (0.0, -0.5, float("nan"), float("inf")):
        temp = torch.ones(2, 6)
        temp[1, 3] = value
        with pytest.raises(ValueError, match="temperature must be finite and > 0 at every valid token"):
            call(temp)
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            dk.logprobs(x @ w.t(), t, temperature=temp)
        call(temp, validate=False)  # not checked (no host sync)
    # an ignored token's temperature is never used: padding may hold anything
    temp = torch.ones(2, 6)
    temp[0, 2] = 0.0
    assert torch.isfinite(call(temp)).all()
    # per-sequence temperatures broadcast; with shift they are taken at the target's positions
    temp = torch.tensor([[0.5], [2.0]])
    assert torch.allclose(call(temp), call(temp.expand(2, 6).contiguous()))
    shifted = dk.linear_logprobs(x, w, t, temperature=torch.arange(1.0, 13.0).view(2, 6), shift=True)
    manual = dk.linear_logprobs(x[:, :-1], w, t[:, 1:], temperature=torch.arange(1.0, 13.0).view(2, 6)[:, 1:])
    assert torch.allclose(shifted, manual)


def test_other_bad_arguments_are_named():
    x, w, b, t = make_inputs(6, 8, 20)
    with pytest.raises(ValueError, match="target holds class indices outside"):
        dk.linear_logprobs(x, w, torch.full_like(t, 20))
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        dk.linear_logprobs(x, w, t, return_entropy=1)
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        dk.logprobs(x @ w.t(), t, return_stats="yes")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        dk.linear_logprobs(x, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match="backend: unknown backend"):
        dk.linear_logprobs(x, w, t, backend="jax")
    with pytest.raises(ValueError, match="weight has shape"):
        dk.linear_logprobs(x, w[:, :3], t)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        dk.logprobs(x @ w.t(), t.float())
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        dk.linear_logprobs(x, w, t, process_group="tp")


def test_process_group_without_torch_distributed_is_named():
    """Both take vocab-parallel operands (tests/vocab_parallel/test_logprobs_parallel.py); a group with
    torch.distributed not initialised is an error naming process_group."""
    x, w, b, t = make_inputs(6, 8, 20)
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        dk.linear_logprobs(x, w, t, process_group=group)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        dk.logprobs(x @ w.t(), t, process_group=group)


def test_the_cuda_backend_declines_with_its_reason(monkeypatch):
    from dft_kernels import backends, options

    cuda = backends.get_backend("cuda")
    assert "no 'logprobs' path" in cuda.supports("logprobs", LogprobParams())
    monkeypatch.setattr(backends, "candidates", lambda name, device: ("cuda",) if name == "cuda" else
                        ("triton", "cuda", "torch"))
    with pytest.raises(ValueError, match="backend: 'cuda' cannot compute log-probs: .*no 'logprobs' path"):
        options._logprob_steps("cuda", torch.device("cuda"))
    # with "auto" it is skipped: the triton kernel first, torch as its fallback
    assert options._logprob_steps("auto", torch.device("cuda")) == (("triton", "logprobs"), ("torch", "logprobs"))


@pytest.mark.parametrize("fn", [dk.linear_logprobs, dk.logprobs, dk.reference.linear_logprobs,
                                dk.reference.logprobs])
def test_signatures_take_every_option_with_its_default(fn):
    params = inspect.signature(fn).parameters
    defaults = {f: LogprobOptions.__dataclass_fields__[f].default for f in LogprobOptions.__dataclass_fields__}
    assert {n: params[n].default for n in defaults} == defaults
    assert all(params[n].kind == inspect.Parameter.KEYWORD_ONLY for n in defaults)
    if fn.__module__ == "dft_kernels.rl":
        assert all(f"{n}=" in fn.__doc__ for n in defaults)
    first = ["input", "weight", "target"] if "linear" in fn.__name__ else ["logits", "target"]
    assert list(params)[:len(first)] == first


def test_plan_round_trip_and_steps():
    x, w = torch.randn(300, 8, dtype=torch.bfloat16), torch.randn(1000, 8, dtype=torch.bfloat16)
    opts = LogprobOptions(temperature=0.6, softcap=12.5, ignore_index=7, shift=True, return_entropy=True,
                          return_stats=True, backend="torch", chunk_size=3, validate=False)
    plan = plan_logprobs_linear(opts, x, w, None, True, True, True)
    assert decode_plan(plan.encode()) == plan
    assert plan.steps == (("torch", "logprobs"),) and not plan.need_db  # no bias, no bias gradient
    assert plan.params == LogprobParams(7, 12.5, 0.6, True, True)
    assert plan_logprobs_linear(LogprobOptions(), x, w, None, True, True, False).steps == (("torch", "logprobs"),)


@pytest.mark.parametrize("n,v", [(1, 5), (5, 1), (3, 2000)])
def test_odd_shapes_and_non_contiguous_input(backend, n, v):
    """One row, a one-word vocabulary (logp = H = 0, zero gradients), a row longer than a block; the
    input a non-contiguous view."""
    x, w, b, t = make_inputs(n, 12, v, ignore="none")
    x = torch.cat([x, x], dim=1)[:, ::2]  # a strided view of the same values
    assert not x.is_contiguous()
    check_against_reference(x, w, b, t, torch.float32, backend=backend, chunk_size=2, return_stats=True,
                            temperature=_temperature("per_token", t.shape, torch.float64))


# ---------------------------------------------------------------- a real head on a GPU (gpu marker)

REF_ROWS = 256


def _real_head_check(device, n, h, v, dtype, backend, chunk_size=None):
    """linear_logprobs at a head shape on ``device`` against the float64 reference computed in chunks
    of rows (its ``dW`` summed over them in float64), with eager PyTorch in ``dtype`` as the scale of
    the 16-bit gradients' bound (3x eager + 1e-6, and 1e-2)."""
    g = torch.Generator(device=device).manual_seed(17)
    x = torch.randn(n, h, generator=g, device=device).to(dtype)
    w = (torch.randn(v, h, generator=g, device=device) * (2.0 / h ** 0.5)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    t[torch.rand(n, generator=g, device=device) < 0.3] = -100
    temp = torch.rand(n, generator=g, device=device) + 0.5
    a, c = (torch.randn(n, generator=g, device=device, dtype=torch.float64) for _ in range(2))
    kw = dict(temperature=temp, softcap=30.0, return_entropy=True)
    xs, ws = leaf(x), leaf(w)
    logp, ent = dk.linear_logprobs(xs, ws, t, backend=backend, chunk_size=chunk_size, **kw)
    (logp * a.float() + ent * c.float()).sum().backward()
    ref_logp, ref_ent = (torch.empty(n, dtype=torch.float64, device=device) for _ in range(2))
    ref_dx = torch.empty(n, h, dtype=torch.float64, device=device)
    ref_dw = torch.zeros(v, h, dtype=torch.float64, device=device)
    eager_dx = torch.empty(n, h, dtype=dtype, device=device)
    eager_dw = torch.zeros(v, h, dtype=torch.float64, device=device)
    for s in range(0, n, REF_ROWS):
        e = min(s + REF_ROWS, n)
        rows = dict(kw, temperature=temp[s:e])
        xr, wr = leaf(x[s:e].double()), leaf(w.double())
        lp, en = dk.reference.linear_logprobs(xr, wr, t[s:e], **rows)
        ref_logp[s:e], ref_ent[s:e] = lp.detach(), en.detach()
        gx, gw = torch.autograd.grad((lp * a[s:e] + en * c[s:e]).sum(), [xr, wr])
        ref_dx[s:e] = gx
        ref_dw += gw
        del xr, wr, lp, en, gx, gw
        if dtype != torch.float32:
            xe, we = leaf(x[s:e]), leaf(w)
            lp, en = dk.reference.linear_logprobs(xe, we, t[s:e], **dict(rows, temperature=temp[s:e].to(dtype)))
            gx, gw = torch.autograd.grad((lp * a[s:e].to(dtype) + en * c[s:e].to(dtype)).sum(), [xe, we])
            eager_dx[s:e] = gx
            eager_dw += gw.double()
            del xe, we, lp, en, gx, gw
    tol = TOL[torch.float32]  # the outputs: float32 math on float32 logits of the input's values
    assert rel_err(logp, ref_logp) <= tol and rel_err(ent, ref_ent) <= tol
    for name, got, ref, eager in (("input", xs.grad, ref_dx, eager_dx), ("weight", ws.grad, ref_dw, eager_dw)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        e = rel_err(got, ref)
        assert e <= TOL[dtype], f"{name} grad: {e:.3e} > {TOL[dtype]}"
        if dtype != torch.float32:
            e_eager = rel_err(eager.to(dtype), ref)  # eager's gradient in its dtype
            assert e <= 3 * e_eager + EPS, f"{name} grad: {e:.3e} > 3x eager {e_eager:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_real_head_on_gpu(backend, dtype):
    """Llama-3-8B's head (V 128256, H 4096), 1024 tokens, the default chunk size."""
    _real_head_check("cuda", 1024, 4096, 128256, dtype, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_real_head_check_on_cpu(dtype):
    """The GPU test's own code, on CPU at a small shape (so that it is known to run)."""
    _real_head_check("cpu", 300, 32, 1000, dtype, "torch", chunk_size=64)
