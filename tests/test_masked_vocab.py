"""Masked vocabulary: ``-inf`` logits (constrained decoding vocabularies, padded heads) in every backend.

A ``-inf`` logit has probability 0 and a zero gradient; the loss, stats and gradient of the
rest of the row are those of the row without it.  Blockwise kernels must get there whatever
the mask looks like at their block size: scattered masked columns, whole masked blocks at
the start of a row (the running max is still ``-inf`` when the next block is merged), in
the middle and at the end, and rows whose only finite logit is the target.  Checked through
``dk.cross_entropy`` against the float64 reference, for every objective.
"""

import re

import pytest
import torch
from conftest import triton_cpu_unavailable_reason
from test_csrc_emulation import emulator, make_op  # noqa: F401  (emulator: the fixture building it)

import dft_kernels as dk
from dft_kernels.backends import _cuda_build
from dft_kernels.backends import cuda as cuda_backend
from helpers import OBJECTIVES, declined, leaf, obj_id, rel_err

try:
    from dft_kernels.backends import triton as tb
except ImportError:  # no triton on this platform
    tb = None

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INF = float("inf")
SMALL_BLOCK = 64  # the triton block forced under the interpreter (its default block covers V)

# (backend, triton launch config or None): the triton backend with a forced small block (on
# CPU under the interpreter, whose default block covers V) and, on GPUs, its default launch
BACKENDS = [
    pytest.param(("torch", None), id="torch"),
    pytest.param(("triton", (4, SMALL_BLOCK, 4)), id="triton-rows4-block64"),
    pytest.param(("triton", "default"), id="triton-gpu-default", marks=pytest.mark.gpu),
    pytest.param(("cuda", None), id="cuda-gpu", marks=pytest.mark.gpu),
    pytest.param(("cuda-emulated", None), id="cuda-emulated"),
]


@pytest.fixture
def masked_backend(request, monkeypatch):
    """(backend name for dk.cross_entropy, triton block size the mask is laid out for)."""
    name, config = request.param
    if name == "triton":
        if tb is None:
            pytest.skip("triton is not installed")
        if config == "default":
            return "triton", tb.MAX_BLOCK  # V > MAX_BLOCK below: the default launch uses MAX_BLOCK
        if DEVICE == "cpu" and triton_cpu_unavailable_reason():
            pytest.skip(f"triton backend on CPU tensors: {triton_cpu_unavailable_reason()}")
        monkeypatch.setattr(tb, "block_config", lambda vocab_size, **flags: config)
        return "triton", SMALL_BLOCK
    if name == "cuda":
        ok, reason = cuda_backend.is_available(torch.device(DEVICE))
        if not ok:
            pytest.skip(f"cuda backend unavailable: {reason}")
        return "cuda", tb.MAX_BLOCK  # any layout works for csrc (per-element merge): GPU-sized rows
    if name == "cuda-emulated":
        if CUDA:
            pytest.skip("the host emulation of csrc/ runs in the CPU suite")
        if _cuda_build.find_nvcc() is None:
            pytest.skip("nvcc not found: cannot build the host emulation of csrc/")
        fn = request.getfixturevalue("emulator")
        monkeypatch.setattr(cuda_backend, "_op", lambda: make_op(fn))
        monkeypatch.setattr(cuda_backend, "is_available", lambda device: (True, ""))
        return "cuda", SMALL_BLOCK
    return "torch", SMALL_BLOCK


def masked_rows(n: int, block: int):
    """``[n, V]`` float32 logits (std 2) with ``V = 5 block + 37`` and, in every row, ``-inf`` at:
    the first two blocks and a bit more, scattered columns, and ``[3 block + 7, 5 block)``
    (block 4 entirely).  Targets lie in the finite columns; row 0 has two finite logits."""
    v = 5 * block + 37
    z = torch.randn(n, v, dtype=torch.float64) * 2
    masked = torch.zeros(v, dtype=torch.bool)
    masked[: 2 * block + 10] = True
    masked[[2 * block + 20, 3 * block + 1, v - 1]] = True
    masked[3 * block + 7: 5 * block] = True
    free = (~masked).nonzero().squeeze(1)
    t = free[torch.randint(0, len(free), (n,))]
    z[:, masked] = -INF
    # row 0: one other finite logit (the target alone would give p = 1, where the reference's
    # autograd gradient of focal with gamma < 1 is 0 * inf)
    other = free[0] if t[0] != free[0] else free[-1]
    z[0] = -INF
    z[0, t[0]], z[0, other] = 1.5, -0.5
    t[n // 2] = -100
    return z.float(), t


@pytest.mark.parametrize("masked_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("objective,option", [
    pytest.param(objective, option, id=f"{obj_id(objective)}-{name}")
    for objective in OBJECTIVES
    for name, option in (("plain", {}), ("softcap", dict(softcap=3.0)), ("zloss", dict(z_loss=1e-3)))
    if "z_loss" not in option or dk.get_objective(objective).is_weighted_nll  # else rejected (test_errors)
])
def test_masked_logits_match_reference(masked_backend, objective, option):
    backend, block = masked_backend
    z, t = masked_rows(7, block)
    z, t = z.to(DEVICE), t.to(DEVICE)
    tw = torch.rand(t.shape, device=DEVICE) + 0.5
    kw = dict(objective=objective, token_weights=tw, reduction="none", return_stats=True, **option)
    zs, zr = leaf(z), leaf(z.double())
    reason = declined(backend, objective)
    if reason:  # the backend declines the objective: the call says why
        with pytest.raises(ValueError, match=re.escape(reason)):
            dk.cross_entropy(zs, t, backend=backend, **kw)
        pytest.skip(f"the {backend} backend declines {obj_id(objective)} (and says why): {reason}")
    loss, stats = dk.cross_entropy(zs, t, backend=backend, **kw)
    ref, rstats = dk.reference.cross_entropy(zr, t, **kw)
    assert torch.isfinite(ref).all(), "the reference itself must be finite here"
    assert torch.isfinite(loss).all(), f"non-finite loss {loss}"
    assert rel_err(loss, ref) <= 1e-5, f"loss rel err {rel_err(loss, ref):.2e}"
    grad_out = torch.rand(ref.shape, dtype=torch.float64, device=DEVICE) + 0.5
    loss.backward(grad_out.float())
    ref.backward(grad_out)
    assert torch.isfinite(zs.grad).all()
    if "softcap" not in option:
        assert (zs.grad[z == -INF] == 0).all(), "masked entries must get an exactly zero gradient"
    assert rel_err(zs.grad, zr.grad) <= 1e-5, f"grad rel err {rel_err(zs.grad, zr.grad):.2e}"
    for field in ("nll", "mean_prob", "accuracy", "entropy"):
        got, want = getattr(stats, field), getattr(rstats, field)
        assert (got is None) == (want is None), field
        if got is not None:
            assert torch.isfinite(got) and rel_err(got, want) <= 1e-5, f"{field}: {got} vs {want}"


@pytest.mark.parametrize("masked_backend", BACKENDS, indirect=True)
def test_masked_logits_with_label_smoothing_give_inf_as_torch(masked_backend):
    """The smoothed target puts mass on masked entries: the loss is +inf, as in F.cross_entropy."""
    backend, block = masked_backend
    z, t = masked_rows(5, block)
    z, t = z.to(DEVICE), t.to(DEVICE)
    loss = dk.cross_entropy(z, t, objective="ce", label_smoothing=0.1, backend=backend, reduction="none")
    want = torch.nn.functional.cross_entropy(z.double(), t, label_smoothing=0.1, reduction="none")
    valid = t != -100
    assert torch.equal(torch.isposinf(loss[valid]), torch.isposinf(want[valid])) and torch.isposinf(loss[valid]).all()
    assert (loss[~valid] == 0).all()
