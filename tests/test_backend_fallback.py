"""backend="auto" on CUDA: skip unavailable backends and fall back when one raises, logging once.

Runs on CPU with fake backend modules: the device is only a label for the resolver.
"""

import logging
import sys
import types

import pytest
import torch

import dft_kernels as dk
from dft_kernels import backends
from helpers import check_linear_against_reference, make_inputs

GPU = torch.device("cuda", 0)


def fake_backend(name, *, available=True, reason="", error=None, result=None):
    """A module implementing the contract's surface; records its calls."""
    mod = types.ModuleType(f"fake_{name}")
    mod.calls = 0

    def is_available(device):
        return available, reason

    def row_loss_grad(logits, target, params, token_weights=None, grad_scale=None):
        mod.calls += 1
        if error is not None:
            raise error
        return result

    mod.NAME, mod.is_available, mod.row_loss_grad = name, is_available, row_loss_grad
    return mod


@pytest.fixture
def fakes(monkeypatch):
    """Install fake backends under the names 'triton' and 'cuda'; returns an installer."""
    monkeypatch.setattr(backends, "_auto_backends", {})
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


def test_raising_backend_falls_back_once_and_for_good(fakes, caplog):
    tri = fake_backend("triton", error=RuntimeError("PTX too new for this driver"))
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    be = backends.resolve_backend("auto", GPU)
    assert be.name == "triton" and not warnings_of(caplog)
    assert be.row_loss_grad(None, None, None) == "from-cuda"
    assert (tri.calls, cu.calls, be.name) == (1, 1, "cuda")
    logs = warnings_of(caplog)
    assert len(logs) == 1 and "'triton' failed" in logs[0] and "PTX too new" in logs[0] and "'cuda'" in logs[0]
    # Later calls, through the same or a fresh resolve, go straight to cuda and log nothing.
    for _ in range(3):
        assert backends.resolve_backend("auto", GPU).row_loss_grad(None, None, None) == "from-cuda"
    assert backends.resolve_backend("auto", GPU) is be
    assert (tri.calls, cu.calls) == (1, 4)
    assert len(warnings_of(caplog)) == 1


def test_missing_triton_is_skipped_with_reason(fakes, caplog):
    tri = fake_backend("triton", available=False, reason="No module named 'triton'")
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    be = backends.resolve_backend("auto", GPU)
    assert be.name == "cuda"
    assert be.row_loss_grad(None, None, None) == "from-cuda"
    assert tri.calls == 0
    logs = warnings_of(caplog)
    assert len(logs) == 1 and "No module named 'triton'" in logs[0]
    backends.resolve_backend("auto", GPU)
    assert len(warnings_of(caplog)) == 1


def test_fallback_chain_reaches_torch_and_last_error_propagates(fakes):
    tri = fake_backend("triton", error=RuntimeError("triton broke"))
    cu = fake_backend("cuda", error=RuntimeError("nvcc broke"))
    fakes(triton=tri, cuda=cu)
    torch_fake = fake_backend("torch", error=ValueError("torch says no"))
    fakes(torch=torch_fake)
    be = backends.resolve_backend("auto", GPU)
    with pytest.raises(ValueError, match="torch says no"):
        be.row_loss_grad(None, None, None)
    assert (tri.calls, cu.calls, torch_fake.calls, be.name) == (1, 1, 1, "torch")
    with pytest.raises(ValueError, match="torch says no"):  # the last backend's errors are not swallowed
        be.row_loss_grad(None, None, None)
    assert (tri.calls, cu.calls, torch_fake.calls) == (1, 1, 2)


def test_error_of_last_available_backend_is_raised_unchanged(fakes):
    tri = fake_backend("triton", error=RuntimeError("triton broke"))
    cu = fake_backend("cuda", available=False, reason="no nvcc")
    torch_fake = fake_backend("torch", available=False, reason="disabled")
    fakes(triton=tri, cuda=cu, torch=torch_fake)
    be = backends.resolve_backend("auto", GPU)
    with pytest.raises(RuntimeError, match="triton broke"):
        be.row_loss_grad(None, None, None)


def test_out_of_memory_is_not_a_reason_to_fall_back(fakes):
    tri = fake_backend("triton", error=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    cu = fake_backend("cuda", result="from-cuda")
    fakes(triton=tri, cuda=cu)
    be = backends.resolve_backend("auto", GPU)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        be.row_loss_grad(None, None, None)
    assert be.name == "triton" and cu.calls == 0


def test_nothing_available_is_a_clear_error(fakes):
    fakes(triton=fake_backend("triton", available=False, reason="no triton"),
          cuda=fake_backend("cuda", available=False, reason="no nvcc"),
          torch=fake_backend("torch", available=False, reason="off"))
    with pytest.raises(ValueError, match="no backend is available on device cuda:0"):
        backends.resolve_backend("auto", GPU)


def test_one_fallback_backend_per_device(fakes):
    fakes(triton=fake_backend("triton", result=1), cuda=fake_backend("cuda", result=2))
    a = backends.resolve_backend("auto", torch.device("cuda", 0))
    b = backends.resolve_backend("auto", torch.device("cuda", 1))
    assert a is not b and a is backends.resolve_backend("auto", torch.device("cuda", 0))


def test_fallback_end_to_end_gives_reference_results(fakes, monkeypatch, caplog):
    """A first backend that raises inside the real chunk loop: results still match the reference."""
    failing = fake_backend("triton", error=RuntimeError("compile failed"))
    fakes(triton=failing)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    caplog.set_level(logging.WARNING, logger="dft_kernels")
    x, w, b, t = make_inputs(21, 16, 300)
    for reduction in ("mean", "none"):
        check_linear_against_reference(x, w, b, t, torch.float32, backend="auto", objective="dft",
                                       reduction=reduction, chunk_size=8)
    assert failing.calls == 1
    assert len(warnings_of(caplog)) == 1
    assert isinstance(backends.resolve_backend("auto", torch.device("cpu")), backends.FallbackBackend)
    assert dk.linear_cross_entropy(x, w, t, bias=b, backend="auto").isfinite()
