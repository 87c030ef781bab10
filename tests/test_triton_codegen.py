"""The Triton kernel compiles for a CUDA GPU (sm_90) on a machine without one.

The CPU suite runs the kernel under Triton's interpreter, which accepts code that the
compiler rejects (e.g. non-constexpr globals, shape errors in unused branches).  This
compiles the real kernel to a cubin with Triton's bundled ptxas in a subprocess without
TRITON_INTERPRET: nothing runs, only codegen is checked.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dft_kernels.backends import triton as tb
from dft_kernels.objectives import OBJECTIVES

kernel = tb._row_loss_grad_kernel
names = kernel.arg_names
FLAGS = ("HAS_SOFTCAP", "HAS_SMOOTHING", "HAS_ZLOSS", "HAS_WEIGHTS", "HAS_GRAD", "SCALE_PER_ROW",
         "NEEDS_ENTROPY", "WITH_STATS")
ptrs = {"target_ptr": "*i64", "weights_ptr": "*fp32", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
        "nll_ptr": "*fp32", "prob_ptr": "*fp32", "entropy_ptr": "*fp32", "correct_ptr": "*fp32"}
ints = {"stride_row": "i64", "n_rows": "i32", "V": "i32", "ignore_index": "i32"}
for i, cls in enumerate(OBJECTIVES.values()):
    dtype = ("bf16", "fp16", "fp32")[i % 3]
    all_on = i % 2 == 0
    flags = {f: all_on for f in FLAGS}
    flags.update(NEEDS_ENTROPY=cls.needs_entropy, HAS_SMOOTHING=all_on and cls.is_weighted_nll,
                 HAS_ZLOSS=all_on and cls.is_weighted_nll, HAS_GRAD=True, SCALE_PER_ROW=not all_on)
    rows, block, warps = 1, tb.MAX_BLOCK, 16
    consts = dict(flags, OBJECTIVE=cls.kernel_id, ROWS=rows, BLOCK=block)
    sig = {n: ("*" + dtype if n == "logits_ptr" else ptrs.get(n) or ints.get(n)
               or ("constexpr" if n in consts else "fp32")) for n in names}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], cls.name
    print("compiled", cls.name, dtype)
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    from triton.backends.nvidia import compiler as nv  # noqa: F401  (skips below if absent)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 7
