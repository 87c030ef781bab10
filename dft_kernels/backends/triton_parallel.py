"""Triton split row kernel (contract in ``dft_kernels.backends.split``): pass 1 and pass 2 of the
fused row kernel of ``dft_kernels.backends.triton`` as two kernels, for this rank's vocabulary slice.

pass 1, over the slice in blocks (online, float32), with ``z = softcap * tanh(z0 / softcap)``::

    m_r = max_j z_j;  r_r = sum_{j != one argmax} e^{z_j - m_r};  t_r = sum_j e^{z_j - m_r} (m_r - z_j)
    z_sum = sum_j z_j;  z_y (target in the slice);  first argmax as a global index

pass 2, over the slice again, in place in the logits dtype::

    dz0_j = scale * (j == y ? target_grad : a e^{z_j - M} inv_sum - c) * sech^2(z0_j / softcap)

Both reuse the fused kernel's device helpers (block loads with softcap, per-block statistics and
their online merge, ``tanh``/``sech^2``) and its launch configuration; row offsets are int64,
column offsets int32 (slices below ``MAX_VOCAB``), as there.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import LossParams
from .split import PartialRowStats, RowGradCoefficients
from .triton import (
    _SUPPORTED_DTYPES,
    LOG2E,
    MAX_REGISTERS,
    MAX_VOCAB,
    _row_stats,
    _sech2,
    _tanh,
    block_config,
    is_available,
)

NAME = "triton"
__all__ = ["NAME", "is_available", "partial_row_stats", "row_grad"]


@triton.jit
def _partial_row_stats_kernel(
    logits_ptr, stride_row, n_rows, target_ptr,
    max_ptr, rest_ptr, spread_ptr, zsum_ptr, zy_ptr, argmax_ptr,
    V_local, vocab_start, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, NEEDS_ENTROPY: tl.constexpr,
    WITH_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 1 on ``ROWS`` rows of this rank's slice ``[vocab_start, vocab_start + V_local)``:
    ``m_r = max z``, ``r_r = sum_{j != one argmax} e^{z_j - m_r}``, ``t_r = sum e^{z_j - m_r} (m_r - z_j)``,
    ``sum z``, ``z_y`` (0 when the target is not in the slice) and the first argmax (global index)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index) - vocab_start
    owned = row_ok & (y + vocab_start != ignore_index) & (y >= 0) & (y < V_local)
    y = tl.where(owned, y, 0)

    # the fused kernel's pass 1 on the slice (masked -inf columns and all -inf blocks carry no mass)
    m, r, t, zsum, arg = _row_stats(row_ptrs, row_ok, V_local, softcap, HAS_SOFTCAP, HAS_SMOOTHING,
                                    NEEDS_ENTROPY, WITH_STATS, ROWS, BLOCK)

    z_y = tl.load(row_ptrs + y, mask=owned, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    tl.store(max_ptr + rows, m, mask=row_ok)
    tl.store(rest_ptr + rows, r, mask=row_ok)
    tl.store(zy_ptr + rows, tl.where(owned, z_y, 0.0), mask=row_ok)
    if NEEDS_ENTROPY:
        tl.store(spread_ptr + rows, t, mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(zsum_ptr + rows, zsum, mask=row_ok)
    if WITH_STATS:
        tl.store(argmax_ptr + rows, arg.to(tl.int64) + vocab_start, mask=row_ok)


@triton.jit
def _row_grad_kernel(
    logits_ptr, stride_row, n_rows, target_ptr,
    max_ptr, inv_sum_ptr, a_ptr, c_ptr, target_grad_ptr, scale_ptr,
    V_local, vocab_start, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 on ``ROWS`` rows of the slice, in place:
    ``dz0_j = scale * (j == y ? target_grad : a e^{z_j - M} inv_sum - c) * sech^2(z0_j / softcap)``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index) - vocab_start
    owned = row_ok & (y + vocab_start != ignore_index) & (y >= 0) & (y < V_local)
    y = tl.where(owned, y, -1)  # -1 matches no column

    m = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(a_ptr + rows, mask=row_ok, other=0.0) * tl.load(inv_sum_ptr + rows, mask=row_ok, other=0.0)
    c = tl.zeros_like(coef)
    if HAS_SMOOTHING:
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    target_grad = tl.load(target_grad_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V_local, BLOCK):
        bcols = start + cols
        ptrs = row_ptrs[:, None] + bcols[None, :]
        io_mask = row_ok[:, None] & (bcols < V_local)[None, :]
        z0 = tl.load(ptrs, mask=io_mask, other=0.0).to(tl.float32)
        z = z0
        if HAS_SOFTCAP:
            z = softcap * _tanh(z0 / softcap)
        grad = coef[:, None] * tl.exp2((z - m[:, None]) * LOG2E) - c[:, None]
        grad = tl.where(bcols[None, :] == y[:, None], target_grad[:, None], grad)
        if HAS_SOFTCAP:
            grad = grad * _sech2(z0 / softcap)
        grad = tl.where(scale[:, None] != 0.0, grad * scale[:, None], 0.0)
        tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=io_mask)


def _check_logits(logits: Tensor) -> None:
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"logits: the triton backend takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [n, V] tensor with unit stride along V, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    if logits.shape[1] > MAX_VOCAB:  # column offsets are int32, as in the fused kernel
        raise ValueError(f"logits: the triton backend takes slices of at most {MAX_VOCAB} entries, "
                         f"got {logits.shape[1]}")


def _launch(kernel, logits: Tensor, args: tuple, flags: dict) -> None:
    n, local_size = logits.shape
    rows, block, warps = block_config(local_size, options=flags["HAS_SOFTCAP"] or flags["HAS_SMOOTHING"])
    dev = logits.device
    # Triton launches on the current CUDA device: make it the logits' one
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kernel[(triton.cdiv(n, rows),)](*args, **flags, ROWS=rows, BLOCK=block, num_warps=warps,
                                        maxnreg=MAX_REGISTERS)


def partial_row_stats(logits: Tensor, target: Tensor, vocab_start: int, params: LossParams) -> PartialRowStats:
    _check_logits(logits)
    n, local_size = logits.shape
    f32 = torch.float32
    new = lambda: torch.empty(n, dtype=f32, device=logits.device)  # noqa: E731
    m, rest, z_y = new(), new(), new()
    spread = new() if params.needs_entropy else None
    z_sum = new() if params.label_smoothing != 0.0 else None
    argmax = torch.empty(n, dtype=torch.int64, device=logits.device) if params.with_stats else None
    if n > 0:
        cap = params.softcap
        args = (logits, logits.stride(0), n, target.contiguous(), m, rest, m if spread is None else spread,
                m if z_sum is None else z_sum, z_y, target if argmax is None else argmax,
                local_size, vocab_start, params.ignore_index, 1.0 if cap is None else float(cap))
        flags = dict(HAS_SOFTCAP=cap is not None, HAS_SMOOTHING=z_sum is not None,
                     NEEDS_ENTROPY=spread is not None, WITH_STATS=argmax is not None)
        _launch(_partial_row_stats_kernel, logits, args, flags)
    return PartialRowStats(max=m, rest=rest, spread=spread, z_sum=z_sum, target_logit=z_y, argmax=argmax)


def row_grad(logits: Tensor, target: Tensor, vocab_start: int, params: LossParams,
             coefficients: RowGradCoefficients) -> None:
    _check_logits(logits)
    n, local_size = logits.shape
    if n == 0:
        return
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    k = coefficients
    cap = params.softcap
    m = f32(k.max)
    args = (logits, logits.stride(0), n, target.contiguous(), m, f32(k.inv_sum), f32(k.a),
            m if k.c is None else f32(k.c), f32(k.target_grad), f32(k.scale),
            local_size, vocab_start, params.ignore_index, 1.0 if cap is None else float(cap))
    _launch(_row_grad_kernel, logits, args, dict(HAS_SOFTCAP=cap is not None, HAS_SMOOTHING=k.c is not None))
