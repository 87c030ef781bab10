import functools
import os
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

sys.path.insert(0, os.path.dirname(__file__))

# Backends whose row kernel runs on CPU tensors in the normal suite.
CPU_BACKENDS = ["torch", "triton"]


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


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def cuda_gemm_policy(monkeypatch):
    """Run the CUDA branch of the GEMM policy (16-bit operands, float32 products) on CPU."""
    from dft_kernels import options
    from helpers import cublas_mm_out_dtype

    monkeypatch.setitem(options.MM_OUT_DTYPE, "cpu", cublas_mm_out_dtype)


@pytest.fixture(autouse=True)
def _seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")  # shown by pytest on failure, to reproduce
    torch.manual_seed(seed)
    yield


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
