"""The CUDA kernel's per-row code, run on the CPU, against the float64 reference.

There is no GPU in CI, but the kernel's math lives in dft_kernels/csrc/row_kernel.cuh as
__host__ __device__ functions.  tests/backends/csrc_emulator.cu runs exactly that code on the host
(threads one after another, tree merge, epilogue, pass 2), compiled with nvcc into a small
shared library called through ctypes.  Plugged in behind the real ``dft_kernels.backends.cuda``
wrapper, it gets the correctness checks of the other backends.  Needs nvcc (skips otherwise);
what it cannot cover (cub reduction, launch, device libm) is left to tests/backends/test_cuda_backend.py.
"""

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

import dft_kernels as dk
from dft_kernels.backends import _cuda_build, valid_rows
from dft_kernels.backends import cuda as cuda_backend
from dft_kernels.backends import torch as torch_backend
from dft_kernels.options import make_loss_params
from helpers import OBJECTIVES, TOL, WEIGHTED_NLL, declined, make_inputs, obj_id, rel_err
from helpers import check_linear_against_reference as _check_on_device

NVCC = _cuda_build.find_nvcc()

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: cannot build the host emulation of csrc/")


def check_linear_against_reference(*args, **kwargs):
    """The shared check, kept on the CPU: the emulated cuda backend computes CPU tensors."""
    return _check_on_device(*args, device=torch.device("cpu"), **kwargs)

TYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Same defines torch's extension build uses for nvcc: no implicit half/bfloat16 conversions.
NO_CONVERSIONS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                  "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    out = tmp_path_factory.mktemp("csrc_emulator") / "libdftk_emulator.so"
    src = Path(__file__).with_name("csrc_emulator.cu")
    cmd = [NVCC, "-shared", "-O2", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{_cuda_build.CSRC_DIR}",
           *NO_CONVERSIONS, "-Xcompiler", "-Wall", "-Xcompiler", "-Werror", str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    lib = ctypes.CDLL(str(out))
    fn = lib.dftk_emulate_row_loss_grad
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [ptr, i32, i64, i32, i64, ptr, i64, i32, f32, f32, f32, f32, f32, ptr, ptr, i64,
                   ptr, ptr, ptr, ptr, ptr, i32]
    fn.restype = i32
    return fn


def make_op(fn, nthreads=None):
    """A CPU stand-in for torch.ops.dft_kernels_cuda.row_loss_grad (same signature and outputs).

    nthreads None uses the real kernel's block size for the row length."""
    def op(logits, target, token_weights, grad_scale, kernel_id, param0, param1, ignore_index, softcap,
           label_smoothing, z_loss, with_entropy, with_stats):
        n, vocab = logits.shape
        assert logits.stride(1) == 1 and target.is_contiguous() and target.dtype == torch.int64
        threads = nthreads or (512 if vocab >= 4096 else 128)
        # Poisoned outputs: every entry must be written.
        nan = lambda k: torch.full((k,), float("nan"))  # noqa: E731
        loss, nll, prob = nan(n), nan(n), nan(n)
        entropy, correct = nan(n if with_entropy else 0), nan(n if with_stats else 0)
        ptr = lambda t: None if t is None or t.numel() == 0 else t.data_ptr()  # noqa: E731
        rc = fn(logits.data_ptr(), TYPE_CODES[logits.dtype], n, vocab, logits.stride(0), target.data_ptr(),
                ignore_index, kernel_id, param0, param1, softcap, label_smoothing, z_loss, ptr(token_weights),
                ptr(grad_scale), 1 if grad_scale is not None and grad_scale.dim() == 1 else 0,
                ptr(loss), ptr(nll), ptr(prob), ptr(entropy), ptr(correct), threads)
        assert rc == 0
        return loss, nll, prob, entropy, correct
    return op


@pytest.fixture
def emulated_cuda_backend(emulator, monkeypatch):
    """backend="cuda" on CPU tensors, through the real cuda.py wrapper, computed by the emulation."""
    monkeypatch.setattr(cuda_backend, "_op", lambda: make_op(emulator))
    monkeypatch.setattr(cuda_backend, "is_available", lambda device: (True, ""))
    return "cuda"


# ---- the row contract, directly: emulation vs the torch backend in float64 ----

def _misaligned_rows(n, vocab, dtype, offset):
    """[n, V] logits (std ~3) whose data starts `offset` elements into a buffer, so rows are
    not 16-byte aligned and the scalar head / vector body / tail split is exercised."""
    buf = torch.randn(n * vocab + offset, dtype=torch.float64) * 3.0
    return buf.to(dtype)[offset:].view(n, vocab)


CONTRACT_OPTIONS = {
    "plain": dict(),
    "softcap": dict(softcap=4.0),
    "smooth+zloss": dict(label_smoothing=0.15, z_loss=1e-2),
    "all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0),
}


def _contract_cases():
    """(dtype, objective, option): every valid pair in float32; 16-bit inputs with no and all options."""
    for dtype, options in ((torch.float32, list(CONTRACT_OPTIONS)), (torch.bfloat16, ["plain", "all"]),
                           (torch.float16, ["plain", "all"])):
        for objective in OBJECTIVES:
            if declined("cuda", objective):
                continue  # EAFT(top_k): the wrapper refuses it (test_linear_ce_fp32 checks the reason)
            for option in options:
                smoothing = "label_smoothing" in CONTRACT_OPTIONS[option]
                if smoothing and not dk.get_objective(objective).is_weighted_nll:
                    continue  # rejected for focal/prob (tested in test_errors)
                yield pytest.param(dtype, objective, option, id=f"{str(dtype)[6:]}-{obj_id(objective)}-{option}")


@pytest.mark.parametrize("dtype,objective,option", list(_contract_cases()))
def test_row_contract_matches_float64(emulator, dtype, objective, option):
    opts = CONTRACT_OPTIONS[option]
    params = make_loss_params(objective, ignore_index=-100, with_stats=True, **opts)
    for vocab, nthreads, offset in ((1, 4, 0), (3, 2, 1), (13, 3, 3), (1000, 128, 1), (4099, 512, 5), (777, 1, 2)):
        n = 9
        logits = _misaligned_rows(n, vocab, dtype, offset)
        target = torch.randint(0, vocab, (n,))
        target[1], target[4] = -100, vocab  # ignored, out of range
        if n > 7:
            target[7] = -(10 ** 12)
        weights = torch.rand(n) + 0.5
        scale = torch.rand(n, dtype=torch.float64) + 0.5
        ref_logits = logits.double()  # overwritten by the float64 gradient below
        ref = torch_backend.row_loss_grad(ref_logits, target, params, weights.double(), scale)
        if dtype == torch.float16:
            # A per-row loss scale bringing each gradient row to max |g| = 1, as GradScaler would:
            # otherwise tiny gradients (prob k=2: ~1e-12) underflow float16 itself, whatever computes them.
            row_max = ref_logits.abs().amax(dim=1)
            factor = torch.where(row_max > 0, 1.0 / row_max, torch.ones_like(row_max))
            scale, ref_logits = scale * factor, ref_logits * factor[:, None]
        ours = cuda_backend_outputs(make_op(emulator, nthreads), logits, target, params, weights, scale.float())
        valid = valid_rows(target, -100, vocab)
        for name in ("loss", "nll", "prob", "entropy", "correct"):
            got, want = getattr(ours[0], name), getattr(ref, name)
            assert (got is None) == (want is None), name
            if got is None:
                continue
            assert got.dtype == torch.float32 and got.shape == (n,)
            assert torch.all(got[~valid] == 0), f"{name} not zero at invalid rows"
            if name == "correct":
                assert torch.equal(got, want.float()), f"argmax differs (V={vocab})"
                continue
            err = rel_err(got, want)
            assert err <= 1e-5, f"{name} rel err {err:.2e} (V={vocab}, {dtype})"
        grad = ours[1]
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert torch.all(grad[~valid] == 0), "gradient rows of invalid targets must be zero"
        err = rel_err(grad, ref_logits)
        assert err <= TOL[dtype], f"grad rel err {err:.2e} > {TOL[dtype]} (V={vocab}, {dtype})"


def cuda_backend_outputs(op, logits, target, params, weights, scale):
    """Forward-only call (logits must stay untouched), then the in-place gradient call."""
    import unittest.mock as mock
    with mock.patch.object(cuda_backend, "_op", lambda: op):
        before = logits.clone()
        fwd = cuda_backend.row_loss_grad(logits, target, params, weights)
        assert torch.equal(logits, before), "forward-only call modified logits"
        out = cuda_backend.row_loss_grad(logits, target, params, weights, scale)
    for name in ("loss", "nll", "prob"):
        assert torch.equal(getattr(fwd, name), getattr(out, name)), name
    return out, logits


def test_scalar_grad_scale_and_no_token_weights(emulator):
    params = make_loss_params("dft")
    logits = _misaligned_rows(5, 300, torch.float32, 3)
    target = torch.randint(0, 300, (5,))
    ref_logits = logits.double()
    ref = torch_backend.row_loss_grad(ref_logits, target, params, None, torch.tensor(0.37, dtype=torch.float64))
    out, grad = cuda_backend_outputs(make_op(emulator, 32), logits, target, params, None, torch.tensor(0.37))
    assert rel_err(out.loss, ref.loss) <= 1e-5 and out.entropy is None and out.correct is None
    assert rel_err(grad, ref_logits) <= 1e-5


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_grad_out_through_the_in_place_kernel(emulated_cuda_backend, grad_dtype):
    """The contract's grad_out on the cuda backend (backends.via_in_place): the gradient of the
    in-place kernel, rounded once to grad_out's dtype; the logits untouched."""
    params = make_loss_params("dft")
    logits = torch.randn(6, 400) * 2
    target = torch.randint(0, 400, (6,))
    expected = logits.clone()
    cuda_backend.row_loss_grad(expected, target, params, None, torch.tensor(0.5))
    before = logits.clone()
    grad_out = torch.empty(6, 400, dtype=grad_dtype)
    cuda_backend.row_loss_grad(logits, target, params, None, torch.tensor(0.5), grad_out=grad_out)
    assert torch.equal(logits, before) and torch.equal(grad_out, expected.to(grad_dtype))


def test_confident_rows_keep_precision(emulator):
    """p ~ 1: logp and the target gradient come from log1p/expm1, not from 1 - p."""
    params = make_loss_params("ce")
    logits = torch.randn(4, 5000) * 0.1
    target = torch.tensor([0, 17, 4999, 2500])
    logits[torch.arange(4), target] = 40.0  # p = 1 - ~1e-14
    ref_logits = logits.double()
    ref = torch_backend.row_loss_grad(ref_logits, target, params, None, torch.tensor(1.0, dtype=torch.float64))
    out, grad = cuda_backend_outputs(make_op(emulator), logits, target, params, None, torch.tensor(1.0))
    assert rel_err(out.nll, ref.nll) <= 1e-5 and (out.nll > 0).all()
    assert rel_err(grad, ref_logits) <= 1e-5


def test_rows_past_int32(emulated_cuda_backend):
    """Rows at element offsets past 2^31 (tests/test_scale.py): the kernel's per-row code reads
    and writes only its own rows, and every output matches the float64 reference."""
    from test_scale import check_row_kernel_past_int32

    check_row_kernel_past_int32(emulated_cuda_backend, "cpu")


# ---- the correctness suite, through dk.linear_cross_entropy(backend="cuda") ----

@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_fp32(emulated_cuda_backend, objective, reduction):
    x, w, b, t = make_inputs(37, 32, 1000)
    check_linear_against_reference(x, w, b, t, torch.float32, backend=emulated_cuda_backend, objective=objective,
                                   reduction=reduction)


@pytest.mark.parametrize("objective", WEIGHTED_NLL, ids=obj_id)
def test_linear_ce_options_fp32(emulated_cuda_backend, objective):
    x, w, b, t = make_inputs(30, 24, 4100, lead=(3, 10))
    check_linear_against_reference(x, w, b, t, torch.float32, backend=emulated_cuda_backend, objective=objective,
                                   softcap=5.0, z_loss=1e-2, label_smoothing=0.2, shift=True,
                                   token_weights=torch.rand(t.shape) * 2, reduction="none")
    check_linear_against_reference(x, w, b, t, torch.float32, backend=emulated_cuda_backend, objective=objective,
                                   num_items_in_batch=23)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
def test_linear_ce_low_precision(emulated_cuda_backend, dtype, objective):
    x, w, b, t = make_inputs(40, 32, 1000)
    check_linear_against_reference(x, w, b, t, dtype, backend=emulated_cuda_backend, objective=objective)


@pytest.mark.parametrize("n,h,v", [(5, 16, 32001), (1, 16, 1000), (1, 8, 3), (33, 8, 7)],
                         ids=["V32001", "N1", "N1V3", "Vtiny"])
def test_linear_ce_odd_shapes(emulated_cuda_backend, n, h, v):
    x, w, b, t = make_inputs(n, h, v, ignore="none")
    for objective in ("dft", "focal", "entropy"):
        check_linear_against_reference(x, w, b, t, torch.float32, backend=emulated_cuda_backend,
                                       objective=objective, reduction="none", chunk_size=4)


@pytest.mark.parametrize("ignore", ["none", "all"])
def test_linear_ce_ignore_and_stats(emulated_cuda_backend, ignore):
    x, w, b, t = make_inputs(29, 16, 500, ignore=ignore, ignore_index=7)
    check_linear_against_reference(x, w, b, t, torch.float32, backend=emulated_cuda_backend, objective="entropy",
                                   ignore_index=7)
    loss, stats = dk.linear_cross_entropy(x, w, t, bias=b, backend=emulated_cuda_backend, ignore_index=7,
                                          objective="entropy", return_stats=True)
    rloss, rstats = dk.reference.linear_cross_entropy(x.double(), w.double(), t, bias=b.double(), ignore_index=7,
                                                      objective="entropy", return_stats=True)
    for field in ("num_tokens", "nll", "mean_prob", "accuracy", "entropy"):
        got, want = getattr(stats, field), getattr(rstats, field)
        assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6), field


def test_cross_entropy_on_logits(emulated_cuda_backend):
    logits = torch.randn(4, 9, 1001) * 2
    t = torch.randint(0, 1001, (4, 9))
    for objective in ("dft", dk.Focal(gamma=0.5)):
        a = logits.clone().requires_grad_()
        r = logits.double().requires_grad_()
        out = dk.cross_entropy(a, t, objective=objective, backend=emulated_cuda_backend, shift=True)
        ref = dk.reference.cross_entropy(r, t, objective=objective, shift=True)
        assert rel_err(out, ref) <= 1e-5
        out.backward()
        ref.backward()
        assert rel_err(a.grad, r.grad) <= 1e-5


def test_float64_logits_are_rejected_with_a_clear_error(emulated_cuda_backend):
    with pytest.raises(TypeError, match="logits: the cuda backend takes float32, bfloat16 or float16"):
        cuda_backend.row_loss_grad(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]),
                                   make_loss_params("dft"))
