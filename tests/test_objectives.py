"""The objective registry: values, coefficients g = dL/dlogp, names, parameters (docs/design.md, Objectives)."""

import pytest
import torch

import dft_kernels as dk
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.reference import eaft_entropy, token_loss
from helpers import OBJECTIVES as CASES
from helpers import obj_id


@pytest.mark.parametrize("objective", CASES, ids=obj_id)
def test_coefficient_is_the_derivative_of_the_reference_loss(objective):
    """g from objectives.py (what the kernels use) vs autograd through the reference's own
    formula (with its detach() stop-gradients), at fresh random logits."""
    obj = dk.get_objective(objective)
    z = torch.randn(64, 50, dtype=torch.float64) * 2
    t = torch.randint(0, 50, (64,))
    logp = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1).detach().requires_grad_()
    ref_loss, entropy = token_loss(obj.name, obj, logp, z, 0.0, 0.0)
    (ref_g,) = torch.autograd.grad(ref_loss.sum(), logp)
    ent = None if entropy is None else entropy.detach()
    if obj.entropy_top_k is not None:  # the H its weight reads (the reference returns the exact one)
        ent = eaft_entropy(z, obj.entropy_top_k)
    obj = obj.resolve(50)
    g = obj.coefficient(logp.detach(), ent)
    assert torch.allclose(g, ref_g, rtol=1e-12, atol=1e-14)
    assert torch.allclose(obj.loss(logp.detach(), ent), ref_loss.detach(), rtol=1e-12, atol=1e-14)


def test_table_values():
    logp = torch.log(torch.tensor([0.2, 0.9], dtype=torch.float64))
    p = logp.exp()
    assert torch.allclose(dk.CE().coefficient(logp), torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(dk.DFT().coefficient(logp), -p)
    assert torch.allclose(dk.DFT(min_weight=0.5).coefficient(logp), -p.clamp_min(0.5))
    assert torch.allclose(dk.Power(alpha=0.0).coefficient(logp), dk.CE().coefficient(logp))
    assert torch.allclose(dk.Power(alpha=1.0).coefficient(logp), dk.DFT().coefficient(logp))
    assert torch.allclose(dk.Chord().coefficient(logp), -p * (1 - p))
    assert torch.allclose(dk.Prob(k=2.0).loss(logp), -p ** 2)
    assert torch.allclose(dk.Focal(gamma=0.0).loss(logp), -logp)
    H = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(dk.Entropy(scale=2.0).coefficient(logp, H), -2.0 * torch.exp(-H))


def test_focal_coefficient_is_finite_at_p_one():
    logp = torch.zeros(3, dtype=torch.float64)
    for gamma in (0.5, 1.0, 2.0):
        assert torch.isfinite(dk.Focal(gamma=gamma).coefficient(logp)).all()


def test_registry_and_strings():
    assert set(OBJECTIVES) == {"ce", "dft", "power", "focal", "chord", "prob", "entropy", "eaft"}
    for name, cls in OBJECTIVES.items():
        assert dk.get_objective(name) == cls()
        assert dk.get_objective(name.upper()) == cls()
        assert cls.needs_entropy == (name in ("entropy", "eaft"))
    assert dk.get_objective(dk.DFT(min_weight=0.1)).min_weight == 0.1
    assert dk.get_objective(dk.Focal) == dk.Focal()
    ids = [cls.kernel_id for cls in OBJECTIVES.values()]
    assert len(set(ids)) == len(ids)


def test_entropy_objective_needs_entropy():
    with pytest.raises(ValueError, match="entropy"):
        dk.Entropy().coefficient(torch.zeros(2))


@pytest.mark.parametrize("name,obj", [("ce", dk.CE()), ("dft", dk.DFT(min_weight=0.0)), ("power", dk.Power(1.0)),
                                      ("focal", dk.Focal(2.0)), ("chord", dk.Chord()), ("prob", dk.Prob(k=1.0)),
                                      ("entropy", dk.Entropy(scale=1.0)),
                                      ("eaft", dk.EAFT(alpha=1.0, top_k=None, normalizer=None))])
def test_string_and_object_give_the_same_loss(name, obj):
    x, w = torch.randn(10, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (10,))
    a = dk.linear_cross_entropy(x, w, t, objective=name)
    b = dk.linear_cross_entropy(x, w, t, objective=obj)
    assert torch.equal(a, b)
    c = dk.linear_cross_entropy(x, w, t, objective=dk.DFT(min_weight=0.5))
    if name != "ce":
        assert not torch.equal(a, c)
