"""Triton fused head (experimental: ``fused_head=True``; not yet measured on a GPU): the logits GEMM
writes the factored gradient itself, so no logits tensor exists and no kernel reads one.

For a chunk ``x_c`` ``[n, H]`` and the head ``W`` ``[V, H]``, with ``c_i`` the target's logit
(``z_iy``, from a gathered dot product) and ``z = softcap * tanh(z0 / softcap)`` (or ``z0``)::

    tile (i-block, j-block):  z0 = x_c W^T in float32 accumulators (never stored)
                              partial statistics of the tile's rows (max, r, t, argmax; as pass 1)
                              G~_ij = e^{z_ij - c_i} sech^2(z0_ij / softcap)   stored once (grad dtype)
    per row:                  merge the partials -> lse, logp, loss, w (the row kernel's epilogue)
                              row_scale_i = scale w e^{c_i - lse},  G~_iy = expm1(logp) e^{lse - c_i} sech^2

so that ``row_scale[:, None] * G~`` is the gradient the row kernel writes (the factored form of
``dft_kernels.backends``).  A row whose max is more than ``FACTORED_SHIFT_LIMIT`` nats above its
target logit is flagged by the merge and its tiles are recomputed with ``c_i`` = the max (the
GEMM is relaunched; every program without a flagged row returns at once), so no entry exceeds
``e^40``.  The logits are float32 accumulators, as in the default mode, whatever ``logits_dtype``
says; only the stored gradient is rounded.  Not for label smoothing, z-loss, a bias, float16.

The GEMM is a plain Triton tiled matmul (``tl.dot``, grouped tile order, not autotuned); it runs
in place of cuBLAS's logits GEMM, so whether this path is faster than cuBLAS + the factored row
kernel is a GPU measurement (``python -m bench.model --fused`` gives the prediction at an assumed
GEMM rate).  Runs on CPU tensors under ``TRITON_INTERPRET=1``, as the tests do.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import RowOutputs
from ..backends.triton import (
    FACTORED_SHIFT_LIMIT,
    LOG2E,
    _as_float32,
    _block_stats,
    _expm1,
    _grad_scale,
    _interpreting,
    _load_targets,
    _merge,
    _row_epilogue,
    _sech2,
    _tanh,
    supports,
)
from ..options import LossParams


@triton.jit
def _target_logit_kernel(x_ptr, stride_x, w_ptr, stride_w, target_ptr, c_ptr, z0y_ptr, n_rows, H, V,
                         ignore_index, softcap, HAS_SOFTCAP: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    """``z0_iy = x_i . W_y`` in float32 and ``c_i = softcap * tanh(z0_iy / softcap)`` (or ``z0_iy``);
    0 at rows whose target is not a class."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    y = y.to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    acc = tl.zeros([ROWS], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        mask = valid[:, None] & ((k + hs) < H)[None, :]
        a = tl.load(x_ptr + rows[:, None] * stride_x + (k + hs)[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + y[:, None] * stride_w + (k + hs)[None, :], mask=mask, other=0.0)
        b = b.to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    c = acc
    if HAS_SOFTCAP:
        c = softcap * _tanh(acc / softcap)
    tl.store(z0y_ptr + rows, tl.where(valid, acc, 0.0), mask=row_ok)
    tl.store(c_ptr + rows, tl.where(valid, c, 0.0), mask=row_ok)


@triton.jit
def _fused_logits_kernel(x_ptr, stride_x, w_ptr, stride_w, grad_ptr, stride_g, c_ptr, target_ptr, flag_ptr,
                         pm_ptr, pr_ptr, pt_ptr, parg_ptr, stride_p, n_rows, V, H, ignore_index, softcap,
                         HAS_SOFTCAP: tl.constexpr, NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr,
                         HAS_GRAD: tl.constexpr, RECOMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """One ``[BM, BN]`` tile of ``z0 = x W^T`` (float32 accumulators): its rows' partial statistics
    (``RECOMPUTE`` off) at column ``pid_n`` of the partials, and (``HAS_GRAD``) its entries of
    ``G~ = e^{z - c} sech^2(z0 / softcap)`` (zeros at invalid rows).  The shift
    ``e^{bm - c}`` is clamped at ``e^40``: the merge flags such rows and ``RECOMPUTE`` rewrites
    their tiles with ``c`` = the row max (other programs return at once)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BM)
    num_n = tl.cdiv(V, BN)
    # grouped order: GROUP_M row blocks sweep the vocabulary together, sharing W tiles in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < n_rows
    col_ok = cols < V
    if RECOMPUTE:
        todo = tl.load(flag_ptr + rows, mask=row_ok, other=0)
    else:
        todo = row_ok.to(tl.int32)
    if tl.max(todo, axis=0) > 0:
        ks = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(0, H, BK):
            k_ok = (k + ks) < H
            a = tl.load(x_ptr + rows[:, None] * stride_x + (k + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + (k + ks)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot takes 16-bit floats for integers; their products are exact in float32
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        z0 = acc
        z = z0
        if HAS_SOFTCAP:
            z = softcap * _tanh(z0 / softcap)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        bm, r_b, t_b, b_arg, e = _block_stats(z, pid_n * BN, NEEDS_ENTROPY, WITH_STATS)
        if not RECOMPUTE:
            p_off = rows * stride_p + pid_n
            tl.store(pm_ptr + p_off, bm, mask=row_ok)
            tl.store(pr_ptr + p_off, r_b, mask=row_ok)
            if NEEDS_ENTROPY:
                tl.store(pt_ptr + p_off, t_b, mask=row_ok)
            if WITH_STATS:
                tl.store(parg_ptr + p_off, b_arg, mask=row_ok)
        if HAS_GRAD:
            _, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
            c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
            shift = tl.exp2(tl.minimum(bm - c, FACTORED_SHIFT_LIMIT) * LOG2E)
            out = e * tl.where(valid & (bm > float("-inf")), shift, 0.0)[:, None]
            if HAS_SOFTCAP:
                out = out * _sech2(z0 / softcap)
            mask = row_ok[:, None] & col_ok[None, :]
            if RECOMPUTE:
                mask = mask & (todo != 0)[:, None]
            tl.store(grad_ptr + rows[:, None] * stride_g + cols[None, :], out.to(grad_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def _merge_tiles_kernel(pm_ptr, pr_ptr, pt_ptr, parg_ptr, stride_p, n_tiles, c_ptr, z0y_ptr, target_ptr,
                        weights_ptr, scale_ptr, loss_ptr, nll_ptr, prob_ptr, entropy_ptr, correct_ptr,
                        row_scale_ptr, flag_ptr, target_grad_ptr, n_rows, V, ignore_index, softcap, param0, param1,
                        OBJECTIVE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                        HAS_GRAD: tl.constexpr, SCALE_PER_ROW: tl.constexpr, NEEDS_ENTROPY: tl.constexpr,
                        WITH_STATS: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """Per row: the tiles' partial statistics merged (a block of ``TILES`` at a time, as pass 1
    merges blocks), the objective's epilogue and outputs; with ``HAS_GRAD`` the row factor, the
    target entry of ``G~`` (stored by :func:`_target_entry_kernel` after any recompute), the
    final shift ``c`` and the recompute flag."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    r = tl.zeros([ROWS], dtype=tl.float32)
    t = tl.zeros([ROWS], dtype=tl.float32)
    arg = tl.zeros([ROWS], dtype=tl.int32)
    js = tl.arange(0, TILES)
    for start in range(0, n_tiles, TILES):
        j_ok = (start + js) < n_tiles
        off = rows[:, None] * stride_p + (start + js)[None, :]
        mask = row_ok[:, None] & j_ok[None, :]
        bm_j = tl.load(pm_ptr + off, mask=mask, other=float("-inf"))
        r_j = tl.load(pr_ptr + off, mask=mask, other=0.0)
        # the block of tiles as one block of pass 1: relative to its max, one maximal tile's own 1 apart
        if WITH_STATS:
            bm, first = tl.max(bm_j, axis=1, return_indices=True, return_indices_tie_break_left=True)
        else:
            bm = tl.max(bm_j, axis=1)
            first = tl.argmax(bm_j, axis=1, tie_break_left=True)
        a_j = tl.exp2((bm_j - tl.where(bm == float("-inf"), 0.0, bm)[:, None]) * LOG2E)
        has = bm_j > float("-inf")
        is_first = js[None, :] == first[:, None]
        r_b = tl.sum(tl.where(is_first, r_j, tl.where(has, a_j * (1.0 + r_j), 0.0)), axis=1)
        t_b = tl.zeros_like(r_b)
        if NEEDS_ENTROPY:
            t_j = tl.load(pt_ptr + off, mask=mask, other=0.0)
            t_b = tl.sum(tl.where(has, a_j * (t_j + (bm[:, None] - bm_j) * (1.0 + r_j)), 0.0), axis=1)
        b_arg = tl.zeros_like(arg)
        if WITH_STATS:
            args = tl.load(parg_ptr + off, mask=mask, other=0)
            b_arg = tl.sum(tl.where(is_first, args, 0), axis=1)
        m, r, t, arg = _merge(m, r, t, arg, bm, r_b, t_b, b_arg, NEEDS_ENTROPY, WITH_STATS)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    lse, logp, w, row_weight = _row_epilogue(
        m, r, t, tl.zeros_like(r), arg, c, y, valid, rows, row_ok, V, 0.0, 0.0, param0, param1,
        weights_ptr, loss_ptr, nll_ptr, prob_ptr, entropy_ptr, correct_ptr,
        OBJECTIVE, False, False, HAS_WEIGHTS, NEEDS_ENTROPY, WITH_STATS)
    if HAS_GRAD:
        scale = _grad_scale(scale_ptr, rows, row_ok, SCALE_PER_ROW)
        flagged = valid & (m > c + FACTORED_SHIFT_LIMIT)
        c_final = tl.where(flagged, m, c)
        row_scale = tl.where(valid, scale * row_weight * w * tl.exp2((c_final - lse) * LOG2E), 0.0)
        target_g = _expm1(logp) * tl.exp2((lse - c_final) * LOG2E)
        if HAS_SOFTCAP:
            target_g = target_g * _sech2(tl.load(z0y_ptr + rows, mask=row_ok, other=0.0) / softcap)
        tl.store(row_scale_ptr + rows, row_scale, mask=row_ok)
        tl.store(c_ptr + rows, c_final, mask=row_ok)
        tl.store(flag_ptr + rows, flagged.to(tl.int32), mask=row_ok)
        tl.store(target_grad_ptr + rows, tl.where(valid, target_g, 0.0), mask=row_ok)


@triton.jit
def _target_entry_kernel(grad_ptr, stride_g, target_ptr, target_grad_ptr, n_rows, V, ignore_index,
                         ROWS: tl.constexpr):
    """``G~[i, y_i] = target_grad[i]`` at valid rows (after every tile is written)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    g = tl.load(target_grad_ptr + rows, mask=valid, other=0.0)
    tl.store(grad_ptr + rows * stride_g + y, g.to(grad_ptr.dtype.element_ty), mask=valid)


def tile_config(dtype: torch.dtype, softcap: bool = False) -> tuple[int, int, int, int, int]:
    """``(BM, BN, BK, num_warps, num_stages)`` of the fused GEMM: a common Hopper-friendly tile
    for 16-bit inputs (not tuned on a GPU); small tiles under the interpreter.

    Warps are chosen so that ptxas spills nothing on sm_90 and sm_80 with the Triton versions the
    codegen checks cover (tests/experimental/test_fused_head.py, ``make codegen-stacks``): 16-bit inputs with a
    softcap (whose epilogue keeps the tile's ``z0`` and its ``e^{z - bm}`` both live) take 16
    warps, 4 warpgroups of the 128 x 128 tile (8 warps hit ptxas's 255-register limit and spilled
    with Triton 3.6 / 3.7); float32 inputs (an FMA GEMM: ``tl.dot`` at ieee precision) take 8
    warps (4 spilled on sm_80)."""
    if _interpreting():
        return 32, 64, 32, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 8, 3
    return 128, 128, 64, 16 if softcap else 8, 3


def supported(x: Tensor, weight: Tensor, params: LossParams) -> bool:
    return (not supports("factored", params) and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and x.dim() == 2 and weight.dim() == 2 and x.stride(1) == 1 and weight.stride(1) == 1)


def linear_loss_grad_fused(x: Tensor, weight: Tensor, target: Tensor, params: LossParams,
                           token_weights: Optional[Tensor], grad_scale: Optional[Tensor], grad_out: Optional[Tensor],
                           row_scale: Optional[Tensor]) -> Optional[RowOutputs]:
    """The row contract's outputs for the logits ``x @ weight.T`` (never formed) and, with
    ``grad_scale``, their gradient factored into ``grad_out`` ``[n, V]`` (any float dtype the
    GEMMs read) and ``row_scale`` ``[n]`` float32.  Returns None, writing nothing, where
    :func:`supported` is false."""
    if not supported(x, weight, params):
        return None
    n, hidden = x.shape
    vocab = weight.shape[0]
    dev = x.device
    f32 = torch.float32
    new = lambda: torch.empty(n, dtype=f32, device=dev)  # noqa: E731
    loss, nll, prob = new(), new(), new()
    entropy = new() if params.needs_entropy else None
    correct = new() if params.with_stats else None
    if n == 0:
        return RowOutputs(loss, nll, prob, entropy, correct)
    with_grad = grad_scale is not None
    if with_grad and (grad_out is None or row_scale is None):
        raise ValueError("grad_out and row_scale are required with grad_scale")
    target = target.contiguous()
    if token_weights is not None:
        token_weights = token_weights.to(f32).contiguous()
    per_row = with_grad and grad_scale.dim() == 1
    if with_grad:
        grad_scale = grad_scale.to(f32).contiguous()
    bm, bn, bk, warps, stages = tile_config(x.dtype, params.softcap is not None)
    n_tiles = triton.cdiv(vocab, bn)
    partial = lambda dtype: torch.empty((n, n_tiles), dtype=dtype, device=dev)  # noqa: E731
    pm, pr = partial(f32), partial(f32)
    pt = partial(f32) if params.needs_entropy else pm
    parg = partial(torch.int32) if params.with_stats else pm
    c, z0y = new(), new()
    flag = torch.zeros(n, dtype=torch.int32, device=dev)
    target_grad = new()
    cap = params.softcap
    softcap = 1.0 if cap is None else float(cap)
    p0, p1 = params.objective.resolve(vocab).kernel_params
    grad = grad_out if with_grad else loss  # a placeholder pointer when there is no gradient
    upcast = _interpreting() and x.dtype != f32
    precision = "ieee" if x.dtype == f32 or upcast else "tf32"
    rows = 64 if _interpreting() else 1
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _target_logit_kernel[(triton.cdiv(n, rows),)](
            x, x.stride(0), weight, weight.stride(0), target, c, z0y, n, hidden, vocab, params.ignore_index, softcap,
            HAS_SOFTCAP=cap is not None, ROWS=rows, BLOCK_H=min(triton.next_power_of_2(hidden), 1024))
        grid = (triton.cdiv(n, bm) * n_tiles,)
        gemm_args = (x, x.stride(0), weight, weight.stride(0), grad, grad.stride(0) if with_grad else 0, c, target,
                     flag, pm, pr, pt, parg, n_tiles, n, vocab, hidden, params.ignore_index, softcap)
        gemm_flags = dict(HAS_SOFTCAP=cap is not None, NEEDS_ENTROPY=params.needs_entropy,
                          WITH_STATS=params.with_stats, HAS_GRAD=with_grad, DOT_PRECISION=precision, UPCAST=upcast,
                          BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
        _fused_logits_kernel[grid](*gemm_args, RECOMPUTE=False, **gemm_flags)
        dummy = loss
        _merge_tiles_kernel[(triton.cdiv(n, rows),)](
            pm, pr, pt, parg, n_tiles, n_tiles, c, z0y, target,
            dummy if token_weights is None else token_weights, grad_scale if with_grad else dummy,
            loss, nll, prob, dummy if entropy is None else entropy, dummy if correct is None else correct,
            row_scale if with_grad else dummy, flag, target_grad, n, vocab, params.ignore_index, softcap,
            _as_float32(p0), _as_float32(p1),
            OBJECTIVE=params.objective.kernel_id, HAS_SOFTCAP=cap is not None, HAS_WEIGHTS=token_weights is not None,
            HAS_GRAD=with_grad, SCALE_PER_ROW=per_row, NEEDS_ENTROPY=params.needs_entropy,
            WITH_STATS=params.with_stats, ROWS=rows, TILES=min(triton.next_power_of_2(n_tiles), 64))
        if with_grad:
            # rows flagged by the merge (max > target logit + 40): their tiles again, shifted by the max
            _fused_logits_kernel[grid](*gemm_args, RECOMPUTE=True, **gemm_flags)
            _target_entry_kernel[(triton.cdiv(n, rows),)](grad, grad.stride(0), target, target_grad, n, vocab,
                                                         params.ignore_index, ROWS=rows)
    return RowOutputs(loss, nll, prob, entropy, correct)
