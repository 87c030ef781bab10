"""The CPU chunk budget, side by side in one process: DFT fwd+bwd (torch backend, float32) at
N 4096, H 512, V 32000 with ``chunk_bytes`` 64, 128 (the default) and 256 MiB (the budget before),
timed alternately (the order flips every repetition, so a loaded machine slows each variant alike),
then the peak extra memory of one call of each (bench/memory.py: the RSS high-water mark above the
RSS before the call, minus the dx and dW every variant returns).

    python -m bench.cpu_chunk_budget [REPS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import dft_kernels as dk

from . import memory

N, H, V = 4096, 512, 32000
VARIANTS = {"64 MiB": 1 << 26, "128 MiB (default)": None, "256 MiB (before)": 1 << 28}


def main(reps: int = 8) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)

    def step(chunk_bytes):
        x.grad = w.grad = None
        dk.linear_cross_entropy(x, w, t, objective="dft", backend="torch", chunk_bytes=chunk_bytes).backward()

    for budget in VARIANTS.values():
        step(budget)  # warm-up
    times = {name: [] for name in VARIANTS}
    items = list(VARIANTS.items())
    for r in range(reps):
        for name, budget in items if r % 2 == 0 else reversed(items):
            start = time.perf_counter()
            step(budget)
            times[name].append(time.perf_counter() - start)
    returned = (N * H + V * H) * 4  # dx and dW
    print(f"N {N}, H {H}, V {V}, float32, DFT, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{reps} alternating repetitions")
    print("| chunk_bytes | rows per chunk | median fwd+bwd ms | min ms | peak extra MB |")
    print("|---|---:|---:|---:|---:|")
    for name, budget in VARIANTS.items():
        x.grad = w.grad = None
        peak = memory.peak_bytes(lambda: step(budget), torch.device("cpu"))
        plan = dk.options.plan_linear(dk.options.LossOptions(chunk_bytes=budget), x, w, None, True, True, False)
        mb = "n/a" if peak is None else f"{(peak - returned) / 2 ** 20:.1f}"
        print(f"| {name} | {plan.chunk_size} | {statistics.median(times[name]) * 1e3:.0f} | "
              f"{min(times[name]) * 1e3:.0f} | {mb} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
