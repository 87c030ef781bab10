"""backend="auto" on CUDA: skip unavailable backends, and when one raises, hand the rest of *that call*
to the next, logging the reason once; the next call starts from the plan again (nothing is switched
off for the process).  A named backend raises.

Runs on CPU with fake backend modules: the device is only a label for the resolver.
"""

import logging
import sys
import types

import pytest
import torch

import dft_kernels as dk
from dft_kernels import backends, chunked
from dft_kernels.options import LossOptions, LossPlan, _plan_steps
from helpers import check_linear_against_reference, make_inputs

GPU = torch.device("cuda", 0)


def fake_backend(name, *, available=True, reason="", error=None, result=None):
    """A module implementing the contract's surface; records its calls."""
    mod = types.ModuleType(f"fake_{name}")
    mod.calls = 0

    def is_available(device):
        return available, reason

    def row_loss_grad(logits, target, params, token_weights=None, grad_scale=None, grad_out=None):
        mod.calls += 1
        if error is not None:
            raise error
        return result

    mod.NAME, mod.is_available, mod.row_loss_grad = name, is_available, row_loss_grad
    mod.supports = lambda path, params: "" if path == "rows" else "fake"
    return mod


@pytest.fixture
def fakes(monkeypatch):
    """Install fake backends under the names 'triton' and 'cuda'; returns an installer."""
    monkeypatch.setattr(backends, "_logged", set())

    def install(**mods):
        table = dict(backends.BACKENDS)
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, mod.__name__, mod)
            table[name] = mod.__name__
        monkeypatch.setattr(backends, "BACKENDS", table)

    return install


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "dft_kernels" and r.levelno == logging.WARNING]


def steps(name="auto", device=GPU):
    """The row steps of one call planned with ``backend=name`` on ``device``."""
    opts = LossOptions(backend=name)
    plan = LossPlan(opts, _plan_steps(opts, device, "fake GEMMs"), 8, torch.float32, torch.float32, torch.float32)
    return chunked.RowSteps(plan)


def call(rows):
    return rows(None, None, None, None, None, None)[0]


def test_raising_backend_falls_back_for_the_call_and_is_tried_again_next_call(fakes, caplog):
    tri = fake_backend("triton", error=RuntimeError("PTX too new for this driver"))
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    rows = steps()
    assert not warnings_of(caplog)
    assert call(rows) == "from-cuda"
    assert (tri.calls, cu.calls) == (1, 1)
    logs = warnings_of(caplog)
    assert len(logs) == 1 and "'triton' failed" in logs[0] and "PTX too new" in logs[0] and "'cuda'" in logs[0]
    # the rest of the call stays on cuda
    for _ in range(3):
        assert call(rows) == "from-cuda"
    assert (tri.calls, cu.calls) == (1, 4)
    # a new call starts from triton again; the same reason is not logged twice
    assert call(steps()) == "from-cuda"
    assert (tri.calls, cu.calls) == (2, 5)
    assert len(warnings_of(caplog)) == 1


def test_missing_triton_is_skipped_with_reason(fakes, caplog):
    tri = fake_backend("triton", available=False, reason="No module named 'triton'")
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    assert backends.candidates("auto", GPU) == ("cuda", "torch")
    assert call(steps()) == "from-cuda"
    assert tri.calls == 0
    logs = warnings_of(caplog)
    assert len(logs) == 1 and "No module named 'triton'" in logs[0]
    backends.candidates("auto", GPU)
    assert len(warnings_of(caplog)) == 1


def test_fallback_chain_reaches_torch_and_last_error_propagates(fakes):
    tri = fake_backend("triton", error=RuntimeError("triton broke"))
    cu = fake_backend("cuda", error=RuntimeError("nvcc broke"))
    fakes(triton=tri, cuda=cu)
    torch_fake = fake_backend("torch", error=ValueError("torch says no"))
    fakes(torch=torch_fake)
    rows = steps()
    with pytest.raises(ValueError, match="torch says no"):
        call(rows)
    assert (tri.calls, cu.calls, torch_fake.calls) == (1, 1, 1)
    with pytest.raises(ValueError, match="torch says no"):  # the last backend's errors are not swallowed
        call(rows)
    assert (tri.calls, cu.calls, torch_fake.calls) == (1, 1, 2)


def test_error_of_last_available_backend_is_raised_unchanged(fakes):
    tri = fake_backend("triton", error=RuntimeError("triton broke"))
    cu = fake_backend("cuda", available=False, reason="no nvcc")
    torch_fake = fake_backend("torch", available=False, reason="disabled")
    fakes(triton=tri, cuda=cu, torch=torch_fake)
    with pytest.raises(RuntimeError, match="triton broke"):
        call(steps())


def test_a_named_backend_raises_instead_of_falling_back(fakes):
    tri = fake_backend("triton", error=RuntimeError("triton broke"))
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    with pytest.raises(RuntimeError, match="triton broke"):
        call(steps("triton"))
    assert cu.calls == 0


def test_out_of_memory_is_not_a_reason_to_fall_back(fakes):
    tri = fake_backend("triton", error=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        call(steps())
    assert cu.calls == 0


def test_nothing_available_is_a_clear_error(fakes):
    fakes(triton=fake_backend("triton", available=False, reason="no triton"),
          cuda=fake_backend("cuda", available=False, reason="no nvcc"),
          torch=fake_backend("torch", available=False, reason="off"))
    with pytest.raises(ValueError, match="no backend is available on device cuda:0"):
        backends.candidates("auto", GPU)


def test_fallback_end_to_end_gives_reference_results(fakes, monkeypatch, caplog):
    """A first backend that raises inside the real chunk loop: results still match the reference,
    and every call tries it first again."""
    failing = fake_backend("triton", error=RuntimeError("compile failed"))
    fakes(triton=failing)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    x, w, b, t = make_inputs(21, 16, 300)
    for reduction in ("mean", "none"):
        check_linear_against_reference(x, w, b, t, torch.float32, backend="auto", objective="dft",
                                       reduction=reduction, chunk_size=8)
    assert failing.calls == 3  # mean: one op call; none: forward and backward, each its own op call
    assert len(warnings_of(caplog)) == 1
    assert dk.linear_cross_entropy(x, w, t, bias=b, backend="auto").isfinite()
