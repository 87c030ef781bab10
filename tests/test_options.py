"""The loss options are declared once (dft_kernels.options.LossOptions): every public entry point
takes exactly those options with those defaults, and the ops' encoding round-trips them."""

import inspect
import subprocess
import sys

import pytest
import torch

import dft_kernels as dk
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.options import LINEAR_ONLY_OPTIONS, OPTION_NAMES, LossOptions, decode

DEFAULTS = {name: f.default for name, f in LossOptions.__dataclass_fields__.items()}


def _options_taken(fn):
    params = inspect.signature(fn).parameters
    return {name: p.default for name, p in params.items() if name in DEFAULTS}, params


@pytest.mark.parametrize("fn,linear", [
    (dk.linear_cross_entropy, True), (dk.reference.linear_cross_entropy, True),
    (dk.cross_entropy, False), (dk.reference.cross_entropy, False), (dk.LinearCrossEntropyLoss, True),
])
def test_public_signatures_take_every_option_with_its_default(fn, linear):
    taken, params = _options_taken(fn)
    expected = {n: d for n, d in DEFAULTS.items() if linear or n not in LINEAR_ONLY_OPTIONS}
    assert taken == expected
    # options are keywords (objective may also come first in the module)
    assert all(params[n].kind == inspect.Parameter.KEYWORD_ONLY for n in taken if n != "objective")
    for name in taken:  # and the docstring documents each of them
        assert f"{name}=" in fn.__doc__


def test_patch_and_compute_loss_func_options_are_derived():
    assert set(dk.hf.PATCH_LOSS_KWARGS) <= set(OPTION_NAMES)
    assert {"softcap", "shift", "return_stats", "objective"}.isdisjoint(dk.hf.PATCH_LOSS_KWARGS)
    assert set(dk.hf.COMPUTE_LOSS_KWARGS) == set(dk.hf.PATCH_LOSS_KWARGS) - set(LINEAR_ONLY_OPTIONS) - {"reduction"}
    # every option is either taken by patch or refused with a reason
    refused = {n for n in OPTION_NAMES if n not in dk.hf.PATCH_LOSS_KWARGS and n != "objective"}
    for name in refused:
        with pytest.raises(TypeError, match=f"does not take '{name}'"):
            dk.hf.check_loss_kwargs({name: None})


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_encode_decode_round_trip(objective):
    obj = OBJECTIVES[objective]()
    opts = LossOptions(obj, ignore_index=7, reduction="sum", softcap=12.5, shift=True, return_stats=True,
                       backend="torch", chunk_size=3, accum_dtype=torch.bfloat16, logits_dtype=torch.bfloat16,
                       validate=False,
                       **({"label_smoothing": 0.1, "z_loss": 1e-4} if obj.is_weighted_nll else {}))
    assert decode(opts.encode()) == opts
    resolved = decode(opts.encode(chunk_size=64, accum_dtype=torch.float64))
    assert (resolved.chunk_size, resolved.accum_dtype, resolved.objective) == (64, torch.float64, obj)
    assert decode(LossOptions(dk.DFT(min_weight=0.1 + 1e-12)).encode()).objective.min_weight == 0.1 + 1e-12


def test_unregistered_objective_subclass_is_refused_by_the_ops():
    class MyDFT(dk.DFT):
        pass

    with pytest.raises(TypeError, match="objective.*not a registered objective"):
        LossOptions(MyDFT()).encode()


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(backend=3), TypeError, "backend"), (dict(backend="cudnn"), ValueError, "backend"),
    (dict(chunk_size=0), ValueError, "chunk_size"), (dict(accum_dtype=torch.int8), TypeError, "accum_dtype"),
    (dict(logits_dtype=torch.float32), TypeError, "logits_dtype"),
    (dict(objective="prob", label_smoothing=0.2), ValueError, "label_smoothing"),
])
def test_options_are_checked_on_construction(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        LossOptions(**kwargs)
    with pytest.raises(exc, match=name):  # the module checks at construction, not at the first batch
        dk.LinearCrossEntropyLoss(**kwargs)


def test_import_does_not_load_dynamo():
    code = "import sys, dft_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
