"""LM-head demo: DFT loss and gradients of a random head, chunked vs the materialising reference.

    python -m dft_kernels.demo [--n 4096 --hidden 512 --vocab 32000 --chunk-size 512]

Each variant runs in a fresh subprocess so its peak memory is its own: the peak is the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
after the inputs are built) minus the resident set at that moment, i.e. the extra
memory the loss and its backward needed on top of the inputs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run_variant(variant: str, n: int, hidden: int, vocab: int, chunk_size: int | None, seed: int, out: str):
    import torch

    import dft_kernels as dk

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden ** 0.5)).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.1] = -100  # some prompt tokens, as in SFT
    fn = dk.linear_cross_entropy if variant == "chunked" else dk.reference.linear_cross_entropy
    kwargs = dict(objective="dft", backend="torch", chunk_size=chunk_size) if variant == "chunked" else {}

    have_clear_refs = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
    except OSError:
        have_clear_refs = False
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = fn(x, w, t, **({"objective": "dft"} | kwargs))
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base if have_clear_refs else float("nan")
    torch.save({"loss": loss.detach(), "dx": x.grad, "dw": w.grad}, out)
    return {"variant": variant, "seconds": seconds, "peak_mib": peak / 1024.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk-size", type=int, default=512,
                    help="token rows per chunk (default 512; the library default comes from a 1 GiB budget)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        for variant in ("chunked", "reference"):
            path = os.path.join(tmp, f"{variant}.pt")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                info = pool.submit(_run_variant, variant, args.n, args.hidden, args.vocab, args.chunk_size,
                                   args.seed, path).result()
            info.update(torch.load(path))
            results[variant] = info

    a, r = results["chunked"], results["reference"]
    logits_mib = args.n * args.vocab * 4 / 2**20
    print(f"DFT loss of a random LM head: N={args.n} tokens, H={args.hidden}, V={args.vocab}, float32, CPU")
    print(f"(full logits would be {logits_mib:.0f} MiB; chunked uses {args.chunk_size} rows at a time)\n")
    print(f"{'':<26}{'loss':>14}{'fwd+bwd s':>12}{'peak extra MiB':>17}")
    for name, res in (("chunked (backend=torch)", a), ("materialising reference", r)):
        print(f"{name:<26}{res['loss'].item():>14.8f}{res['seconds']:>12.2f}{res['peak_mib']:>17.1f}")
    print()
    for key, label in (("dx", "input"), ("dw", "weight")):
        diff = (a[key] - r[key]).abs().max().item()
        rel = ((a[key].double() - r[key].double()).norm() / r[key].double().norm()).item()
        print(f"max |grad {label} difference| = {diff:.3e}   (relative norm error {rel:.2e})")
    print(f"loss difference = {abs(a['loss'].item() - r['loss'].item()):.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
