import functools
import hashlib
import os
import random
import sys

import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which
# must be switched on before triton is first imported (it is read when kernels are defined).
# DFT_KERNELS_NO_INTERPRET=1 leaves it off, to run the suite as on a GPU box (where the
# interpreter is off): the triton-on-CPU tests then skip, and nothing else may fail.
NO_INTERPRET_ENV = "DFT_KERNELS_NO_INTERPRET"
if not torch.cuda.is_available() and os.environ.get(NO_INTERPRET_ENV, "") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def round_bfloat16_to_nearest_even() -> bool:
    """Make Triton's interpreter round float32 -> bfloat16 casts to nearest even, as the GPU does.

    Triton's semantics (and every GPU's cvt.rn.bf16.f32) round a float32 -> bfloat16 downcast to
    nearest even; Triton 3.9's interpreter truncates the low 16 bits instead (cast_impl passes no
    rounding mode), so a bfloat16 gradient the triton backend writes on CPU was up to a whole ulp
    off, twice the GPU's error (found by tests/test_fuzz.py: a bf16 logits gradient 7.6e-3 off,
    3x eager being 2.4e-3).  Its RTNE branch is wrong too (ties away, no carry into the exponent),
    so this replaces both for float32 -> bfloat16 only.  Returns whether the patch is in place."""
    try:
        import numpy as np
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter
    except ImportError:
        return False
    convert = getattr(interpreter, "_convert_float", None)
    if convert is None:
        return False
    if getattr(convert, "_dft_kernels_rtne", False):
        return True

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode in (None, ir.ROUNDING_MODE.RTNE):
            bits = np.ascontiguousarray(input, dtype=np.float32).view(np.uint32)
            # + 0x7FFF + the kept part's last bit, then drop 16 bits: ties to even; a carry moves the
            # exponent up (to inf past bfloat16's max); NaN stays a (quiet) NaN
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            nan = ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16)
            return np.where(np.isnan(input), nan, rounded).reshape(np.shape(input))
        return convert(input, input_dtype, output_dtype, rounding_mode)

    _convert_float._dft_kernels_rtne = True
    interpreter._convert_float = _convert_float
    return True


if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
    round_bfloat16_to_nearest_even()

sys.path.insert(0, os.path.dirname(__file__))
# tests/test_masked_vocab.py reuses the csrc emulation of tests/backends/test_csrc_emulation.py, also when
# it runs alone (pytest puts a test file's folder on sys.path only once it collects a file there)
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "backends"))

# Hypothesis (tests/test_fuzz.py, tests/test_property.py): "ci", the default (`make test`), is
# derandomized: the examples are a function of the test's source, the same on every run, so the
# gate is deterministic.  "hunt" draws fresh examples (`make fuzz`: --hypothesis-profile=hunt,
# with --hypothesis-seed=N to replay a hunt).  No example database in either: a failure is
# reproduced from its printed example, kept as an explicit @example (docs/design.md, Tests).
try:
    from hypothesis import settings as hypothesis_settings
except ImportError:  # the tests that use it skip
    pass
else:
    hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
    hypothesis_settings.register_profile("hunt", derandomize=False, database=None, deadline=None, print_blob=True)
    hypothesis_settings.load_profile("ci")  # --hypothesis-profile, read after this file, overrides it

# Backends whose row kernel runs on CPU tensors in the normal suite.
CPU_BACKENDS = ["torch", "triton"]
# The `backend` fixture's cuda parametrisation (gpu-marked: CUDA tensors, helpers.device_of) runs in
# these modules, written device-agnostic; elsewhere it is deselected.  The cuda-only checks (the row
# contract, the op's own input checks, the fallback to cuda) are in tests/backends/test_cuda_backend.py.
CUDA_BACKEND_MODULES = ("test_correctness.py",)


# Backends that run the reduced grid below on CPU (Triton's interpreter is ~10x slower
# than the torch backend).  DFT_KERNELS_FULL_GRID=1 runs the full grid for them too.
REDUCED_GRID_BACKENDS = ("triton",)
FULL_GRID_ENV = "DFT_KERNELS_FULL_GRID"


def _index(values, value):
    return next(i for i, v in enumerate(values) if v == value)


def in_reduced_grid(item) -> bool:
    """Whether a test stays in the reduced grid: every objective with every reduction, option
    and dtype still runs once; only the reduction (or bias) rotates instead of being crossed."""
    from helpers import OBJECTIVES

    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") not in REDUCED_GRID_BACKENDS:
        return True
    name = getattr(item, "originalname", item.name)
    if name == "test_objective_reduction_fp32":
        i = _index(OBJECTIVES, params["objective"]) + _index(item.module.REDUCTIONS, params["reduction"])
        return params["bias"] == (i % 2 == 0)
    if name == "test_options_fp32":
        obj, option = params["objective"], params["option"]
        # the reductions this (objective, option) pair can run with (the rest are error cases)
        allowed = ["mean"] if option.startswith("num_items") else ["mean", "none"]
        i = _index(OBJECTIVES, obj) + _index(list(item.module.OPTIONS), option)
        return params["reduction"] == allowed[i % len(allowed)]
    if name == "test_low_precision":
        i = _index(OBJECTIVES, params["objective"]) + (params["dtype"] == torch.float16)
        return params["reduction"] == item.module.REDUCTIONS[i % len(item.module.REDUCTIONS)]
    return True


def triton_interpreter_error() -> str:
    """"" when Triton's interpreter runs the row kernel here; else the error.  Triton <= 3.6's
    interpreter fails with numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python
    scalars"); CI runs triton 3.9 with numpy 2.4."""
    import numpy
    import triton

    import dft_kernels as dk

    try:
        loss = dk.cross_entropy(torch.randn(2, 8), torch.tensor([1, 3]), objective="ce", backend="triton")
    except Exception as exc:  # the interpreter's own failure, whatever its type
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: "
                f"{type(exc).__name__}: {str(exc)[:200]} (triton <= 3.6 needs numpy < 2.4)")
    return "" if bool(torch.isfinite(loss)) else "Triton's interpreter gives a non-finite loss on a trivial row"


@functools.lru_cache(maxsize=None)
def triton_cpu_unavailable_reason() -> str:
    """Why the triton backend cannot run on CPU tensors here ("" when it can: interpreter on and working)."""
    try:
        from dft_kernels.backends import triton as triton_backend
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    ok, reason = triton_backend.is_available(torch.device("cpu"))
    if not ok:
        return reason
    # tests/test_environment.py fails with this error, once; the triton-on-CPU tests skip
    return triton_interpreter_error()


def _cuda_param_elsewhere(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "cuda" and os.path.basename(str(item.fspath)) not in CUDA_BACKEND_MODULES


def pytest_collection_modifyitems(config, items):
    elsewhere = [item for item in items if _cuda_param_elsewhere(item)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if not _cuda_param_elsewhere(item)]
    if os.environ.get(FULL_GRID_ENV, "") in ("", "0"):
        kept = [item for item in items if in_reduced_grid(item)]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if not in_reduced_grid(item)])
            items[:] = kept
    # CPU parametrisations of the triton backend (the `backend` fixture, parametrize("backend"))
    # run under the interpreter only: skip them, with the reason, where it is off (GPU boxes)
    reason = triton_cpu_unavailable_reason()
    if reason:
        skip_triton = pytest.mark.skip(reason=f"triton backend on CPU tensors: {reason}")
        for item in items:
            if getattr(getattr(item, "callspec", None), "params", {}).get("backend") == "triton":
                item.add_marker(skip_triton)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[*CPU_BACKENDS, pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "cuda":  # on a GPU machine: the extension may be missing (the reason is its error)
        from dft_kernels.backends import cuda as cuda_backend

        ok, reason = cuda_backend.is_available(torch.device("cuda", 0))
        if not ok:
            pytest.skip(f"cuda backend unavailable on this GPU machine: {reason}")
    return request.param


@pytest.fixture
def cuda_gemm_policy(monkeypatch):
    """Run the CUDA branch of the GEMM policy (16-bit operands, float32 products) on CPU."""
    from dft_kernels import options
    from helpers import cublas_mm_out_dtype

    monkeypatch.setitem(options.MM_OUT_DTYPE, "cpu", cublas_mm_out_dtype)


# ---- one documented seed per test (docs/design.md, Tests)
#
# Each test's random inputs come from one seed, derived from a base seed and the test's id
# (its path under tests/ and its name with parameters): the same on every run, machine and
# Python version (SHA-256, not Python's salted hash()).  The base is 0; `--seed N` or
# DFT_KERNELS_TEST_SEED=N picks another, `--seed random` a fresh one per session (a hunt).
# A failing test's report carries a "random seed" section with the seed and the command
# that reproduces it.
SEED_ENV = "DFT_KERNELS_TEST_SEED"
DEFAULT_BASE_SEED = 0
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    parser.addoption("--seed", default=None, metavar="N",
                     help=f"base seed of every test's random inputs: an integer, or 'random' for a fresh one "
                          f"(default: ${SEED_ENV}, else {DEFAULT_BASE_SEED})")


def base_seed(config) -> int:
    """The session's base seed, chosen once: --seed, else $DFT_KERNELS_TEST_SEED, else 0."""
    if not hasattr(config, "_dft_base_seed"):
        value = config.getoption("--seed") or os.environ.get(SEED_ENV, "") or str(DEFAULT_BASE_SEED)
        config._dft_base_seed = (int.from_bytes(os.urandom(4), "little") if value == "random"
                                 else int(value))
    return config._dft_base_seed


def seed_key(item) -> str:
    """The test's id independent of where pytest runs from: tests/-relative path and name[params]."""
    path = os.path.relpath(str(item.path), TESTS_DIR).replace(os.sep, "/")
    return path + "::" + item.nodeid.split("::", 1)[1] if "::" in item.nodeid else path


def derive_seed(base: int, key: str) -> int:
    """A test's seed: the first 4 bytes of SHA-256("base:key"), little-endian (0 <= seed < 2**32)."""
    return int.from_bytes(hashlib.sha256(f"{base}:{key}".encode()).digest()[:4], "little")


def pytest_report_header(config):
    return (f"dft_kernels test seeds: base {base_seed(config)} (--seed N or {SEED_ENV}=N; "
            f"each test's seed = sha256('base:test id'))")


@pytest.fixture(autouse=True)
def _seed(request):
    """Seeds torch's and Python's global generators with the test's own seed (see above)."""
    seed = derive_seed(base_seed(request.config), seed_key(request.node))
    request.node._dft_seed = seed
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "_dft_seed", None)
    if report.failed and seed is not None:
        base = base_seed(item.config)
        report.sections.append(("random seed", (
            f"seed {seed} = sha256('{base}:{seed_key(item)}')[:4]; reproduce with: "
            f"pytest '{item.nodeid}' --seed {base}")))


# ---- trainer tests (test_train_loop.py, test_train_faults.py)

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small demo data set (train + held-out JSONL files)."""
    from dft_kernels.train.demo_data import write_demo_data

    return write_demo_data(str(tmp_path_factory.mktemp("data")), n_train=48, n_heldout=6, train_terms=(2, 3))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with one thread too: same summation order
    yield
    torch.set_num_threads(n)
