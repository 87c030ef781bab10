"""The loss options are declared once (dft_kernels.options.LossOptions): every public entry point
takes exactly those options with those defaults; the plan they resolve into round-trips through
the ops' encoding; no environment variable is read inside the kernel package."""

import inspect
import subprocess
import sys

import pytest
import torch

import dft_kernels as dk
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.options import LINEAR_ONLY_OPTIONS, OPTION_NAMES, LossOptions, LossPlan, decode_plan

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
def test_plan_encode_decode_round_trip(objective):
    obj = OBJECTIVES[objective]()
    opts = LossOptions(obj, ignore_index=7, reduction="sum", softcap=12.5, shift=True, return_stats=True,
                       backend="torch", chunk_size=3, chunk_bytes=1 << 20, autotune=True,
                       accum_dtype=torch.bfloat16, logits_dtype=torch.bfloat16, factored=False, validate=False,
                       **({"label_smoothing": 0.1, "z_loss": 1e-4} if obj.is_weighted_nll else {}))
    plan = LossPlan(opts, (("torch", "rows"),), 64, torch.bfloat16, torch.float32, torch.float64, True, False, True)
    assert decode_plan(plan.encode()) == plan
    assert decode_plan(LossPlan(LossOptions(dk.DFT(min_weight=0.1 + 1e-12)), (("torch", "rows"),), 1, torch.float32,
                                torch.float32, torch.float32).encode()).options.objective.min_weight == 0.1 + 1e-12


def test_plan_is_resolved_once_from_the_options_and_tensors():
    x, w = torch.randn(300, 8, dtype=torch.bfloat16), torch.randn(1000, 8, dtype=torch.bfloat16)
    plan = dk.options.plan_linear(LossOptions(accum_dtype=None), x, w, None, True, True, False)
    assert plan.steps == (("torch", "rows"),) and plan.chunk_size == 512  # 300 tokens: a multiple of 256
    assert (plan.logits_dtype, plan.grad_dtype, plan.accum_dtype) == (torch.float32, torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="factored=True: .*torch backend"):
        dk.options.plan_linear(LossOptions(factored=True), x, w, None, True, True, False)
    with pytest.raises(ValueError, match="fused_head: .*torch"):
        dk.options.plan_linear(LossOptions(fused_head=True), x, w, None, True, True, False)


def test_unregistered_objective_subclass_is_refused_by_the_ops():
    class MyDFT(dk.DFT):
        pass

    with pytest.raises(TypeError, match="objective.*not a registered objective"):
        LossPlan(LossOptions(MyDFT()), (("torch", "rows"),), 1, torch.float32, torch.float32, torch.float32).encode()


def test_no_environment_variable_is_read_inside_the_kernel_package():
    """Every knob is an option: outside the trainer, the integrations and the CUDA build (its
    conventional variables), no file of the package reads ``os.environ``."""
    import pathlib

    root = pathlib.Path(dk.__file__).parent
    allowed = {root / "backends" / "_cuda_build.py", root / "backends" / "cuda.py"}
    readers = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if p not in allowed and p.relative_to(root).parts[0] not in ("train", "integrations")
               and ("os.environ" in p.read_text() or "getenv" in p.read_text())]
    assert readers == []


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(backend=3), TypeError, "backend"), (dict(backend="cudnn"), ValueError, "backend"),
    (dict(chunk_size=0), ValueError, "chunk_size"), (dict(accum_dtype=torch.int8), TypeError, "accum_dtype"),
    (dict(chunk_bytes=0), ValueError, "chunk_bytes"), (dict(factored=1), TypeError, "factored"),
    (dict(fused_head="yes"), TypeError, "fused_head"), (dict(autotune=None), TypeError, "autotune"),
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
