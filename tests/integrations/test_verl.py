"""dft_kernels.integrations.verl.linear_cross_entropy, the drop-in for verl's fused head kernel.

Against the float64 reference under verl's documented conventions (always), and against verl's own
torch path ``FusedLinearForPPO`` when verl is importable (not in the test environment: verl pins
transformers < 5.11 and pulls in ray; docs/rl.md, verl, has the numbers of that comparison).
"""

from __future__ import annotations

import pytest
import torch

import dft_kernels as dk
from dft_kernels.integrations.verl import linear_cross_entropy

TEMPERATURE = 0.7


def case(dtype=torch.float64, b=2, t=9, h=16, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    return hidden, weight, labels


def reference(hidden, weight, labels, temperature):
    """verl's documented math in float64: logprobs = +log softmax(z / T)[label], entropy of softmax(z / T)."""
    z = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t() / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    logp, ent = outputs
    up = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in (logp, ent)]
    loss = (logp * up[0]).sum() + (ent * up[1]).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape3d", [True, False], ids=["BTH", "NH"])
def test_none_reduction_against_float64(dtype, tol, shape3d):
    hidden, weight, labels = case(dtype)
    if not shape3d:
        hidden = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()
        labels = labels.reshape(-1)
    logp, ent = linear_cross_entropy(hidden, weight, labels, TEMPERATURE, "none")
    n = labels.numel()
    assert logp.shape == (n,) and ent.shape == (n,)          # flattened, as verl returns them
    assert logp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_logp, want_ent = reference(hidden, weight, labels, TEMPERATURE)
    assert (logp <= 0).all()                                  # log-probabilities, not losses
    assert (logp.double() - want_logp).abs().max() <= tol * want_logp.abs().max()
    assert (ent.double() - want_ent).abs().max() <= tol * want_ent.abs().max()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    got = grads((logp, ent), (hidden, weight))
    want = grads(reference(h64, w64, labels, TEMPERATURE), (h64, w64))
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a.double() - b).norm() <= tol * b.norm()


@pytest.mark.parametrize("reduction", ["sum", "mean", "MEAN"])
def test_sum_and_mean_reduce_logprobs_only(reduction):
    hidden, weight, labels = case()
    logp, ent = linear_cross_entropy(hidden, weight, labels, TEMPERATURE, reduction)
    want_logp, want_ent = reference(hidden, weight, labels, TEMPERATURE)
    want = want_logp.sum() if reduction == "sum" else want_logp.mean()
    assert logp.shape == () and ent.shape == (labels.numel(),)
    assert torch.allclose(logp, want, rtol=1e-12, atol=0)
    assert torch.allclose(ent, want_ent, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(logp, hidden)
    (w,) = torch.autograd.grad(want, hidden)
    assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)


def test_same_as_linear_logprobs():
    hidden, weight, labels = case(torch.float32)
    logp, ent = linear_cross_entropy(hidden, weight, labels, 1.5)
    want = dk.linear_logprobs(hidden, weight, labels, temperature=1.5, return_entropy=True)
    assert torch.equal(logp, want[0].reshape(-1)) and torch.equal(ent, want[1].reshape(-1))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dist_process_group": object()}, TypeError, "process_group must be a torch.distributed ProcessGroup"),
    ({"temperature": torch.tensor(0.7)}, TypeError, "temperature must be a Python float"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
])
def test_errors_name_the_argument(kwargs, error, match):
    hidden, weight, labels = case()
    args = dict(temperature=TEMPERATURE, reduction="none", dist_process_group=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, labels, **args)


def test_labels_are_all_scored():
    hidden, weight, labels = case()
    for bad in (-100, 97):
        wrong = labels.clone()
        wrong[1, 3] = bad
        with pytest.raises(ValueError, match=r"labels must all be token ids in \[0, 97\)"):
            linear_cross_entropy(hidden, weight, wrong)
    with pytest.raises(ValueError, match="labels must have the leading shape"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_against_verl_torch_path(dtype, tol):
    """verl's FusedLinearForPPO (its torch path, the reference its fused kernel is tested against)."""
    tf = pytest.importorskip("verl.utils.experimental.torch_functional")
    hidden, weight, labels = case(dtype, b=2, t=33, h=64, v=1000)
    theirs = tf.FusedLinearForPPO(chunk_size=16)(hidden, weight, labels, temperature=TEMPERATURE)
    ours = linear_cross_entropy(hidden, weight, labels, TEMPERATURE, "none")
    theirs = [t.reshape(-1) for t in theirs]
    for a, b in zip(ours, theirs):
        assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max()
    ga = grads(ours, (hidden, weight))
    gb = grads(theirs, (hidden, weight))
    for a, b in zip(ga, gb):
        err = float((a.double() - b.double()).norm() / b.double().norm())
        print(f"\nverl FusedLinearForPPO vs ours ({dtype}): grad rel err {err:.2e}")
        assert err <= tol
