"""The Triton split kernels (vocab-parallel pass 1 and pass 2) compile for a CUDA GPU (sm_90, sm_80) on a
machine without one, as tests/backends/test_triton_codegen.py checks for the fused kernel: the interpreter accepts
code the compiler rejects.  Through their launchers (``partial_row_stats``, ``row_grad``) on one rank's
slice of the Llama-3 head (tensor parallel 8), specialised as Triton's launcher does (tests/codegen.py):
every flag on and every flag off, in each logits dtype, the row is read (and pass 2 written) with 16-byte
vector accesses and nothing is spilled.  Codegen only; nothing runs."""

import pytest

from codegen import CAPABILITIES, run_script

triton = pytest.importorskip("triton")

SCRIPT = r"""
import sys
import torch
from codegen import compile_launch, emit, recording
from dft_kernels.backends import triton_parallel as tp
from dft_kernels.backends.split import RowGradCoefficients
from dft_kernels.options import make_loss_params

n, v_local = 16, 128256 // 8
with recording(tp, "_partial_row_stats_kernel", "_row_grad_kernel") as launches:
    for on in (True, False):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            opts = dict(softcap=30.0, label_smoothing=0.1, with_stats=True) if on else {}
            params = make_loss_params("entropy" if on else "dft", **opts)
            logits, target = torch.randn(n, v_local).to(dtype), torch.randint(0, 8 * v_local, (n,))
            tp.partial_row_stats(logits, target, 3 * v_local, params)
            k = lambda: torch.rand(n)  # noqa: E731
            tp.row_grad(logits, target, 3 * v_local, params,
                        RowGradCoefficients(k(), k(), k(), k() if on else None, k(), k()))
cap = int(sys.argv[1])  # the GPU target (tests/codegen.py runs this once per capability)
out = {}
for i, launch in enumerate(launches):
    case = f"sm{cap}-{i}-{launch.name}-{launch.args[0].dtype}-{'on' if launch.kwargs['HAS_SOFTCAP'] else 'off'}"
    r = out[case] = compile_launch(launch, cap)
    r.update(grad=launch.name == "_row_grad_kernel", block=launch.kwargs["BLOCK"])
    print(case, r, file=sys.stderr, flush=True)
emit(out)
"""


def test_split_kernels_compile_for_sm90_and_sm80_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia.compiler")
    result = run_script(SCRIPT)
    assert len(result) == len(CAPABILITIES) * 2 * 2 * 3
    for case, r in result.items():
        assert r["block"] == (4096 if case.endswith("-on") else 8192) and "logits_ptr" in r["divisible"], (case, r)
        assert r["spill_bytes"] == 0 and r["sass_local"] == 0 and r["local"] == 0, (case, r)
        assert r["v4_loads"] > 0 and (r["v4_stores"] > 0) == r["grad"], (case, r)
