"""The Triton kernel's sm_90 and sm_80 code, as a real launch gets it, on a machine without a GPU.

The CPU suite runs the kernel under Triton's interpreter, which accepts code that the
compiler rejects and says nothing about the machine code.  Here a subprocess without
TRITON_INTERPRET calls the real launcher (``row_loss_grad``, ``row_loss_grad_factored``) on
CPU tensors of real head shapes with the kernel launch intercepted and compiles each launch as
Triton's JIT launcher specialises it, for sm_90 and for sm_80 (tests/codegen.py, shared with
the fused head's and the split kernels' checks).  Nothing runs on a GPU.

Asserted for the default launch configurations (each block/warps tier of ``block_config``,
every objective, with and without options and stats, the factored launches), on each target:
the logits row is read and the gradient written with 16-byte vector accesses
(``ld.global.v4`` / ``st.global.v4``), nothing is spilled (Triton's own ptxas run reports no
spill, the cubin's SASS has no local-memory access, the PTX no ``.local``), and the loops are
found in the SASS (so that "no access inside a loop" means something).  A control compiles one
launch without the divisibility attributes (what this test used to do): no vector loads, so
the assertion can tell the two apart.
"""

import pytest

from codegen import CAPABILITIES, run_script

triton = pytest.importorskip("triton")

SCRIPT = r"""
import sys
import torch
import triton
from codegen import compile_launch, emit, recording

from dft_kernels.backends import triton as tb
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.options import make_loss_params


def launch_of(vocab, dtype, objective, with_grad=True, with_stats=False, options=None, weights=False,
              per_row_scale=False, rows=16, factored=False, grad_dtype=None):
    # what row_loss_grad launches for [rows, vocab] logits (fresh, 16-byte aligned like CUDA's allocator)
    params = make_loss_params(objective, with_stats=with_stats, **(options or {}))
    logits = torch.randn(rows, vocab).to(dtype)
    target = torch.randint(0, vocab, (rows,))
    tw = torch.rand(rows) if weights else None
    scale = (torch.rand(rows) if per_row_scale else torch.tensor(1.0)) if with_grad else None
    with recording(tb, "_row_loss_grad_kernel") as launches:
        if factored:  # the chunk loop's one-read launch: into a grad_dtype buffer, or in place
            grad = None if grad_dtype is None else torch.empty(rows, vocab, dtype=grad_dtype)
            tb.row_loss_grad_factored(logits, target, params, tw, scale, grad, torch.empty(rows))
        else:
            tb.row_loss_grad(logits, target, params, tw, scale)
    launch, = launches
    return launch


names = list(OBJECTIVES)
dtypes = (torch.float32, torch.bfloat16, torch.float16)
cases = []
# the Llama-3 head (BLOCK 8192, 16 warps; 4096 with a softcap, smoothing or z-loss): every objective
# as the default call makes it ...
for name in names:
    cases.append((f"V128256-fp32-{name}", dict(vocab=128256, dtype=torch.float32, objective=name)))
# ... and with stats, every option it accepts, token weights and a per-row scale, in each dtype
for i, name in enumerate(names):
    opts = dict(softcap=30.0)
    if OBJECTIVES[name].is_weighted_nll:
        opts.update(label_smoothing=0.1, z_loss=1e-4)
    dtype = dtypes[i % 3]
    cases.append((f"V128256-{str(dtype)[6:]}-{name}-all", dict(vocab=128256, dtype=dtype, objective=name,
                  with_stats=True, options=opts, weights=True, per_row_scale=True)))
# ... and every option but the softcap (still 4096 columns: smoothing and z-loss)
for name, dtype in (("ce", torch.float32), ("entropy", torch.bfloat16)):
    cases.append((f"V128256-{str(dtype)[6:]}-{name}-nocap-all", dict(
        vocab=128256, dtype=dtype, objective=name, with_stats=True, options=dict(label_smoothing=0.1, z_loss=1e-4),
        weights=True, per_row_scale=True)))
for name, dtype in (("dft", torch.bfloat16), ("entropy", torch.float32)):  # return_stats=True
    cases.append((f"V128256-{str(dtype)[6:]}-{name}-stats", dict(vocab=128256, dtype=dtype, objective=name,
                  with_stats=True)))
# the factored (one-read) launches the chunk loop makes: float32 logits into a bfloat16 gradient
# (the default mode), bfloat16 logits in place (the fast mode); every objective, then with the
# options it factors (softcap), stats, token weights and a per-row scale
for i, name in enumerate(names):
    fast = i % 2 == 1
    cases.append((f"V128256-{'bf16-inplace' if fast else 'fp32'}-{name}-factored",
                  dict(vocab=128256, dtype=torch.bfloat16 if fast else torch.float32, objective=name, factored=True,
                       grad_dtype=None if fast else torch.bfloat16)))
for name, dtype in (("dft", torch.bfloat16), ("entropy", torch.float32), ("focal", torch.float32)):
    cases.append((f"V128256-{str(dtype)[6:]}-{name}-factored-all", dict(
        vocab=128256, dtype=dtype, objective=name, factored=True, with_stats=True, options=dict(softcap=30.0),
        weights=True, per_row_scale=True, grad_dtype=torch.bfloat16)))
# the same without the softcap: the heaviest launches of the 8192 tier
for name, dtype in (("dft", torch.bfloat16), ("entropy", torch.float32)):
    cases.append((f"V128256-{str(dtype)[6:]}-{name}-factored-nocap-all", dict(
        vocab=128256, dtype=dtype, objective=name, factored=True, with_stats=True, weights=True, per_row_scale=True,
        grad_dtype=torch.bfloat16)))
cases.append(("V128256-bf16-dft-forward", dict(vocab=128256, dtype=torch.bfloat16, objective="dft", with_grad=False)))
# the smaller block tiers (2048 / 8 warps, 1024 / 4 warps)
for vocab in (2048, 1024):
    for name, dtype in (("dft", torch.bfloat16), ("entropy", torch.float32)):
        cases.append((f"V{vocab}-{str(dtype)[6:]}-{name}", dict(vocab=vocab, dtype=dtype, objective=name,
                      with_stats=True)))

cap = int(sys.argv[1])  # the GPU target (tests/codegen.py runs this once per capability)
results = {}
for case, kw in cases:
    launch = launch_of(**kw)
    r = results[f"sm{cap}-{case}"] = compile_launch(launch, cap)
    r.update(with_grad=kw.get("with_grad", True), block=launch.kwargs["BLOCK"])
    print(f"sm{cap}-{case}", r, file=sys.stderr, flush=True)
r = results[f"sm{cap}-control-unspecialised"] = compile_launch(launch_of(128256, torch.float32, "dft"), cap,
                                                               specialise=False)
r.update(with_grad=True, block=8192, control=True)
print("triton", triton.__version__, file=sys.stderr)
emit(results)
"""


@pytest.fixture(scope="module")
def codegen():
    pytest.importorskip("triton.backends.nvidia.compiler")
    return run_script(SCRIPT)


def launches(codegen):
    return {case: r for case, r in codegen.items() if not r.get("control")}


def test_every_default_launch_compiles_for_sm90_and_sm80(codegen):
    from dft_kernels.objectives import OBJECTIVES

    assert len(launches(codegen)) == len(CAPABILITIES) * (3 * len(OBJECTIVES) + 2 + 2 + 3 + 2 + 1 + 4)
    assert {r["capability"] for r in codegen.values()} == set(CAPABILITIES)
    assert {(r["block"], r["warps"]) for r in codegen.values()} == {(8192, 16), (4096, 16), (2048, 8), (1024, 4)}


def test_launches_carry_the_divisibility_specialisation(codegen):
    for case, r in codegen.items():
        assert ("logits_ptr" in r["divisible"]) == (not r.get("control")), case


def test_logits_are_read_and_written_with_vector_accesses(codegen):
    for case, r in launches(codegen).items():
        assert r["v4_loads"] > 0, f"{case}: no ld.global.v4 ({r})"
        if r["with_grad"]:
            assert r["v4_stores"] > 0, f"{case}: no st.global.v4 ({r})"
        else:
            assert r["v4_stores"] == 0, f"{case}: forward-only launch stores into the logits ({r})"


def test_no_spills(codegen):
    """Every launch, every option, each target: no spill (ptxas, as Triton runs it for the cubin)
    and no local-memory access (the cubin's SASS, the PTX).  Not the control: without the
    divisibility attributes every entry has its own scalar address, and 64 registers a thread
    (``MAX_REGISTERS``) do not hold them (no launch compiles that code)."""
    for case, r in launches(codegen).items():
        assert r["sass_loops"] >= (2 if r["with_grad"] else 1), f"{case}: loops not found in the SASS ({r})"
        assert r["sass_local_in_loops"] == 0 and r["local"] == 0, f"{case}: spills in a loop ({r})"
        assert r["spill_bytes"] == 0 and r["stack"] == 0 and r["sass_local"] == 0, f"{case}: spills ({r})"


def test_control_without_specialisation_has_scalar_loads(codegen):
    """What compiling without the launcher's attributes gives: the assertions above can fail."""
    controls = [r for r in codegen.values() if r.get("control")]
    assert len(controls) == len(CAPABILITIES) and all(r["v4_loads"] == 0 for r in controls)
