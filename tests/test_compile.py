"""torch.compile(fullgraph=True) of training steps that call the fused loss (docs/design.md, Data path).

The chunk loop runs inside the ``dft_kernels::*`` custom ops (``dft_kernels/ops.py``), so
a compiled step has no graph break (``fullgraph=True`` raises on one) and no host sync
(``validate=False``).  Compiled results are compared with eager ones and with the float64
reference.
"""

import pytest
import torch

import dft_kernels as dk
from helpers import leaf, make_inputs, rel_err

N, H, V = 24, 16, 200


def _step(backend, **kw):
    def step(x, w, b, t):
        loss = dk.linear_cross_entropy(x, w, t, bias=b, backend=backend, validate=False, chunk_size=8, **kw)
        loss.sum().backward()
        return loss.detach()
    return step


def _run(step, x, w, b, t):
    x, w, b = leaf(x), leaf(w), leaf(b)
    loss = step(x, w, b, t)
    return loss, x.grad, w.grad, b.grad


@pytest.mark.parametrize("reduction,compiler", [("mean", "inductor"), ("none", "aot_eager")])
def test_compiled_training_step_matches_eager(reduction, compiler):
    """Forward and backward in one fullgraph-compiled function (autograd traced by dynamo)."""
    x, w, b, t = make_inputs(N, H, V)
    kw = dict(objective=dk.DFT(min_weight=0.1), reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_step("torch", **kw), fullgraph=True, backend=compiler)
        got = _run(compiled, x, w, b, t)
        # a second call with fresh values reuses the graph and is still right
        x2, w2, b2, t2 = make_inputs(N, H, V)
        got2 = _run(compiled, x2, w2, b2, t2)
    for inputs, out in (((x, w, b, t), got), ((x2, w2, b2, t2), got2)):
        want = _run(_step("torch", **kw), *inputs)
        for name, g, e in zip(("loss", "input", "weight", "bias"), out, want):
            assert g.shape == e.shape and torch.isfinite(g).all(), name
            assert rel_err(g, e) <= 1e-5, f"{name}: {rel_err(g, e):.2e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_head_and_loss_against_reference(backend):
    """The usual pattern: a compiled model + loss with fullgraph=True, backward outside
    (AOTAutograd's compiled backward calls the registered op backward)."""
    head = torch.nn.Linear(H, V, bias=True)
    x, _, _, t = make_inputs(N, H, V, lead=(2, N // 2))

    def model_loss(inp, target, tw):
        return dk.linear_cross_entropy(inp, head.weight, target, bias=head.bias, objective="entropy",
                                       token_weights=tw, shift=True, softcap=5.0, validate=False,
                                       backend=backend, chunk_size=8)

    tw = torch.rand(t.shape) + 0.5
    torch._dynamo.reset()
    compiled = torch.compile(model_loss, fullgraph=True, backend="aot_eager")
    xs = leaf(x)
    loss = compiled(xs, t, tw)
    loss.backward()

    xr, wr, br = leaf(x.double()), leaf(head.weight.double()), leaf(head.bias.double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, objective="entropy", token_weights=tw,
                                            shift=True, softcap=5.0)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5
    for g, r in ((xs.grad, xr.grad), (head.weight.grad, wr.grad), (head.bias.grad, br.grad)):
        assert rel_err(g, r) <= 1e-5


def test_compiled_cross_entropy_and_stats():
    """dk.cross_entropy on given logits, and return_stats, also compile without a break."""
    z = torch.randn(N, V, dtype=torch.float32) * 2
    t = torch.randint(0, V, (N,))
    t[::5] = -100

    def fn(logits, target):
        loss, stats = dk.cross_entropy(logits, target, objective="chord", reduction="sum", return_stats=True,
                                       validate=False, backend="torch", chunk_size=8)
        return loss, stats.nll, stats.accuracy

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    zc = leaf(z)
    loss, nll, acc = compiled(zc, t)
    loss.backward()
    zr = leaf(z.double())
    ref, rstats = dk.reference.cross_entropy(zr, t, objective="chord", reduction="sum", return_stats=True)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(zc.grad, zr.grad) <= 1e-5
    assert rel_err(nll, rstats.nll) <= 1e-5 and rel_err(acc, rstats.accuracy) <= 1e-6


def _op_args(reduction):
    x, w, b, t = make_inputs(12, 8, 50)
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    options = dk.options.LossOptions("dft", return_stats=True, label_smoothing=0.1, reduction=reduction,
                                     backend="torch", chunk_size=4)
    plan = dk.options.plan_linear(options, x, w, b, True, True, True)
    divisor = torch.tensor(9.0) if reduction == "mean" else None
    return (x, w, b, t, None, divisor, plan.encode())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_op(reduction):
    """Schema, fake (meta) implementation and registered autograd agree with the real op."""
    torch.library.opcheck(dk.ops.lce_forward, _op_args(reduction),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_logits_op():
    z = torch.randn(10, 30, requires_grad=True)
    t = torch.randint(0, 30, (10,))
    for reduction in ("sum", "none"):
        options = dk.options.LossOptions("entropy", return_stats=True, reduction=reduction, backend="torch",
                                         chunk_size=4)
        plan = dk.options.plan_logits(options, z, True)
        torch.library.opcheck(dk.ops.ce_forward, (z, t, None, None, plan.encode()),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fullgraph_detects_the_validation_host_sync():
    """validate=True reads the targets on the host: fullgraph=True refuses it, which shows that
    the tests above would catch a break or sync in the loss path."""
    x, w, b, t = make_inputs(N, H, V)

    def fn(inp, target):
        return dk.linear_cross_entropy(inp, w, target, bias=b, backend="torch", validate=True)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)graph break|unsupported|data-dependent|tolist|item"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x, t)


@pytest.mark.parametrize("num_items", [23, 23.0])
def test_python_num_items_is_not_a_host_to_device_copy(monkeypatch, num_items):
    """``torch.tensor(python_number, device=cuda)`` is a blocking host-to-device copy; a python
    ``num_items_in_batch`` (what Hugging Face passes) must become a device tensor without one
    (``torch.full`` is a fill kernel).  Traced here on CPU by recording ``torch.tensor`` calls."""
    x, w, b, t = make_inputs(N, H, V)
    calls = []
    real_tensor = torch.tensor

    def recording_tensor(data, *args, **kwargs):
        if isinstance(data, (int, float)) and "device" in kwargs:
            calls.append((data, kwargs["device"]))
        return real_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording_tensor)
    loss = dk.linear_cross_entropy(x, w, t, bias=b, backend="torch", num_items_in_batch=num_items)
    monkeypatch.undo()
    assert calls == [], f"python scalar copied to the device with torch.tensor: {calls}"
    ref = dk.reference.linear_cross_entropy(x.double(), w.double(), t, bias=b.double(), num_items_in_batch=num_items)
    assert rel_err(loss, ref) <= 1e-5


def test_a_float_option_that_changes_between_calls():
    """Dynamo makes a float that changed since the last compile a symbolic float, which cannot be
    encoded into the ops' options (docs/compile.md): it raises rather than computing anything wrong,
    and with ``specialize_float=True`` each value compiles as a constant and the loss follows it."""
    x, w, b, t = make_inputs(N, H, V)

    def loss_of(x, w, t, objective):
        return dk.linear_cross_entropy(x, w, t, objective=objective, validate=False, chunk_size=8)

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    compiled(x, w, t, dk.DFT(min_weight=0.1))
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):  # 2.13: Unsupported; 2.11: InternalTorchDynamoError
        compiled(x, w, t, dk.DFT(min_weight=0.2))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
        for min_weight in (0.1, 0.2, 0.3):
            got = compiled(x, w, t, dk.DFT(min_weight=min_weight))
            want = dk.reference.linear_cross_entropy(x.double(), w.double(), t, objective=dk.DFT(min_weight=min_weight))
            assert rel_err(got, want) <= 1e-5, min_weight
    torch._dynamo.reset()
