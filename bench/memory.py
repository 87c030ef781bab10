"""Peak extra memory of one call.

GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
what was allocated before the call (the inputs and anything else already live).

CPU: the process's resident-set high-water mark.  Before the call the kernel's
high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the current RSS is read
as the baseline, and after the call ``VmHWM - baseline`` is the peak.  So that RSS
follows live tensors, glibc is told (``mallopt``) to serve every allocation of 64 KiB
or more with its own ``mmap`` and to give freed memory back at once; otherwise freed
heap memory could stay resident and be reused unseen.  This counts everything the
call touches (ATen temporaries, compiled kernels' buffers), not only tensors.

The harness subtracts the gradients every provider must return (dx, dW) itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable, Optional

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 16

_cpu_state: dict[str, object] = {}


def _read_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) * 1024
    return out


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def configure_cpu() -> tuple[bool, str]:
    """Set up RSS tracking once per process; returns (available, reason if not)."""
    if "ok" in _cpu_state:
        return _cpu_state["ok"], _cpu_state["reason"]
    ok, reason = True, ""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, 0)):
            ok, reason = False, "mallopt failed (not glibc?)"
        else:
            _read_status()
            _reset_hwm()
    except (OSError, AttributeError) as exc:
        ok, reason = False, f"RSS high-water mark not available: {exc}"
    _cpu_state.update(ok=ok, reason=reason)
    return ok, reason


def method(device: torch.device) -> str:
    """Short name of the method, written to the CSV next to every number."""
    if device.type == "cuda":
        return "cuda-max-allocated"
    ok, reason = configure_cpu()
    return "rss-hwm" if ok else f"unavailable ({reason})"


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by ``fn()`` above what was live before it (None if not measurable).
    Whatever ``fn`` leaves alive (e.g. ``.grad``) is part of the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    ok, _ = configure_cpu()
    if not ok:
        return None
    _reset_hwm()
    base = _read_status()["VmRSS"]
    fn()
    return max(0, _read_status()["VmHWM"] - base)
