"""The test environment itself: what the rest of the suite silently relies on."""

import pytest
import torch
from conftest import triton_interpreter_error

tb = pytest.importorskip("dft_kernels.backends.triton")


@pytest.mark.skipif(not tb.is_available(torch.device("cpu"))[0],
                    reason="Triton's interpreter is off (GPU box, or DFT_KERNELS_NO_INTERPRET=1)")
def test_triton_interpreter_runs_the_kernel():
    """With the interpreter on, the triton-on-CPU tests skip if it cannot run the kernel (e.g.
    triton 3.6 with numpy >= 2.4); this test is the one that fails, with the reason."""
    error = triton_interpreter_error()
    assert not error, error
