"""Two checkouts of the package side by side on CPU: DFT fwd+bwd (torch backend, float32, each
checkout's default options) at N 4096, H 512, V 32000; the after side also with the CPU chunk budget
before (256 MiB), to tell the budget's share from the rest; torch's own ``F.linear_cross_entropy``
(plain CE, no DFT weight) as a control.

Each variant runs in its own child process (two versions of one package cannot share a process);
the children alternate, and the order flips every round, so a loaded machine slows each alike.  A
child makes one warm-up call, times ``STEPS`` calls, then measures one call's peak extra memory
(bench/memory.py: the RSS high-water mark above the RSS before the call, minus the dx and dW every
variant returns).

    python -m bench.cpu_before_after BEFORE_CHECKOUT [ROUNDS]

``BEFORE_CHECKOUT``: the root of another checkout (``git worktree add /tmp/before REV``); the
"after" side is the checkout this file is in.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys

import torch

N, H, V = 4096, 512, 32000
STEPS = 3
HERE = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib.util, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
spec = importlib.util.spec_from_file_location("bench_memory", sys.argv[2])
memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(memory)
N, H, V, steps, kind = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
g = torch.Generator().manual_seed(0)
x = torch.randn(N, H, generator=g).requires_grad_()
w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
if kind == "torch":
    import torch.nn.functional as F
    loss = lambda: F.linear_cross_entropy(x, w, t)
else:
    import dft_kernels as dk
    assert dk.__file__.startswith(sys.argv[1]), dk.__file__
    budget = {"chunk_bytes": int(kind.split(":")[1])} if ":" in kind else {}
    loss = lambda: dk.linear_cross_entropy(x, w, t, objective="dft", backend="torch", **budget)
def step():
    x.grad = w.grad = None
    loss().backward()
step()
times = []
for _ in range(steps):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
x.grad = w.grad = None
peak = memory.peak_bytes(step, torch.device("cpu"))
print(json.dumps({"times": times, "peak": peak}))
"""


def _child(root: pathlib.Path, kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(HERE / "bench" / "memory.py"),
                          str(N), str(H), str(V), str(STEPS), kind],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(before: str, rounds: int = 3) -> None:
    before_root = pathlib.Path(before).resolve()
    if not (before_root / "dft_kernels" / "__init__.py").is_file():
        raise SystemExit(f"BEFORE_CHECKOUT: no dft_kernels package under {before_root}")
    variants = {f"before ({before_root.name})": (before_root, "ours"), "after (this checkout)": (HERE, "ours"),
                "after, chunk_bytes 256 MiB (the budget before)": (HERE, f"ours:{1 << 28}")}
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        variants["torch F.linear_cross_entropy (CE)"] = (HERE, "torch")
    times = {name: [] for name in variants}
    peaks = {name: [] for name in variants}
    items = list(variants.items())
    for r in range(rounds):
        for name, (root, kind) in items if r % 2 == 0 else reversed(items):
            res = _child(root, kind)
            times[name] += res["times"]
            peaks[name].append(res["peak"])
    returned = (N * H + V * H) * 4  # dx and dW
    print(f"N {N}, H {H}, V {V}, float32, DFT (torch backend), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {rounds} alternating rounds of {STEPS} timed calls")
    print("| variant | median fwd+bwd ms | min ms | peak extra MB (median of rounds) |")
    print("|---|---:|---:|---:|")
    for name in variants:
        ok = [p for p in peaks[name] if p is not None]
        mb = f"{(statistics.median(ok) - returned) / 2 ** 20:.1f}" if ok else "n/a"
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.0f} | {min(times[name]) * 1e3:.0f} | {mb} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
