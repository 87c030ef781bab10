"""Compile the Triton kernels for a CUDA GPU on a machine without one, exactly as a real launch does.

The CPU suite runs the kernels under Triton's interpreter, which accepts code that the compiler
rejects and says nothing about the machine code.  The codegen tests (backends/test_triton_codegen.py,
backends/test_triton_parallel_codegen.py, backends/test_logprobs_codegen.py, backends/test_pair_codegen.py,
experimental/test_fused_head.py) share this harness:

- :func:`run_script` (pytest side) runs a test's script in a subprocess without
  ``TRITON_INTERPRET`` (which conftest.py sets for the interpreter tests), with this directory
  on ``PYTHONPATH``, and returns the JSON it prints last.
- The script calls the real host-side launchers on CPU tensors of real head shapes with the
  kernels replaced by recorders (:func:`recording`), then :func:`compile_launch` specialises
  each recorded launch exactly as Triton's JIT launcher does (its own binder and
  ``_pack_args``: 16-divisibility attributes on aligned pointers and on integers divisible by
  16, ``1`` as a constant), compiles it for a GPU target (sm_90, sm_80) and reports what the
  cubin a launch would load has: registers, spills and stack from Triton's own ``ptxas -v`` run
  (its flags differ between Triton versions, and a standalone ``ptxas -v`` can spill where
  Triton's run does not, or the other way round), local-memory accesses in its SASS (from
  nvdisasm; inside loops or not), and the PTX's 16-byte vector accesses and wgmma instructions.

Nothing runs on a GPU.  Only the standard library at import time: triton is imported by the
script's calls.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# the GPU targets every codegen check compiles for: Hopper (wgmma) and Ampere
CAPABILITIES = (90, 80)


def run_script(script: str, timeout: float = 900) -> dict:
    """Run ``script`` once per GPU target, concurrently (``sys.argv[1]`` is the capability: ``"90"``), with
    this interpreter and the compiler on (no ``TRITON_INTERPRET``), and return the union of the JSON
    objects each run prints last.  Every compile runs ptxas and has Triton print its log
    (``TRITON_ALWAYS_COMPILE``, ``TRITON_DUMP_PTXAS_LOG``: a cached kernel would have none)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, TESTS, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_ALWAYS_COMPILE"] = "1"
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        try:
            for cap in CAPABILITIES:
                path = os.path.join(tmp, str(cap))
                with open(path + ".out", "w") as out, open(path + ".err", "w") as err:
                    procs[cap] = subprocess.Popen([sys.executable, "-c", script, str(cap)], env=env, stdout=out,
                                                  stderr=err)
            for proc in procs.values():
                proc.wait(timeout=timeout)
        finally:
            for proc in procs.values():
                proc.kill()
        results = {}
        for cap, proc in procs.items():
            read = lambda name: open(os.path.join(tmp, f"{cap}.{name}")).read()  # noqa: E731
            assert proc.returncode == 0, f"sm_{cap}: " + read("err")[-6000:]
            results.update(json.loads(read("out").strip().splitlines()[-1]))
    return results


Launch = collections.namedtuple("Launch", "name kernel args kwargs")


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, self.kernel, args, kwargs))


@contextlib.contextmanager
def recording(module, *names):
    """Replace the kernels ``module.<name>`` by recorders; yields the list of launches made meanwhile
    (``Launch(name, kernel, args, kwargs)``, ``kernel`` the real one)."""
    real = {name: getattr(module, name) for name in names}
    launches = []
    for name, kernel in real.items():
        setattr(module, name, _Recorder(name, kernel, launches))
    try:
        yield launches
    finally:
        for name, kernel in real.items():
            setattr(module, name, kernel)


def local_memory_accesses(cubin: bytes, nvdisasm: str) -> tuple[int, int, int]:
    """``(all, inside a loop, loops)``: the SASS local-memory accesses (STL/LDL: spills) of ``cubin``;
    a loop is the address range from a label back to a branch that jumps to it."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
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


def compile_launch(launch: Launch, capability: int = 90, specialise: bool = True) -> dict:
    """Compile a recorded launch for ``sm_<capability>`` as Triton's launcher would (``specialise``
    False: without the divisibility attributes, a control) and measure its code (module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, kwargs = launch.kernel, launch.args, launch.kwargs
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    if not specialise:
        attrs = {}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints its ptxas log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    log = log.getvalue()
    if not re.search(r"Used \d+ registers", log):
        raise RuntimeError(f"no ptxas log from Triton {triton.__version__} (run through run_script, which sets "
                           f"TRITON_ALWAYS_COMPILE and TRITON_DUMP_PTXAS_LOG): {log[-2000:]!r}")
    number = lambda pattern: sum(int(x) for x in re.findall(pattern, log))  # noqa: E731
    ptx = compiled.asm["ptx"]
    local, local_in_loops, loops = local_memory_accesses(compiled.asm["cubin"], triton.knobs.nvidia.nvdisasm.path)
    return dict(
        capability=capability, warps=options.num_warps,
        registers=number(r"Used (\d+) registers"),
        spill_bytes=number(r"(\d+) bytes spill (?:stores|loads)"),  # stored + loaded
        stack=number(r"(\d+) bytes stack frame"),
        sass_local=local, sass_local_in_loops=local_in_loops, sass_loops=loops,
        local=ptx.count(".local"),
        v4_loads=ptx.count("ld.global.v4"), v4_stores=ptx.count("st.global.v4"),
        wgmma=ptx.count("wgmma.mma_async"),
        divisible=sorted(kernel.arg_names[path[0]] for path, a in attrs.items() if ["tt.divisibility", 16] in a),
    )


def emit(results: dict) -> None:
    """Print ``results`` as the script's last stdout line (what :func:`run_script` returns)."""
    sys.stdout.flush()
    print(json.dumps(results), flush=True)
