"""The log-prob row kernels' code for sm_90 and sm_80, as a real launch gets it, on a machine without a
GPU (tests/codegen.py: the real launchers ``row_logprobs`` / ``row_logprobs_grad`` with the kernel
launch recorded, each launch specialised as Triton's JIT launcher does, compiled, and measured from
Triton's own ptxas log and the cubin's SASS).

The interpreter of the CPU suite accepts code the compiler rejects; here every launch the chunk loop
makes at the Llama-3 head compiles, reads the logits with 16-byte vector loads (and the gradient
kernel writes with vector stores), and spills nothing: no spill bytes, no stack, no local memory.
"""

import pytest

from codegen import CAPABILITIES, run_script

triton = pytest.importorskip("triton")

SCRIPT = r"""
import sys
import torch
from codegen import compile_launch, emit, recording
from dft_kernels.backends import triton as tb
from dft_kernels.options import LogprobParams


def launch_of(name, vocab, dtype, rows=16, grad_dtype=None, per_row_temp=False, both_grads=True, **params):
    with recording(tb, name) as launches:
        p = LogprobParams(**params)
        logits = torch.randn(rows, vocab).to(dtype)
        target = torch.randint(0, vocab, (rows,))
        temp = torch.rand(rows) + 0.5 if per_row_temp else None
        if name == "_row_logprobs_kernel":
            tb.row_logprobs(logits, target, p, temp)
        else:
            grad = None if grad_dtype is None else torch.empty(rows, vocab, dtype=grad_dtype)
            stats = torch.randn(rows, 3)
            tb.row_logprobs_grad(logits, target, p, stats, torch.randn(rows), torch.randn(rows) if both_grads else None,
                                 temp, grad)
    (launch,) = launches
    return launch


F, G = "_row_logprobs_kernel", "_row_logprobs_grad_kernel"
cases = {
    "fwd-fp32": (F, dict(vocab=128256, dtype=torch.float32)),
    "fwd-bf16-all": (F, dict(vocab=128256, dtype=torch.bfloat16, with_entropy=True, with_stats=True, softcap=30.0,
                             per_row_temp=True)),
    "fwd-fp32-entropy-temperature": (F, dict(vocab=128256, dtype=torch.float32, with_entropy=True, temperature=0.7)),
    "fwd-fp16-V4096-stats": (F, dict(vocab=4096, dtype=torch.float16, with_stats=True)),
    "grad-fp32-into-bf16": (G, dict(vocab=128256, dtype=torch.float32, grad_dtype=torch.bfloat16, with_entropy=True)),
    "grad-fp32-into-bf16-all": (G, dict(vocab=128256, dtype=torch.float32, grad_dtype=torch.bfloat16, softcap=30.0,
                                        per_row_temp=True, with_entropy=True)),
    "grad-fp32-inplace-logp-only": (G, dict(vocab=128256, dtype=torch.float32, both_grads=False)),
    "grad-bf16-inplace-V1024": (G, dict(vocab=1024, dtype=torch.bfloat16, with_entropy=True, temperature=1.3)),
}
cap = int(sys.argv[1])  # the GPU target (tests/codegen.py runs this once per capability)
results = {}
for case, (name, kw) in cases.items():
    launch = launch_of(name, **kw)
    r = results[f"sm{cap}-{case}"] = compile_launch(launch, cap)
    r["block"] = launch.kwargs["BLOCK"]
    print(case, r, file=sys.stderr, flush=True)
emit(results)
"""


@pytest.fixture(scope="module")
def codegen():
    pytest.importorskip("triton.backends.nvidia.compiler")
    return run_script(SCRIPT)


def test_every_launch_compiles_with_vector_accesses_and_no_spills(codegen):
    assert len(codegen) == 8 * len(CAPABILITIES)
    # block_config: 16 warps from 4096 columns; the softcap's launches take 4096-column blocks
    assert {(r["block"], r["warps"]) for r in codegen.values()} == {(8192, 16), (4096, 16), (1024, 4)}
    for case, r in codegen.items():
        assert r["v4_loads"] > 0, f"{case}: no ld.global.v4 ({r})"
        assert (r["v4_stores"] > 0) == ("-grad-" in case), f"{case}: vector stores ({r})"
        assert r["sass_loops"] >= 1, f"{case}: loops not found ({r})"
        assert r["spill_bytes"] == 0 and r["stack"] == 0, f"{case}: spills ({r})"
        assert r["sass_local"] == 0 and r["local"] == 0, f"{case}: local memory ({r})"
