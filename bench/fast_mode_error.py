"""``python -m bench.fast_mode_error``: relative error of the default mode (float32 chunk logits)
and of the fast mode (``logits_dtype=torch.bfloat16``) against the float64 reference, per
objective, next to eager PyTorch on the same bfloat16 logits (the bf16 GEMM, then float32
math).  Measured on CPU with the CUDA GEMM policy emulated exactly (16-bit operands, float32
products, as cuBLAS' ``mm(out_dtype=float32)``), so the gradients go through the dtypes they
have on a GPU.  docs/api.md quotes its output.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels import options

OBJECTIVES = ["ce", "dft", "power", "focal", "chord", "prob", "entropy", "eaft"]


def _cublas_like(a, b, out_dtype, *, out=None, accumulate=False):
    """float32 products of 16-bit operands summed in float32, in row blocks (see the module doc)."""
    if out is None:
        out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype)
    b32 = b.to(torch.float32)
    for s in range(0, a.shape[0], 512):
        block = a[s:s + 512].to(torch.float32) @ b32
        if accumulate:
            out[s:s + 512] += block
        else:
            out[s:s + 512] = block
    return out


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def measure(objective: str, n: int, h: int, v: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.25] = -100
    grad_out = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    leaf = lambda a: a.detach().clone().requires_grad_()  # noqa: E731
    results = {}
    xr, wr = leaf(x.double()), leaf(w.double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, objective=objective)
    rdx, rdw = torch.autograd.grad(ref, [xr, wr], grad_out)
    runs = {
        "default": lambda xs, ws: dk.linear_cross_entropy(xs, ws, t, objective=objective, backend="torch"),
        "fast": lambda xs, ws: dk.linear_cross_entropy(xs, ws, t, objective=objective, backend="torch",
                                                       logits_dtype=torch.bfloat16),
        "eager": lambda xs, ws: dk.reference.cross_entropy(F.linear(xs, ws).float(), t, objective=objective),
    }
    for name, run in runs.items():
        xs, ws = leaf(x), leaf(w)
        loss = run(xs, ws)
        dx, dw = torch.autograd.grad(loss, [xs, ws], grad_out.float())
        results[f"{name} loss"], results[f"{name} dX"], results[f"{name} dW"] = (
            _rel(loss, ref), _rel(dx, rdx), _rel(dw, rdw))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fast_mode_error", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512,128,16000", help="N,H,V (bfloat16), default 512,128,16000")
    args = parser.parse_args(argv)
    n, h, v = (int(s) for s in args.shape.split(","))
    saved = options.MM_OUT_DTYPE.get("cpu", "absent")
    options.MM_OUT_DTYPE["cpu"] = _cublas_like
    try:
        rows = []
        for obj in OBJECTIVES:
            rows.append((obj, measure(obj, n, h, v)))
            print(f"measured {obj}", file=sys.stderr, flush=True)
    finally:
        if saved == "absent":
            options.MM_OUT_DTYPE.pop("cpu", None)
        else:
            options.MM_OUT_DTYPE["cpu"] = saved
    print(f"Relative error vs the float64 reference, bf16 inputs, N {n} H {h} V {v}, mean, 25% ignored "
          f"(torch backend, CUDA GEMM policy emulated on CPU)\n")
    cols = [f"{mode} {q}" for q in ("loss", "dX", "dW") for mode in ("default", "fast", "eager")]
    print("| objective | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for obj, r in rows:
        print(f"| {obj} | " + " | ".join(f"{r[c]:.1e}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
