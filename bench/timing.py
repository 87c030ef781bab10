"""Wall-clock timing: ``triton.testing.do_bench`` on GPU, a warmed-up timed loop on CPU.

Both return the median and the 20th/80th percentiles in milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


@dataclass(frozen=True)
class TimingConfig:
    """CPU loop: ``warmup`` untimed calls, then timed calls until ``reps`` samples or
    ``max_seconds`` (at least ``min_reps``).  GPU: do_bench's ``warmup``/``rep`` in ms."""

    warmup: int = 2
    reps: int = 10
    min_reps: int = 3
    max_seconds: float = 20.0
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of sorted values."""
    if not sorted_vals:
        raise ValueError("no samples")
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> Timing:
    s = sorted(samples_ms)
    return Timing(_percentile(s, 0.5), _percentile(s, 0.2), _percentile(s, 0.8), len(s))


def time_cpu(fn: Callable[[], object], cfg: TimingConfig) -> Timing:
    for _ in range(cfg.warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < cfg.reps:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= cfg.min_reps and time.perf_counter() - start > cfg.max_seconds:
            break
    return summarize(samples)


def time_gpu(fn: Callable[[], object], cfg: TimingConfig, grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=cfg.gpu_warmup_ms, rep=cfg.gpu_rep_ms, grad_to_none=list(grad_to_none),
                             quantiles=[0.5, 0.2, 0.8])
    return Timing(float(med), float(p20), float(p80), -1)


def time_fn(fn: Callable[[], object], device: torch.device, cfg: TimingConfig,
            grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    if device.type == "cuda":
        return time_gpu(fn, cfg, grad_to_none)
    return time_cpu(fn, cfg)
