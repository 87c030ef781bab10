"""Bad input gets a clear ValueError/TypeError that names the argument (docs/design.md, Public API)."""

import math

import pytest
import torch

import dft_kernels as dk
from helpers import make_inputs

N, H, V = 6, 8, 50


def _inputs():
    x, w, _, t = make_inputs(N, H, V, bias=False, ignore="none")
    return x, w, t


LCE_CASES = {
    "input not a tensor": (lambda x, w, t: dict(input=x.tolist()), TypeError, "input"),
    "input int": (lambda x, w, t: dict(input=x.long()), TypeError, "input"),
    "weight 1-D": (lambda x, w, t: dict(weight=w[0]), ValueError, "weight"),
    "weight wrong H": (lambda x, w, t: dict(weight=torch.randn(V, H + 1)), ValueError, "weight"),
    "weight dtype": (lambda x, w, t: dict(weight=w.double()), TypeError, "weight"),
    "target float": (lambda x, w, t: dict(target=t.float()), TypeError, "target"),
    "target bool": (lambda x, w, t: dict(target=t > 3), TypeError, "target"),
    "target shape": (lambda x, w, t: dict(target=t[:-1]), ValueError, "target"),
    "target too large": (lambda x, w, t: dict(target=torch.full_like(t, V)), ValueError, "target"),
    "target negative": (lambda x, w, t: dict(target=torch.full_like(t, -1)), ValueError, "target"),
    "bias shape": (lambda x, w, t: dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    "bias dtype": (lambda x, w, t: dict(bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias"),
    "unknown objective": (lambda x, w, t: dict(objective="sft"), ValueError, "objective"),
    "objective type": (lambda x, w, t: dict(objective=3), TypeError, "objective"),
    "unknown backend": (lambda x, w, t: dict(backend="cudnn"), ValueError, "backend"),
    "unknown reduction": (lambda x, w, t: dict(reduction="avg"), ValueError, "reduction"),
    "num_items zero": (lambda x, w, t: dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    "num_items negative": (lambda x, w, t: dict(num_items_in_batch=-3), ValueError, "num_items_in_batch"),
    "num_items tensor zero": (lambda x, w, t: dict(num_items_in_batch=torch.tensor(0)), ValueError,
                              "num_items_in_batch"),
    "num_items with none": (lambda x, w, t: dict(num_items_in_batch=4, reduction="none"), ValueError,
                            "num_items_in_batch"),
    "num_items string": (lambda x, w, t: dict(num_items_in_batch="4"), TypeError, "num_items_in_batch"),
    "softcap zero": (lambda x, w, t: dict(softcap=0.0), ValueError, "softcap"),
    "softcap nan": (lambda x, w, t: dict(softcap=math.nan), ValueError, "softcap"),
    "label_smoothing > 1": (lambda x, w, t: dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "label_smoothing nan": (lambda x, w, t: dict(label_smoothing=math.nan), ValueError, "label_smoothing"),
    "z_loss negative": (lambda x, w, t: dict(z_loss=-1e-4), ValueError, "z_loss"),
    "focal + smoothing": (lambda x, w, t: dict(objective="focal", label_smoothing=0.1), ValueError,
                          "label_smoothing"),
    "prob + z_loss": (lambda x, w, t: dict(objective="prob", z_loss=1e-4), ValueError, "z_loss"),
    "token_weights shape": (lambda x, w, t: dict(token_weights=torch.ones(N + 1)), ValueError, "token_weights"),
    "token_weights int": (lambda x, w, t: dict(token_weights=torch.ones(N, dtype=torch.long)), TypeError,
                          "token_weights"),
    "token_weights grad": (lambda x, w, t: dict(token_weights=torch.ones(N, requires_grad=True)), ValueError,
                           "token_weights"),
    "chunk_size zero": (lambda x, w, t: dict(chunk_size=0), ValueError, "chunk_size"),
    "chunk_size float": (lambda x, w, t: dict(chunk_size=2.5), TypeError, "chunk_size"),
    "accum_dtype int": (lambda x, w, t: dict(accum_dtype=torch.int32), TypeError, "accum_dtype"),
    "ignore_index float": (lambda x, w, t: dict(ignore_index=-100.0), TypeError, "ignore_index"),
    "shift without sequence": (lambda x, w, t: dict(input=x[0], target=t[0], shift=True), ValueError, "shift"),
}


# The reference accepts these (same signature) but has no use for them.
REFERENCE_IGNORES = {"backend", "chunk_size", "accum_dtype"}


@pytest.mark.parametrize("case", list(LCE_CASES))
def test_linear_cross_entropy_rejects(case):
    x, w, t = _inputs()
    make, exc, name = LCE_CASES[case]
    args = dict(input=x, weight=w, target=t)
    args.update(make(x, w, t))
    inp, weight, target = args.pop("input"), args.pop("weight"), args.pop("target")
    with pytest.raises(exc, match=name):
        dk.linear_cross_entropy(inp, weight, target, **args)
    if name in REFERENCE_IGNORES:
        return
    # the reference has the same contract
    with pytest.raises(exc, match=name):
        dk.reference.linear_cross_entropy(inp, weight, target, **args)


@pytest.mark.parametrize("make,name", [
    (lambda: dk.DFT(min_weight=-0.1), "min_weight"),
    (lambda: dk.DFT(min_weight=1.5), "min_weight"),
    (lambda: dk.DFT(min_weight=math.nan), "min_weight"),
    (lambda: dk.Power(alpha=-1.0), "alpha"),
    (lambda: dk.Power(alpha=math.inf), "alpha"),
    (lambda: dk.Focal(gamma=-2.0), "gamma"),
    (lambda: dk.Focal(gamma=math.nan), "gamma"),
    (lambda: dk.Prob(k=0.0), "k"),
    (lambda: dk.Prob(k=-1.0), "k"),
    (lambda: dk.Entropy(scale=-1.0), "scale"),
    (lambda: dk.Entropy(scale=math.nan), "scale"),
])
def test_objective_parameters_rejected(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_objective_parameter_type():
    with pytest.raises(TypeError, match="alpha"):
        dk.Power(alpha="1")


def test_validate_false_skips_the_target_check():
    x, w, t = _inputs()
    t[0] = V + 5
    dk.linear_cross_entropy(x, w, t, validate=False)  # masked, not raised
    with pytest.raises(ValueError, match="target"):
        dk.linear_cross_entropy(x, w, t)


def test_device_mismatch_is_named():
    x, w, t = _inputs()
    meta_w = torch.empty(V, H, device="meta")
    with pytest.raises(ValueError, match="weight"):
        dk.linear_cross_entropy(x, meta_w, t)
    with pytest.raises(ValueError, match="target"):
        dk.linear_cross_entropy(x, w, t.to("meta"))


def test_unavailable_backend_names_the_reason():
    x, w, t = _inputs()
    with pytest.raises(ValueError, match="backend.*cuda.*not available"):
        dk.linear_cross_entropy(x, w, t, backend="cuda")


@pytest.mark.parametrize("kwargs,name,exc", [
    (dict(logits=torch.randn(N, V).long()), "logits", TypeError),
    (dict(target=torch.randint(0, V, (N + 1,))), "target", ValueError),
    (dict(objective="nope"), "objective", ValueError),
    (dict(reduction="mean", num_items_in_batch=0), "num_items_in_batch", ValueError),
])
def test_cross_entropy_rejects(kwargs, name, exc):
    args = dict(logits=torch.randn(N, V), target=torch.randint(0, V, (N,)))
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        dk.cross_entropy(args.pop("logits"), args.pop("target"), **args)


def test_module_rejects_at_construction():
    with pytest.raises(ValueError, match="objective"):
        dk.LinearCrossEntropyLoss(objective="unknown")
    with pytest.raises(ValueError, match="label_smoothing"):
        dk.LinearCrossEntropyLoss(objective="focal", label_smoothing=0.1)
