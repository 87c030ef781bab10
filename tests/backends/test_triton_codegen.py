"""The Triton kernel's sm_90 code, as a real launch gets it, on a machine without a GPU.

The CPU suite runs the kernel under Triton's interpreter, which accepts code that the
compiler rejects and says nothing about the machine code.  Here a subprocess without
TRITON_INTERPRET calls the real launcher (``row_loss_grad``) on CPU tensors of real head
shapes with the kernel launch intercepted, specialises each launch exactly as Triton's JIT
launcher does (its own binder and ``_pack_args``: 16-divisibility attributes on aligned
pointers and on integers divisible by 16, ``1`` as a constant), compiles it for sm_90 and
runs Triton's bundled ptxas with ``-v`` on the PTX.  Nothing runs on a GPU.

Asserted for the default launch configurations (each block/warps tier of ``block_config``,
every objective, with and without options and stats): the logits row is read and the
gradient written with 16-byte vector accesses (``ld.global.v4`` / ``st.global.v4``) and
nothing is spilled (ptxas ``-v``; with every option on, at most one spill slot outside the
loops, checked on the SASS from nvdisasm).  A control compiles one launch without the
divisibility attributes (what this test used to do): no vector loads, so the assertion can
tell the two apart.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from dft_kernels.backends import triton as tb
from dft_kernels.objectives import OBJECTIVES
from dft_kernels.options import make_loss_params

kernel = tb._row_loss_grad_kernel
CAPABILITY = 90
target = GPUTarget("cuda", CAPABILITY, 32)
backend = make_backend(target)
binder = create_function_from_signature(kernel.signature, kernel.params, backend)


class Recorder:
    # stands in for the jitted kernel: kernel[grid](*args, **kwargs) records the launch
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def launch_of(vocab, dtype, objective, with_grad=True, with_stats=False, options=None, weights=False,
              per_row_scale=False, rows=16, factored=False, grad_dtype=None):
    # what row_loss_grad launches for [rows, vocab] logits (fresh, 16-byte aligned like CUDA's allocator)
    rec = Recorder()
    tb._row_loss_grad_kernel = rec
    try:
        params = make_loss_params(objective, with_stats=with_stats, **(options or {}))
        logits = torch.randn(rows, vocab).to(dtype)
        target = torch.randint(0, vocab, (rows,))
        tw = torch.rand(rows) if weights else None
        scale = (torch.rand(rows) if per_row_scale else torch.tensor(1.0)) if with_grad else None
        if factored:  # the chunk loop's one-read launch: into a grad_dtype buffer, or in place
            grad = None if grad_dtype is None else torch.empty(rows, vocab, dtype=grad_dtype)
            tb.row_loss_grad_factored(logits, target, params, tw, scale, grad, torch.empty(rows))
        else:
            tb.row_loss_grad(logits, target, params, tw, scale)
    finally:
        tb._row_loss_grad_kernel = kernel
    (args, kwargs), = rec.launches
    return args, kwargs


def local_memory_accesses(cubin):
    # (all, inside a loop) SASS local-memory accesses (STL/LDL: spills); a loop is the address
    # range from a label back to a branch that jumps to it
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    labels, pending, instructions = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            instructions.append((addr, ins.group(2)))
    loops = []
    for addr, text in instructions:
        jump = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if jump and labels.get(jump.group(1), addr + 1) <= addr:
            loops.append((labels[jump.group(1)], addr))
    local = [addr for addr, text in instructions if re.match(r"(@!?U?P\w+\s+)?(STL|LDL)\b", text)]
    return len(local), sum(any(lo <= a <= hi for lo, hi in loops) for a in local), len(loops)


def compile_launch(args, kwargs, specialise=True):
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    if not specialise:
        attrs = {}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        arch = f"sm_{CAPABILITY}a" if CAPABILITY == 90 else f"sm_{CAPABILITY}"
        proc = subprocess.run([get_ptxas(CAPABILITY).path, "-v", f"--gpu-name={arch}", f.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    number = lambda pattern: sum(int(x) for x in re.findall(pattern, log))
    logits_attrs = attrs.get((kernel.arg_names.index("logits_ptr"),), [])
    local, local_in_loops, loops = local_memory_accesses(compiled.asm["cubin"])
    return dict(
        sass_local=local, sass_local_in_loops=local_in_loops, sass_loops=loops,
        logits_divisibility=["tt.divisibility", 16] in logits_attrs,
        v4_loads=ptx.count("ld.global.v4"), v4_stores=ptx.count("st.global.v4"),
        local=ptx.count(".local"), registers=number(r"Used (\d+) registers"),
        spill_bytes=number(r"(\d+) bytes spill (?:stores|loads)"),  # stored + loaded
        stack=number(r"(\d+) bytes stack frame"),
        block=kwargs["BLOCK"], warps=kwargs["num_warps"],
    )


names = list(OBJECTIVES)
dtypes = (torch.float32, torch.bfloat16, torch.float16)
cases = []
# the Llama-3 head (BLOCK 8192, 16 warps): every objective as the default call makes it ...
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
cases.append(("V128256-bf16-dft-forward", dict(vocab=128256, dtype=torch.bfloat16, objective="dft", with_grad=False)))
# the smaller block tiers (4096 / 8 warps, 1024 / 4 warps)
for vocab in (4096, 1024):
    for name, dtype in (("dft", torch.bfloat16), ("entropy", torch.float32)):
        cases.append((f"V{vocab}-{str(dtype)[6:]}-{name}", dict(vocab=vocab, dtype=dtype, objective=name,
                      with_stats=True)))

results = {}
for case, kw in cases:
    results[case] = compile_launch(*launch_of(**kw))
    results[case]["with_grad"] = kw.get("with_grad", True)
    print(case, results[case], file=sys.stderr, flush=True)
results["control-unspecialised"] = compile_launch(*launch_of(128256, torch.float32, "dft"), specialise=False)
results["control-unspecialised"]["with_grad"] = True
print("triton", triton.__version__, file=sys.stderr)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def codegen():
    from triton.backends.nvidia import compiler as nv  # noqa: F401  (skips below if absent)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_default_launch_compiles_for_sm90(codegen):
    from dft_kernels.objectives import OBJECTIVES

    cases = [c for c in codegen if not c.startswith("control")]
    assert len(cases) == 3 * len(OBJECTIVES) + 2 + 3 + 1 + 4
    assert {(r["block"], r["warps"]) for r in codegen.values()} == {(8192, 16), (4096, 8), (1024, 4)}


def test_launches_carry_the_divisibility_specialisation(codegen):
    for case, r in codegen.items():
        assert r["logits_divisibility"] == (not case.startswith("control")), case


def test_logits_are_read_and_written_with_vector_accesses(codegen):
    for case, r in codegen.items():
        if case.startswith("control"):
            continue
        assert r["v4_loads"] > 0, f"{case}: no ld.global.v4 ({r})"
        if r["with_grad"]:
            assert r["v4_stores"] > 0, f"{case}: no st.global.v4 ({r})"
        else:
            assert r["v4_stores"] == 0, f"{case}: forward-only launch stores into the logits ({r})"


def test_no_spills(codegen):
    """Default calls (with or without stats): ptxas reports no spill at all.  With every option
    on, Triton 3.6's ptxas may park one predicate in a 4-byte local slot across pass 1 (seen for
    focal/prob with softcap: stored once and loaded once per row): allowed, but nothing more,
    and never a local-memory access inside a loop.  The factored kernel with the entropy
    objective sits at ptxas's 64-register occupancy step: a standalone ``ptxas -v`` then reports
    a slot or two (24 bytes stored + loaded) while the cubin Triton builds, whose SASS is checked
    here, has no local-memory access at all; up to 32 bytes are allowed for factored launches."""
    for case, r in codegen.items():
        assert r["sass_loops"] >= (2 if r["with_grad"] else 1), f"{case}: loops not found in the SASS ({r})"
        assert r["sass_local_in_loops"] == 0 and r["local"] == 0, f"{case}: spills in a loop ({r})"
        if "factored" in case and "-all" not in case:
            assert r["sass_local"] == 0 and r["spill_bytes"] <= 32, f"{case}: spills ({r})"
        elif "-all" not in case:
            assert r["spill_bytes"] == 0 and r["sass_local"] == 0, f"{case}: spills ({r})"
        else:
            assert r["spill_bytes"] <= 8, f"{case}: spills ({r})"


def test_control_without_specialisation_has_scalar_loads(codegen):
    """What compiling without the launcher's attributes gives: the assertions above can fail."""
    assert codegen["control-unspecialised"]["v4_loads"] == 0
