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


@pytest.mark.skipif(not tb.is_available(torch.device("cpu"))[0],
                    reason="Triton's interpreter is off (GPU box, or DFT_KERNELS_NO_INTERPRET=1)")
def test_triton_interpreter_rounds_bfloat16_to_nearest_even():
    """conftest.round_bfloat16_to_nearest_even: a kernel's float32 -> bfloat16 casts on CPU round as
    on a GPU (and as torch does), ties to even and carries included; Triton 3.9's interpreter
    alone truncates them."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(src, dst, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n).to(tl.bfloat16), mask=i < n)

    one = 1.0 + 2.0 ** -7  # the bfloat16 after 1
    x = torch.tensor([1.0 + 2.0 ** -8, one + 2.0 ** -8, 1.0 + 2.0 ** -8 + 2.0 ** -20, -1.019993543624878,
                      2.0 - 2.0 ** -9, 3.3895e38, 1e-40, -7e-45, 0.0, -0.0, float("inf"), float("nan"), 5.0],
                      dtype=torch.float32)
    x = torch.cat([x, torch.randn(200, generator=torch.Generator().manual_seed(0))])
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    cast[(1,)](x, out, x.numel(), BLOCK=256)
    want = x.to(torch.bfloat16)
    same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
    assert same.all(), f"{x[~same].tolist()} -> {out[~same].tolist()}, torch: {want[~same].tolist()}"
