"""The two-head row kernels' code (the anchor's and distillation's, end of dft_kernels/backends/triton.py)
for sm_90 and sm_80, as a real launch gets it, on a machine without a GPU (tests/codegen.py: the real
launchers ``row_anchor_loss_grad`` / ``row_distill_loss_grad`` with the kernel launches recorded, each
specialised as Triton's JIT launcher does, compiled, and measured from Triton's ptxas log and the SASS).

The interpreter of the CPU suite accepts code the compiler rejects; here each launch the chunk loop makes
at the Llama-3 head compiles, reads both heads' rows with 16-byte vector loads (the gradient kernel
writes with vector stores), and spills nothing.
"""

import pytest

from codegen import CAPABILITIES, run_script

triton = pytest.importorskip("triton")

SCRIPT = r"""
import sys
import torch
from codegen import compile_launch, emit, recording
from dft_kernels.backends import triton as tb
from dft_kernels.options import DistillParams, make_loss_params

KERNELS = ("_pair_stats_kernel", "_pair_grad_kernel", "_row_loss_grad_kernel")


def launches_of(kind, vocab, dtype, rows=16, grad_dtype=None, softcap=None, kl="forward", beta=0.5):
    logits = torch.randn(rows, vocab).to(dtype)
    ref = torch.randn(rows, vocab).to(dtype)
    target = torch.randint(0, vocab, (rows,))
    grad = None if grad_dtype is None else torch.empty(rows, vocab, dtype=grad_dtype)
    with recording(tb, *KERNELS) as launches:
        if kind == "anchor":
            params = make_loss_params("dft", softcap=softcap)
            params = type(params)(**{**params.__dict__, "kl_coef": 0.1, "kl": kl})
            tb.row_anchor_loss_grad(logits, ref, target, params, None, torch.tensor(1.0), grad)
        else:
            tb.row_distill_loss_grad(logits, ref, target, DistillParams(beta=beta, temperature=2.0), None,
                                     torch.tensor(1.0), grad)
    return {launch.name: launch for launch in launches if launch.name != "_row_loss_grad_kernel"}


cases = {
    "anchor-fp32-into-bf16-forward": dict(kind="anchor", vocab=128256, dtype=torch.float32,
                                          grad_dtype=torch.bfloat16),
    "anchor-fp32-inplace-reverse-softcap": dict(kind="anchor", vocab=128256, dtype=torch.float32, kl="reverse",
                                                softcap=30.0),
    "anchor-bf16-inplace-V1024": dict(kind="anchor", vocab=1024, dtype=torch.bfloat16),
    "distill-fp32-into-bf16-jsd": dict(kind="distill", vocab=128256, dtype=torch.float32, grad_dtype=torch.bfloat16),
    "distill-fp32-into-bf16-kl": dict(kind="distill", vocab=128256, dtype=torch.float32, grad_dtype=torch.bfloat16,
                                      beta=0.0),
    "distill-fp16-into-fp32-reverse": dict(kind="distill", vocab=128256, dtype=torch.float16,
                                           grad_dtype=torch.float32, beta=1.0),
}
cap = int(sys.argv[1])
results = {}
for case, kw in cases.items():
    for name, launch in launches_of(**kw).items():
        r = results[f"sm{cap}-{case}-{name}"] = compile_launch(launch, cap)
        r["block"] = launch.kwargs["BLOCK"]
        print(case, name, r, file=sys.stderr, flush=True)
emit(results)
"""


@pytest.fixture(scope="module")
def codegen():
    pytest.importorskip("triton.backends.nvidia.compiler")
    return run_script(SCRIPT)


def test_every_launch_compiles_with_vector_accesses_and_no_spills(codegen):
    assert len(codegen) == 6 * 2 * len(CAPABILITIES)  # a statistics and a gradient launch per case
    for case, r in codegen.items():
        assert r["v4_loads"] > 0, f"{case}: no ld.global.v4 ({r})"
        assert (r["v4_stores"] > 0) == case.endswith("_pair_grad_kernel"), f"{case}: vector stores ({r})"
        assert r["sass_loops"] >= 1, f"{case}: loops not found ({r})"
        assert r["spill_bytes"] == 0 and r["stack"] == 0, f"{case}: spills ({r})"
        assert r["sass_local"] == 0 and r["local"] == 0, f"{case}: local memory ({r})"
    # two rows' 4096-column blocks at 16 warps (2048 with a softcap), 1024 columns at 4 warps
    assert {(r["block"], r["warps"]) for r in codegen.values()} == {(4096, 16), (2048, 16), (1024, 4)}
