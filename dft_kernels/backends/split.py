"""The split row kernel: the row contract of ``dft_kernels.backends`` cut in two passes, for a
vocabulary-parallel head where each rank holds a contiguous slice ``[vocab_start, vocab_start + V_r)``
of the logits columns.

A split backend is a module exposing ``NAME``, ``is_available(device)`` and::

    partial_row_stats(logits, target, vocab_start, params) -> PartialRowStats      # pass 1
    row_grad(logits, target, vocab_start, params, coefficients) -> None            # pass 2

``logits``: ``[n, V_r]`` contiguous raw logits of this rank's slice (before any softcap),
float32/bfloat16/float16 (the torch backend also float64).  ``target``: ``[n]`` int64 *global*
class ids.  A row's target lies in this slice when it is not ``params.ignore_index`` and
``0 <= target - vocab_start < V_r``; no other target is used as an address.

Pass 1 reads the slice once and returns, per row, with ``z = softcap * tanh(z0 / softcap)``
(or ``z0``) and ``m_r = max_j z_j`` over the slice::

    max          m_r
    rest         r_r = sum_{j != one argmax} exp(z_j - m_r)          (the argmax's exact 1 left out)
    spread       t_r = sum_j exp(z_j - m_r) (m_r - z_j)              (entropy objectives, else None)
    z_sum        sum_j z_j                                           (label smoothing, else None)
    target_logit z_y where y is in the slice, else 0
    argmax       global index of the first maximum of the slice      (with_stats, else None)

in the compute dtype (float32; float64 for float64 logits; ``argmax`` int64).  ``logits`` is
not modified.  ``dft_kernels.vocab_parallel`` combines these over the ranks into the row's
global statistics and the objective's coefficients (:class:`RowGradCoefficients`).

Pass 2 overwrites ``logits`` in place, in its own dtype, with this slice of the scaled gradient::

    dz0_j = scale * g_j * sech^2(z0_j / softcap)        (the factor only with a softcap)
    g_j   = target_grad                  at the target column (only on the rank that holds it)
    g_j   = a softmax_j - c              elsewhere,   softmax_j = exp(z_j - M) * inv_sum

``target_grad`` is ``a p - (1 - eps) w - c`` in a form that does not cancel when ``p ~ 1``.
Rows with ``scale == 0`` (ignored rows) are written as zeros.

``resolve_split_backend(name, device)`` maps a row-backend name to its split backend.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

from torch import Tensor
from torch import device as Device

from . import BACKEND_NAMES, log_once
from . import _availability as _row_backend_availability

__all__ = ["PartialRowStats", "RowGradCoefficients", "SPLIT_BACKENDS", "resolve_split_backend", "owned_rows"]


class PartialRowStats(NamedTuple):
    max: Tensor
    rest: Tensor
    spread: Optional[Tensor]
    z_sum: Optional[Tensor]
    target_logit: Tensor
    argmax: Optional[Tensor]


class RowGradCoefficients(NamedTuple):
    """Per-row ``[n]`` inputs of pass 2, in the compute dtype."""

    max: Tensor           # M, the global row max
    inv_sum: Tensor       # 1 / (1 + R), R = sum_{j != one global argmax} exp(z_j - M)
    a: Tensor             # softmax coefficient: w + 2 z_loss lse
    c: Optional[Tensor]   # uniform term w eps / V (label smoothing), else None
    target_grad: Tensor   # the target entry: a expm1(logp) + 2 z_loss lse + w eps (1 - 1/V)
    scale: Tensor         # row weight * token weight * grad_scale (0 at ignored rows)


# row-backend name -> module implementing the split contract
SPLIT_BACKENDS: dict[str, str] = {
    "torch": "dft_kernels.backends.torch_parallel",
    "triton": "dft_kernels.backends.triton_parallel",
}
# What "auto" (and "cuda", which has no split kernel) tries, per device type.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch")}
_DEFAULT_ORDER: tuple[str, ...] = ("torch",)


def owned_rows(target: Tensor, vocab_start: int, local_size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(owned, local_index)``: rows whose target lies in this slice, and the target's column in the
    slice (0 where not owned, so it is always a safe address)."""
    local = target - vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < local_size)
    return owned, local.masked_fill(~owned, 0)


def _module(name: str):
    return importlib.import_module(SPLIT_BACKENDS[name])


def _availability(name: str, device: Device) -> tuple[bool, str]:
    try:
        module = _module(name)
    except ImportError as exc:
        return False, str(exc)
    return module.is_available(device)


def resolve_split_backend(name: str, device: Device):
    """The split backend for the row-backend ``name`` on ``device``.

    ``"torch"`` and ``"triton"`` are their split modules (ValueError with the reason when
    unavailable).  ``"auto"`` takes the first available of ``triton, torch`` on CUDA and
    ``torch`` elsewhere.  ``"cuda"`` has no split kernel: where the CUDA backend is available it
    falls back like ``"auto"`` and logs why, once (elsewhere it raises as on one rank).
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    if name in SPLIT_BACKENDS:
        ok, reason = _availability(name, device)
        if not ok:
            raise ValueError(f"backend: {name!r} is not available on device {device}: {reason}")
        return _module(name)
    if name == "cuda":  # unavailable where the single-rank path would refuse it too
        ok, reason = _row_backend_availability(name, device)
        if not ok:
            raise ValueError(f"backend: {name!r} is not available on device {device}: {reason}")
    reasons = []
    for candidate in _AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
        ok, reason = _availability(candidate, device)
        if ok:
            if name == "cuda":
                log_once(f"dft_kernels: backend 'cuda' has no vocab-parallel (split) row kernel; "
                          f"using {candidate!r} for process_group calls")
            return _module(candidate)
        reasons.append(f"{candidate!r}: {reason}")
    raise ValueError(f"backend: no vocab-parallel row kernel is available on device {device} ({'; '.join(reasons)})")
