"""Triton row backend: one fused kernel per chunk, one program per logits row.

Implements the contract in ``dft_kernels.backends`` (read it first).  For a row ``z0``
of raw logits, target ``y`` and ``z = softcap * tanh(z0 / softcap)`` (or ``z0``):

pass 1, over the row in blocks (online, all in float32)::

    m = max_j z_j;  r = sum_{j != one argmax} e^{z_j - m};  t = sum_j e^{z_j - m} (m - z_j)
    lse = m + log1p(r);  logp = (z_y - m) - log1p(r);  H = log1p(r) + t / (1 + r)

epilogue (objective selected by a constexpr id, see ``objectives.py``)::

    L = (1 - eps) L_obj(logp, H) + eps * w * (lse - mean_j z_j) + lam * lse^2,  w = -g

pass 2, over the row again, writing the gradient once into ``grad_out`` in its dtype (or over
the row in place, in the logits' dtype)::

    dz0_j = scale * ((a softmax_j - b [j == y] - c) * sech(z0_j / softcap)^2)
    a = w + 2 lam lse,  b = w (1 - eps),  c = w eps / V,  scale = token_weight * grad_scale

with the target entry as ``a expm1(logp) + 2 lam lse + w eps (1 - 1/V)`` so that it
does not cancel when ``p ~ 1``.  Rows whose target is ``ignore_index`` or outside ``[0, V)``
are written as zeros and their target is never used as an address.  ``-inf`` logits (a
masked vocabulary) have no mass and a zero gradient, in any number and position, whole
blocks included; a row needs one finite logit (with label smoothing its loss is ``inf``,
as in ``F.cross_entropy``).

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported) - which is how CI tests it.
The ``autotune`` option (``LossParams.autotune``) autotunes block size and warps per vocabulary size.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import objectives
from ..options import LossParams
from . import LogprobRowOutputs, RowOutputs, check_grad_out, top_k_reason

NAME = "triton"
MAX_BLOCK = 8192
# Registers per thread (Triton's ``maxnreg``) of every GPU launch: see ``block_config``.
MAX_REGISTERS = 64
MAX_REGISTERS_FACTORED_SOFTCAP = 128  # one 16-warp program per SM (see _launch)
# The interpreter runs each tl op as a numpy call per program: fewer, wider blocks are faster.
MAX_BLOCK_INTERPRETER = 1 << 16
INTERPRETER_ELEMENTS = 1 << 18  # ROWS * BLOCK per program under the interpreter
# Largest V whose int32 column offsets (below V + BLOCK) cannot wrap.
MAX_VOCAB = 2**31 - 1 - max(MAX_BLOCK, MAX_BLOCK_INTERPRETER)

LOG2E = tl.constexpr(1.4426950408889634)
# The factored gradient's entries e^{z - c} stay below e^40 (c is raised past that): a row sum of
# V of them times a weight stays far inside float32, in the kernel and in the dX GEMM.
FACTORED_SHIFT_LIMIT = tl.constexpr(40.0)
# A row factor below this moves c up to the row's max (a second read of that row): a factor past
# float32's normal range lost the precision its product keeps (Power(3) at p = 9e-12: 5.8e-45, 25%
# off), and dW's operand factor * x stays normal for |x| >= 2^-26 above it.
FACTORED_MIN_SCALE = tl.constexpr(2.0 ** -100)



def _device_fn(fn):
    """``triton.jit`` for the kernel's device functions.  Under the interpreter they stay
    plain Python: it re-patches ``triton.language`` on every call of a jitted device
    function (milliseconds each), and plain functions run the very same tl ops."""
    jitted = triton.jit(fn)
    return fn if type(jitted).__name__ == "InterpretedFunction" else jitted


# the epilogue each objective selects (its kernel_id)
OBJ_CE = tl.constexpr(objectives.CE.kernel_id)
OBJ_DFT = tl.constexpr(objectives.DFT.kernel_id)
OBJ_POWER = tl.constexpr(objectives.Power.kernel_id)
OBJ_FOCAL = tl.constexpr(objectives.Focal.kernel_id)
OBJ_CHORD = tl.constexpr(objectives.Chord.kernel_id)
OBJ_PROB = tl.constexpr(objectives.Prob.kernel_id)
OBJ_ENTROPY = tl.constexpr(objectives.Entropy.kernel_id)
OBJ_EAFT = tl.constexpr(objectives.EAFT.kernel_id)


@_device_fn
def _expm1(x):
    """``e^x - 1`` accurate near 0 (Kahan: ``(u - 1) x / log u`` with ``u = fl(e^x)``)."""
    u = tl.exp(x)
    um1 = u - 1.0
    log_u = tl.where(um1 == 0.0, 1.0, tl.log(u))
    out = tl.where(um1 == 0.0, x, um1 * x / log_u)
    return tl.where(um1 == -1.0, -1.0, out)


@_device_fn
def _log1p(x):
    """``log(1 + x)`` accurate near 0 (Kahan: ``log(u) x / (u - 1)`` with ``u = fl(1 + x)``)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@_device_fn
def _tanh(x):
    """``tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|))`` with the sign of ``x``: no overflow, no cancellation."""
    e = _expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0.0, -t, t)


@_device_fn
def _sech2(x):
    """Softcap chain factor ``1 - tanh(x)^2 = sech(x)^2 = 4 e / (1 + e)^2`` with ``e = exp(-2|x|)``."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@_device_fn
def _pow(x, y):
    """``x^y`` for ``x >= 0`` with ``0^0 = 1`` (as ``torch.pow``)."""
    return tl.where(y == 0.0, 1.0, tl.exp2(y * tl.log2(x)))


@_device_fn
def _load_block(row_ptrs, row_ok, cols, V, softcap, HAS_SOFTCAP: tl.constexpr):
    """``[ROWS, BLOCK]`` block of ``z = softcap * tanh(z0 / softcap)`` (or ``z0``) in float32:
    ``-inf`` past ``V``, 0 in rows past the last one (finite, never stored)."""
    col_ok = cols < V
    z = tl.load(row_ptrs[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    z = z.to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return tl.where(col_ok[None, :], z, float("-inf")), col_ok


@_device_fn
def _block_stats(z, start, NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr):
    """Per-row statistics of the block of columns ``start + [0, BLOCK)`` relative to its own max ``bm``:
    ``r_b = sum_{j != one argmax} e^{z_j - bm}``, ``t_b = sum_j e^{z_j - bm} (bm - z_j)``
    the first argmax index and the block's ``e^{z_j - bm}``.  ``-inf`` entries (masked vocabulary,
    columns past V) carry no mass: they add 0 to ``t_b`` (not ``0 * inf``).  A block that is all ``-inf`` has
    ``bm = -inf``; its ``r_b`` and ``t_b`` are finite and ``_merge`` gives it weight 0."""
    idx = tl.zeros([z.shape[0]], dtype=tl.int32)
    if WITH_STATS:
        # one fused (max, first index) reduction: cheaper in registers than a second min over indices
        bm, idx = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        idx = idx + start
    else:
        bm = tl.max(z, axis=1)
    at_max = z == bm[:, None]
    # shifting an all -inf block by 0 instead of bm keeps -inf - (-inf) = nan out of e
    e = tl.exp2((z - tl.where(bm == float("-inf"), 0.0, bm)[:, None]) * LOG2E)
    # r excludes exactly one of the maximal entries (their own exact 1)
    r_b = tl.sum(tl.where(at_max, 0.0, e), axis=1) + (tl.sum(at_max.to(tl.float32), axis=1) - 1.0)
    t_b = tl.zeros_like(r_b)
    if NEEDS_ENTROPY:
        t_b = tl.sum(tl.where(e > 0.0, e * (bm[:, None] - z), 0.0), axis=1)
    return bm, r_b, t_b, idx, e


@_device_fn
def _merge(m, r, t, arg, bm, r_b, t_b, b_arg, NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr):
    """Online merge of a block's ``(bm, r_b, t_b, b_arg)`` into the running ``(m, r, t, arg)``.

    With ``a = e^{-|m - bm|}`` rescaling the smaller-max side onto the larger max::

        bm > m:  r' = r_b + a (1 + r),  t' = t_b + a (t + (bm - m)(1 + r))
        else:    r' = r + a (1 + r_b),  t' = t + a (t_b + (m - bm)(1 + r_b))

    (``t`` is relative to the max: moving it from ``m`` to ``m' > m`` adds ``m' - m`` per unit
    of mass).  A side whose max is ``-inf`` has no mass: ``a`` is 0 (or nan when both are), and
    its terms are dropped rather than multiplied by 0, since ``bm - m`` may be infinite."""
    new_max = bm > m
    a = tl.exp2(-tl.abs(m - bm) * LOG2E)
    has_a = a > 0.0  # false for a == 0 and a == nan
    if NEEDS_ENTROPY:
        t = tl.where(new_max, t_b + tl.where(has_a, a * (t + (bm - m) * (1.0 + r)), 0.0),
                     t + tl.where(has_a, a * (t_b + (m - bm) * (1.0 + r_b)), 0.0))
    r = tl.where(new_max, r_b + tl.where(has_a, a * (1.0 + r), 0.0),
                 r + tl.where(has_a, a * (1.0 + r_b), 0.0))
    if WITH_STATS:
        arg = tl.where(new_max, b_arg, arg)
    return tl.maximum(m, bm), r, t, arg


@_device_fn
def _row_stats(row_ptrs, row_ok, V, softcap, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
               NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over columns ``[0, V)`` of ``ROWS`` rows, online from the empty state ``m = -inf``:
    ``(m, r, t, sum z, first argmax)`` with ``m = max z``, ``r = sum_{j != one argmax} e^{z_j - m}``,
    ``t = sum_j e^{z_j - m} (m - z_j)`` (``sum z`` only with ``HAS_SMOOTHING``, else 0)."""
    cols = tl.arange(0, BLOCK)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    r = tl.zeros([ROWS], dtype=tl.float32)
    t = tl.zeros([ROWS], dtype=tl.float32)
    zsum = tl.zeros([ROWS], dtype=tl.float32)
    arg = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        z, col_ok = _load_block(row_ptrs, row_ok, start + cols, V, softcap, HAS_SOFTCAP)
        bm, r_b, t_b, b_arg, _ = _block_stats(z, start, NEEDS_ENTROPY, WITH_STATS)
        m, r, t, arg = _merge(m, r, t, arg, bm, r_b, t_b, b_arg, NEEDS_ENTROPY, WITH_STATS)
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    return m, r, t, zsum, arg


@_device_fn
def _row_stats_factored(row_ptrs, grad_row_ptrs, row_ok, valid, y, c, V, softcap,
                        HAS_SOFTCAP: tl.constexpr, NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The one pass of the factored gradient: pass 1's statistics, and meanwhile every entry
    written as ``e^{z_j - c} sech^2(z0_j / softcap)`` (zeros in invalid rows; the caller then
    overwrites the target's).

    ``c`` starts at the target's logit and is raised to the running max whenever that max
    passes ``c + FACTORED_SHIFT_LIMIT``; the entries already written are then rescaled by
    ``e^{c_old - c_new}``.  So every written entry is at most ``e^{FACTORED_SHIFT_LIMIT}``,
    and a row whose target is within that many nats of its max is read once.  Returns pass
    1's ``(m, r, t, argmax)`` and the final ``c``."""
    cols = tl.arange(0, BLOCK)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    r = tl.zeros([ROWS], dtype=tl.float32)
    t = tl.zeros([ROWS], dtype=tl.float32)
    arg = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        bcols = start + cols
        col_ok = bcols < V
        io_mask = row_ok[:, None] & col_ok[None, :]
        z0 = tl.load(row_ptrs[:, None] + bcols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        z = z0
        if HAS_SOFTCAP:
            z = softcap * _tanh(z0 / softcap)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        bm, r_b, t_b, b_arg, e = _block_stats(z, start, NEEDS_ENTROPY, WITH_STATS)
        m, r, t, arg = _merge(m, r, t, arg, bm, r_b, t_b, b_arg, NEEDS_ENTROPY, WITH_STATS)
        need = valid & (bm > c + FACTORED_SHIFT_LIMIT)  # the running max was within the limit before
        c_new = tl.where(need, bm, c)
        # e^{z - c} without a second exponential per entry: e^{z - bm} e^{bm - c}
        shift = tl.where(valid & (bm > float("-inf")), tl.exp2((bm - c_new) * LOG2E), 0.0)
        out = e * shift[:, None]
        if HAS_SOFTCAP:
            out = out * _sech2(z0 / softcap)
        out = tl.where(valid[:, None], out, 0.0)
        # the target's entry too (whole vector stores); the kernel overwrites it after a barrier
        tl.store(grad_row_ptrs[:, None] + bcols[None, :], out.to(grad_row_ptrs.dtype.element_ty), mask=io_mask)
        # after the block's store, so that none of its registers stays live across this branch
        if tl.max(need.to(tl.int32), axis=0) > 0:
            # rare: the max ran away from the target; c moved up to it: rescale the blocks before
            factor = tl.where(need, tl.exp2((c - bm) * LOG2E), 1.0)
            tl.debug_barrier()  # the blocks are reread by whichever thread the load's layout picks
            for s in range(0, start, BLOCK):
                pcols = s + cols
                pmask = need[:, None] & (pcols < V)[None, :]
                old = tl.load(grad_row_ptrs[:, None] + pcols[None, :], mask=pmask, other=0.0).to(tl.float32)
                tl.store(grad_row_ptrs[:, None] + pcols[None, :],
                         (old * factor[:, None]).to(grad_row_ptrs.dtype.element_ty), mask=pmask)
        c = c_new
    return m, r, t, arg, c


@_device_fn
def _load_targets(target_ptr, rows, row_ok, V, ignore_index):
    """``(y, valid)`` of ``rows``: a row is valid when its target is a class (not ``ignore_index``,
    inside ``[0, V)``); ``y`` is 0 at invalid rows, so that it is always a safe column offset."""
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index) & (y >= 0) & (y < V)
    return tl.where(valid, y, 0), valid


@_device_fn
def _grad_scale(scale_ptr, rows, row_ok, SCALE_PER_ROW: tl.constexpr):
    """The incoming gradient scale of each row: a per-row tensor or one 0-d tensor (no host sync)."""
    if SCALE_PER_ROW:
        return tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return tl.load(scale_ptr).to(tl.float32) + tl.zeros(rows.shape, dtype=tl.float32)


@_device_fn
def _row_epilogue(m, r, t, zsum, arg, z_y, y, valid, rows, row_ok, V, eps, lam, param0, param1,
                  weights_ptr, loss_ptr, nll_ptr, prob_ptr, entropy_ptr, correct_ptr,
                  OBJECTIVE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                  HAS_WEIGHTS: tl.constexpr, NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr):
    """From a row's merged pass-1 statistics and its target logit ``z_y``: ``lse``, ``logp``, the
    objective's loss and ``w = -g`` (module docstring), the per-token outputs stored, and the
    row weight (validity times token weight).  Returns ``(lse, logp, w, row_weight)``."""
    log1p_r = _log1p(r)
    lse = m + log1p_r
    logp = (z_y - m) - log1p_r
    p = tl.exp2(logp * LOG2E)
    entropy = tl.zeros_like(logp)
    if NEEDS_ENTROPY:
        entropy = log1p_r + t / (1.0 + r)

    # objective loss and w = -g = -dL/dlogp
    if OBJECTIVE == OBJ_CE:
        w = tl.zeros_like(logp) + 1.0  # not 1 + 0 * logp: nan at a -inf target logit
        loss = -logp
    elif OBJECTIVE == OBJ_DFT:
        w = tl.maximum(p, param0)
        loss = -w * logp
    elif OBJECTIVE == OBJ_POWER:
        w = tl.exp2(param0 * logp * LOG2E)
        loss = -w * logp
    elif OBJECTIVE == OBJ_FOCAL:
        q = -_expm1(logp)  # 1 - p without cancellation
        qg = _pow(q, param0)
        loss = -qg * logp
        second = param0 * _pow(q, param0 - 1.0) * p * logp
        # at q == 0 the second term is inf * 0; its limit is 0 (logp ~ -q)
        w = qg - tl.where((q > 0.0) & (param0 != 0.0), second, 0.0)
    elif OBJECTIVE == OBJ_CHORD:
        w = p * (-_expm1(logp))
        loss = -w * logp
    elif OBJECTIVE == OBJ_PROB:
        pk = tl.exp2(param0 * logp * LOG2E)
        loss = -pk
        w = param0 * pk
    elif OBJECTIVE == OBJ_ENTROPY:
        w = param0 * tl.exp2(-entropy * LOG2E)
        loss = -w * logp
    else:  # OBJ_EAFT: w = (H / normalizer)^alpha, the exact entropy (top-k is declined by supports)
        w = _pow(entropy / param1, param0)
        loss = -w * logp
    if HAS_SMOOTHING:
        loss = (1.0 - eps) * loss + eps * w * (lse - zsum / V)
    if HAS_ZLOSS:
        loss += lam * lse * lse

    row_weight = valid.to(tl.float32)
    if HAS_WEIGHTS:
        row_weight = row_weight * tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, loss * row_weight, 0.0), mask=row_ok)
    tl.store(nll_ptr + rows, tl.where(valid, -logp, 0.0), mask=row_ok)
    tl.store(prob_ptr + rows, tl.where(valid, p, 0.0), mask=row_ok)
    if NEEDS_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=row_ok)
    if WITH_STATS:
        tl.store(correct_ptr + rows, tl.where(valid & (arg == y), 1.0, 0.0), mask=row_ok)

    return lse, logp, w, row_weight


@triton.jit
def _row_loss_grad_kernel(
    logits_ptr, stride_row, grad_ptr, stride_grad, n_rows, target_ptr, weights_ptr, scale_ptr,
    loss_ptr, nll_ptr, prob_ptr, entropy_ptr, correct_ptr, row_scale_ptr,
    V, ignore_index, softcap, eps, lam, param0, param1,
    OBJECTIVE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_GRAD: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr, NEEDS_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr,
    FACTORED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Loss, stats and (``HAS_GRAD``) the scaled gradient of ``ROWS`` logits rows, stored once at
    ``grad_ptr`` (rows ``stride_grad`` apart, in its element type; ``logits_ptr`` itself for in place).

    ``L = (1 - eps) L_obj(logp, H) + eps w (lse - mean z) + lam lse^2`` and
    ``dL/dz0 = ((w + 2 lam lse) softmax - w (1 - eps) onehot - w eps / V) sech^2(z0 / softcap)``
    times ``token_weight * grad_scale`` (module docstring for pass 1 and the objectives).
    ``ROWS`` is 1 on GPUs (one program per row); the interpreter takes several rows per
    program, since its cost is per op, not per element.

    ``FACTORED`` (with ``HAS_GRAD``; no smoothing, no z-loss) reads the row once: the gradient
    is stored as ``row_scale * G~`` with ``G~_j = e^{z_j - c} sech^2`` for ``j != y`` written
    during pass 1 (:func:`_row_stats_factored`), and, once ``lse`` is known,
    ``G~_y = expm1(logp) e^{lse - c} sech^2_y`` and ``row_scale = scale w e^{c - lse}``, so
    that ``row_scale * G~`` is exactly the gradient above (``a = b = w``, ``c = 0``).
    """
    # Offsets past int32: the row offsets ``rows * stride_row`` and ``rows * stride_grad`` (each comes in as an
    # int32 whenever it fits) exceeds 2^31 elements as soon as N * V does, so ``rows`` is int64
    # and so is every row pointer and ``row_ptrs + y``.  Column offsets ``start + cols`` stay
    # int32: they are below V + BLOCK, which ``row_loss_grad`` keeps under 2^31 (MAX_VOCAB).
    # Per-row vectors are indexed by the int64 ``rows``.  Tested past 2^31 in tests/test_scale.py.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    grad_row_ptrs = grad_ptr + rows * stride_grad
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)

    z0_y = tl.load(row_ptrs + y, mask=row_ok, other=0.0).to(tl.float32)
    z_y = z0_y
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z0_y / softcap)

    # ---- pass 1: online max / r / t / sum z / argmax (FACTORED: and the gradient, unscaled) ----
    if FACTORED:
        zsum = tl.zeros([ROWS], dtype=tl.float32)
        m, r, t, arg, shift_c = _row_stats_factored(row_ptrs, grad_row_ptrs, row_ok, valid, y, z_y, V, softcap,
                                                    HAS_SOFTCAP, NEEDS_ENTROPY, WITH_STATS, ROWS, BLOCK)
    else:
        m, r, t, zsum, arg = _row_stats(row_ptrs, row_ok, V, softcap, HAS_SOFTCAP, HAS_SMOOTHING, NEEDS_ENTROPY,
                                        WITH_STATS, ROWS, BLOCK)
    lse, logp, w, row_weight = _row_epilogue(
        m, r, t, zsum, arg, z_y, y, valid, rows, row_ok, V, eps, lam, param0, param1,
        weights_ptr, loss_ptr, nll_ptr, prob_ptr, entropy_ptr, correct_ptr,
        OBJECTIVE, HAS_SMOOTHING, HAS_ZLOSS, HAS_WEIGHTS, NEEDS_ENTROPY, WITH_STATS)

    # ---- pass 2: the scaled gradient, written once ----
    if HAS_GRAD:
        scale = _grad_scale(scale_ptr, rows, row_ok, SCALE_PER_ROW) * row_weight
    if FACTORED:
        # the row's factor; where it would be below FACTORED_MIN_SCALE, c moves up to the max m (the
        # factor becomes scale w / (1 + r), the two-pass kernel's own scale) and the entries written
        # in pass 1 are rescaled by e^{c - m}
        low = valid & (tl.abs(scale * w * tl.exp2((shift_c - lse) * LOG2E)) < FACTORED_MIN_SCALE) & (shift_c < m)
        if tl.max(low.to(tl.int32), axis=0) > 0:
            factor = tl.where(low, tl.exp2((shift_c - m) * LOG2E), 1.0)
            tl.debug_barrier()  # the blocks are reread by whichever thread the load's layout picks
            cols = tl.arange(0, BLOCK)
            for s in range(0, V, BLOCK):
                pcols = s + cols
                pmask = low[:, None] & (pcols < V)[None, :]
                old = tl.load(grad_row_ptrs[:, None] + pcols[None, :], mask=pmask, other=0.0).to(tl.float32)
                tl.store(grad_row_ptrs[:, None] + pcols[None, :],
                         (old * factor[:, None]).to(grad_ptr.dtype.element_ty), mask=pmask)
            shift_c = tl.where(low, m, shift_c)
        # the target entry and the row's factor; every other entry was written in pass 1
        target_g = _expm1(logp) * tl.exp2((lse - shift_c) * LOG2E)
        if HAS_SOFTCAP:
            target_g = target_g * _sech2(z0_y / softcap)
        # another thread stored this entry in pass 1: order the two stores (bar.sync orders the
        # block's global memory accesses)
        tl.debug_barrier()
        tl.store(grad_row_ptrs + y, target_g.to(grad_ptr.dtype.element_ty), mask=valid)
        row_scale = tl.where(valid, scale * w * tl.exp2((shift_c - lse) * LOG2E), 0.0)
        tl.store(row_scale_ptr + rows, row_scale, mask=row_ok)
    elif HAS_GRAD:
        # grad = a softmax - b onehot - c with a = w + 2 lam lse, b = w (1 - eps), c = w eps / V;
        # the target entry a p - b - c is summed as a expm1(logp) + 2 lam lse + w eps (1 - 1/V):
        # no cancellation when p ~ 1, nor between a, b and c
        coef_a = w
        target_grad = w * _expm1(logp)
        if HAS_ZLOSS:
            coef_a = w + 2.0 * lam * lse
            target_grad = coef_a * _expm1(logp) + 2.0 * lam * lse
        coef_c = 0.0 * w
        if HAS_SMOOTHING:
            coef_c = w * (eps / V)
            target_grad += w * (eps * (1.0 - 1.0 / V))
        inv_s = 1.0 / (1.0 + r)
        y32 = y.to(tl.int32)  # a column (below V): compared with the int32 columns, not widened to int64
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            bcols = start + cols
            ptrs = row_ptrs[:, None] + bcols[None, :]
            io_mask = row_ok[:, None] & (bcols < V)[None, :]
            z0 = tl.load(ptrs, mask=io_mask, other=0.0).to(tl.float32)
            z = z0
            if HAS_SOFTCAP:
                z = softcap * _tanh(z0 / softcap)
            softmax = tl.exp2((z - m[:, None]) * LOG2E) * inv_s[:, None]
            grad = tl.where(bcols[None, :] == y32[:, None], target_grad[:, None],
                            coef_a[:, None] * softmax - coef_c[:, None])
            if HAS_SOFTCAP:
                grad = grad * _sech2(z0 / softcap)
            grad = tl.where(valid[:, None], grad * scale[:, None], 0.0)
            tl.store(grad_row_ptrs[:, None] + bcols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=io_mask)


def _autotune_configs():
    return [triton.Config({"BLOCK": block}, num_warps=warps)
            for block in (1024, 2048, 4096, 8192, 16384) for warps in (4, 8, 16, 32)
            if warps * 32 * 4 <= block * 2]


# Autotuning runs the kernel several times on the same row: restore the in-place logits.
_row_loss_grad_kernel_autotuned = triton.autotune(
    configs=_autotune_configs(),
    key=["V", "OBJECTIVE", "HAS_SOFTCAP", "HAS_GRAD", "NEEDS_ENTROPY", "WITH_STATS", "FACTORED"],
    restore_value=["logits_ptr"],
)(_row_loss_grad_kernel)


def _interpreting() -> bool:
    # triton.jit returns an interpreter-backed function when TRITON_INTERPRET=1 was set at
    # decoration time, i.e. before this module was imported.
    return type(_row_loss_grad_kernel).__name__ == "InterpretedFunction"


def block_config(vocab_size: int, options: bool = False) -> tuple[int, int, int]:
    """``(ROWS, BLOCK, num_warps)``.  On GPUs: one row per program, BLOCK the next power of
    two of V capped at ``MAX_BLOCK`` (at half of it with ``options``: a softcap, label smoothing
    or a z-loss), warps growing with the block.  Under the interpreter: wide blocks and several
    rows per program (its cost is per op, not per element).

    On GPUs a thread holds 8 entries of a block up to 16 warps (16 entries of an 8192 block),
    and launches cap it at ``MAX_REGISTERS`` = 64 registers (Triton's ``maxnreg``: two 16-warp
    programs per SM at least, two 8192-column blocks in flight).  Left to itself, ptxas (CUDA
    12.8 - 13, Triton 3.6 - 3.9) squeezes a kernel that needs a few registers more than an
    occupancy step (32, 40, 64 at 512 threads) down to the step and spills; with ``maxnreg`` it
    does not.  16 entries a thread fit in 64 registers without options, stats, token weights
    and the factored launch included, but not with a softcap (tanh and sech^2 per entry) nor
    with smoothing and z-loss: those launches take 4096-column blocks, 8 entries a thread.
    Checked for sm_90 and sm_80 under each of those Triton versions: no spill, no local memory
    (tests/backends/test_triton_codegen.py, ``make codegen-stacks``)."""
    if _interpreting():
        block = min(triton.next_power_of_2(max(vocab_size, 16)), MAX_BLOCK_INTERPRETER)
        return max(1, min(64, INTERPRETER_ELEMENTS // block)), block, 1
    block = min(triton.next_power_of_2(max(vocab_size, 16)), MAX_BLOCK // 2 if options else MAX_BLOCK)
    return 1, block, max(4, min(16, block // 256))


def is_available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu":
        if _interpreting():
            return True, ""
        return False, ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                       "in the environment before importing dft_kernels (slow; meant for tests)")
    return False, f"Triton kernels run on CUDA tensors, not on {device.type}"


_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)



def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (what the kernel's scalar argument holds), and 0
    below float32's smallest normal number, as flush-to-zero arithmetic takes it: such a smoothing,
    z-loss or parameter moves a float32 result by less than that number (with a label smoothing of 1e-38
    the interpreter wrote an all-zero bfloat16 gradient; tests/test_fuzz.py, FOUND)."""
    rounded = float(torch.tensor(float(value), dtype=torch.float32))
    return 0.0 if abs(rounded) < _FLOAT32_TINY else rounded


_FLOAT32_TINY = torch.finfo(torch.float32).tiny

def row_loss_grad(logits: Tensor, target: Tensor, params: LossParams,
                  token_weights: Optional[Tensor] = None,
                  grad_scale: Optional[Tensor] = None, grad_out: Optional[Tensor] = None) -> RowOutputs:
    """The contract's row kernel (``dft_kernels.backends``): two reads of each row."""
    return _launch(logits, target, params, token_weights, grad_scale, grad_out, None)


def supports(path: str, params: LossParams) -> str:
    """"" where this backend runs ``path`` for ``params`` (the contract's paths), else why not: the
    factored gradient has no label smoothing or z-loss, whose gradients have terms that are not a
    multiple of the softmax; no path weights by a top-k entropy (``EAFT(top_k=k)``)."""
    if path in ("logprobs", "distill"):
        return ""
    if path not in ("rows", "factored", "anchor"):
        return f"the triton backend has no {path!r} path"
    reason = "" if params is None else top_k_reason(params.objective)
    if reason or path in ("rows", "anchor"):
        return reason
    if _as_float32(params.label_smoothing) != 0.0 or _as_float32(params.z_loss) != 0.0:
        return "label smoothing and z-loss have gradient terms that are not a multiple of the softmax"
    return ""


def row_loss_grad_factored(logits: Tensor, target: Tensor, params: LossParams, token_weights: Optional[Tensor],
                           grad_scale: Tensor, grad_out: Optional[Tensor], row_scale: Tensor) -> Optional[RowOutputs]:
    """The contract's gradient in one read of the logits, as a per-row factor times a matrix:
    ``row_scale[:, None] * grad_out`` (or ``* logits`` with ``grad_out`` None: in place) is the
    gradient :func:`row_loss_grad` writes.  ``row_scale`` is a float32 ``[n]`` tensor this
    fills (0 at invalid rows, whose rows are written as zeros).  ValueError where :func:`supports`
    says no."""
    reason = supports("factored", params)
    if reason:
        raise ValueError(f"params: no factored gradient: {reason}")
    if row_scale.dtype != torch.float32 or row_scale.shape != (logits.shape[0],) or not row_scale.is_contiguous():
        raise ValueError(f"row_scale must be a contiguous float32 tensor of shape ({logits.shape[0]},), got "
                         f"{row_scale.dtype} {tuple(row_scale.shape)}")
    if row_scale.device != logits.device:
        raise ValueError(f"row_scale must be on {logits.device} like logits, got {row_scale.device}")
    return _launch(logits, target, params, token_weights, grad_scale, grad_out, row_scale)


def _launch(logits: Tensor, target: Tensor, params: LossParams, token_weights: Optional[Tensor],
            grad_scale: Optional[Tensor], grad_out: Optional[Tensor], row_scale: Optional[Tensor]) -> RowOutputs:
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"logits: the triton backend takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    # a stride along V of size 1 is never used (torch calls such a tensor contiguous whatever it is)
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"logits must be a [n, V] tensor with unit stride along V, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    n, vocab = logits.shape
    if vocab > MAX_VOCAB:
        raise ValueError(f"logits: the triton backend takes rows of at most {MAX_VOCAB} entries, got V = {vocab}")
    reason = top_k_reason(params.objective)
    if reason:
        raise ValueError(f"params: the triton backend does not run this objective: {reason}")
    dev = logits.device
    f32 = torch.float32
    loss = torch.empty(n, dtype=f32, device=dev)
    nll = torch.empty(n, dtype=f32, device=dev)
    prob = torch.empty(n, dtype=f32, device=dev)
    entropy = torch.empty(n, dtype=f32, device=dev) if params.needs_entropy else None
    correct = torch.empty(n, dtype=f32, device=dev) if params.with_stats else None
    if n == 0:
        return RowOutputs(loss, nll, prob, entropy, correct)

    target = target.contiguous()
    if token_weights is not None:
        token_weights = token_weights.to(f32).contiguous()
    per_row = False
    if grad_scale is None or grad_out is None:
        grad_out = logits
    else:
        check_grad_out(grad_out, logits, _SUPPORTED_DTYPES)
    if grad_scale is not None:
        grad_scale = grad_scale.to(f32).contiguous()
        per_row = grad_scale.dim() == 1
    obj = params.objective.resolve(vocab)
    p0, p1 = obj.kernel_params
    cap = params.softcap
    # The kernel's scalars are float32: round them here and take the flags from the rounded
    # values, so that a smoothing or z-loss below float32's range is off, not a "non-zero" 0.
    eps, lam = _as_float32(params.label_smoothing), _as_float32(params.z_loss)
    # a placeholder pointer for absent optional tensors (never read: its flag is off)
    dummy = loss
    args = (
        logits, logits.stride(0), grad_out, grad_out.stride(0), n, target,
        dummy if token_weights is None else token_weights,
        dummy if grad_scale is None else grad_scale,
        loss, nll, prob,
        dummy if entropy is None else entropy,
        dummy if correct is None else correct,
        dummy if row_scale is None else row_scale,
        vocab, params.ignore_index, 1.0 if cap is None else float(cap),
        eps, lam, _as_float32(p0), _as_float32(p1),
    )
    flags = dict(
        OBJECTIVE=obj.kernel_id, HAS_SOFTCAP=cap is not None, HAS_SMOOTHING=eps != 0.0,
        HAS_ZLOSS=lam != 0.0, HAS_WEIGHTS=token_weights is not None, HAS_GRAD=grad_scale is not None,
        SCALE_PER_ROW=per_row, NEEDS_ENTROPY=params.needs_entropy, WITH_STATS=params.with_stats,
        FACTORED=row_scale is not None and grad_scale is not None,
    )
    # Triton launches on the current CUDA device: make it the logits' one
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if params.autotune and not _interpreting():
            _row_loss_grad_kernel_autotuned[(n,)](*args, **flags, ROWS=1)
        else:
            rows, block, warps = block_config(vocab, options=cap is not None or eps != 0.0 or lam != 0.0)
            # the factored launch with a softcap also holds the rare rescale of its row factor
            # (FACTORED_MIN_SCALE): ptxas 12.8 (Triton 3.6) spilled it within 64 registers
            regs = MAX_REGISTERS_FACTORED_SOFTCAP if flags["FACTORED"] and cap is not None else MAX_REGISTERS
            _row_loss_grad_kernel[(triton.cdiv(n, rows),)](*args, **flags, ROWS=rows, BLOCK=block,
                                                           num_warps=warps, maxnreg=regs)
    return RowOutputs(loss, nll, prob, entropy, correct)


# ---------------------------------------------------------------- the log-prob family (docs/rl.md)
#
# For a row with ``z = softcap * tanh(z0 / softcap) / T`` (no cap without ``softcap``), ``T`` the row's
# temperature, the forward kernel makes one online pass (pass 1 above, plus ``s2 = sum e^{2 (z - m)}``)::
#
#     lse = m + log1p(r),  logp = (z_y - m) - log1p(r),  gap = t / (1 + r),  H = log1p(r) + gap,
#     sum_sq = s2 / (1 + r)^2
#
# and keeps ``(m, log1p(r), gap)`` per row; the gradient kernel reads them back and the row once::
#
#     dz0_j = -pi_j (a + c ((z_j - m) + gap)) / T * sech^2(z0_j / softcap),   pi_j = e^{(z_j - m) - log1p(r)}
#     dz0_y = (-a expm1(logp) - c p ((z_y - m) + gap)) / T * sech^2(z0_y / softcap)
#
# (``(z_j - m) + gap = log pi_j + H``: no cancellation at the max, nor in ``1 - p``).


@_device_fn
def _row_temperature(temp_ptr, rows, row_ok, valid, temperature, PER_ROW_TEMP: tl.constexpr):
    """Each row's temperature: the per-row tensor's, or the scalar; 1 at invalid rows."""
    if PER_ROW_TEMP:
        t = tl.load(temp_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    else:
        t = tl.zeros(rows.shape, dtype=tl.float32) + temperature
    return tl.where(valid, t, 1.0)


@triton.jit
def _row_logprobs_kernel(
    logits_ptr, stride_row, n_rows, target_ptr, temp_ptr,
    logp_ptr, entropy_ptr, sum_sq_ptr, top1_ptr, stats_ptr,
    V, ignore_index, softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, PER_ROW_TEMP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """``logp`` (and ``entropy``, ``sum_sq``, ``top1``) of ``ROWS`` rows in one online pass, and the
    row statistics ``(m, log1p(r), gap)`` at ``stats_ptr + 3 * row`` (the block comment above)."""
    # int64 rows: ``rows * stride_row`` passes 2^31 as soon as N * V does (see _row_loss_grad_kernel)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    temp = _row_temperature(temp_ptr, rows, row_ok, valid, temperature, PER_ROW_TEMP)

    z_y = tl.load(row_ptrs + y, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    z_y = z_y / temp

    cols = tl.arange(0, BLOCK)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    r = tl.zeros([ROWS], dtype=tl.float32)
    t = tl.zeros([ROWS], dtype=tl.float32)
    s2 = tl.zeros([ROWS], dtype=tl.float32)
    arg = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        z, _ = _load_block(row_ptrs, row_ok, start + cols, V, softcap, HAS_SOFTCAP)
        z = z / temp[:, None]
        bm, r_b, t_b, b_arg, e = _block_stats(z, start, WITH_ENTROPY, WITH_STATS)
        if WITH_STATS:  # s2 rescales by the square of _merge's factor
            a = tl.exp2(-tl.abs(m - bm) * LOG2E)
            a2 = tl.where(a > 0.0, a * a, 0.0)  # 0 (not nan) where a side has no mass
            s2_b = tl.sum(e * e, axis=1)
            s2 = tl.where(bm > m, s2_b + a2 * s2, s2 + a2 * s2_b)
        m, r, t, arg = _merge(m, r, t, arg, bm, r_b, t_b, b_arg, WITH_ENTROPY, WITH_STATS)

    log1p_r = _log1p(r)
    logp = (z_y - m) - log1p_r
    gap = tl.zeros_like(r)
    if WITH_ENTROPY:
        gap = t / (1.0 + r)
        tl.store(entropy_ptr + rows, tl.where(valid, log1p_r + gap, 0.0), mask=row_ok)
    if WITH_STATS:
        tl.store(sum_sq_ptr + rows, tl.where(valid, s2 / ((1.0 + r) * (1.0 + r)), 0.0), mask=row_ok)
        tl.store(top1_ptr + rows, (valid & (arg == y)).to(tl.int8), mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, logp, 0.0), mask=row_ok)
    tl.store(stats_ptr + 3 * rows, m, mask=row_ok)
    tl.store(stats_ptr + 3 * rows + 1, log1p_r, mask=row_ok)
    tl.store(stats_ptr + 3 * rows + 2, gap, mask=row_ok)


@triton.jit
def _row_logprobs_grad_kernel(
    logits_ptr, stride_row, grad_ptr, stride_grad, n_rows, target_ptr, temp_ptr, stats_ptr, grad_logp_ptr,
    grad_entropy_ptr, V, ignore_index, softcap, temperature,
    HAS_SOFTCAP: tl.constexpr, PER_ROW_TEMP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """The logits gradient of ``a logp + c H`` for ``ROWS`` rows, in one read of each row, from the
    forward's ``(m, log1p(r), gap)``; stored once at ``grad_ptr`` in its element type (rows
    ``stride_grad`` apart; ``logits_ptr`` itself for in place), zero rows at invalid rows."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    grad_row_ptrs = grad_ptr + rows * stride_grad
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    temp = _row_temperature(temp_ptr, rows, row_ok, valid, temperature, PER_ROW_TEMP)
    m = tl.load(stats_ptr + 3 * rows, mask=row_ok, other=0.0).to(tl.float32)
    log1p_r = tl.load(stats_ptr + 3 * rows + 1, mask=row_ok, other=0.0).to(tl.float32)
    gap = tl.load(stats_ptr + 3 * rows + 2, mask=row_ok, other=0.0).to(tl.float32)
    a = tl.zeros([ROWS], dtype=tl.float32)
    c = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_GRAD_LOGP:
        a = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_GRAD_ENTROPY:
        c = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    z0_y = tl.load(row_ptrs + y, mask=row_ok, other=0.0).to(tl.float32)
    z_y = z0_y
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z0_y / softcap)
    d_y = z_y / temp - m
    logp = d_y - log1p_r
    target_grad = -a * _expm1(logp)
    if HAS_GRAD_ENTROPY:
        target_grad -= c * tl.exp2(logp * LOG2E) * (d_y + gap)
    inv_t = tl.where(valid, 1.0 / temp, 0.0)  # the chain factor 1/T, and 0 at invalid rows

    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        bcols = start + cols
        io_mask = row_ok[:, None] & (bcols < V)[None, :]
        z0 = tl.load(row_ptrs[:, None] + bcols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        z = z0
        if HAS_SOFTCAP:
            z = softcap * _tanh(z0 / softcap)
        d = z / temp[:, None] - m[:, None]
        pi = tl.exp2((d - log1p_r[:, None]) * LOG2E)
        coef = a[:, None] + tl.zeros_like(d)
        if HAS_GRAD_ENTROPY:
            coef += c[:, None] * (d + gap[:, None])
        grad = tl.where(pi > 0.0, -pi * coef, 0.0)  # -inf logits: 0, not 0 * inf
        grad = tl.where(bcols[None, :] == y[:, None], target_grad[:, None], grad) * inv_t[:, None]
        if HAS_SOFTCAP:
            grad = grad * _sech2(z0 / softcap)
        grad = tl.where(valid[:, None], grad, 0.0)
        tl.store(grad_row_ptrs[:, None] + bcols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=io_mask)


def _check_logits(logits: Tensor) -> None:
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"logits: the triton backend takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [n, V] tensor with unit stride along V, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    if logits.shape[1] > MAX_VOCAB:
        raise ValueError(f"logits: the triton backend takes rows of at most {MAX_VOCAB} entries, got "
                         f"V = {logits.shape[1]}")


def _launch_rows(kernel, n: int, vocab: int, device, args, flags) -> None:
    """Launch a row kernel over ``n`` rows with :func:`block_config`'s shape (the softcap's smaller
    block) and register cap, on ``device``."""
    rows, block, warps = block_config(vocab, options=flags["HAS_SOFTCAP"])
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(triton.cdiv(n, rows),)](*args, **flags, ROWS=rows, BLOCK=block, num_warps=warps,
                                        maxnreg=MAX_REGISTERS)


def _temperature_args(params, temperature: Optional[Tensor], fallback: Tensor) -> tuple:
    """``(pointer, scalar, per_row)`` of the kernels' temperature arguments."""
    if temperature is None:
        return fallback, _as_float32(params.temperature), False
    return temperature.to(torch.float32).contiguous(), 1.0, True


def row_logprobs(logits: Tensor, target: Tensor, params, temperature: Optional[Tensor] = None):
    """The contract's ``row_logprobs`` (``dft_kernels.backends``): one online read of each row."""
    _check_logits(logits)
    n, vocab = logits.shape
    dev, f32 = logits.device, torch.float32
    logp = torch.empty(n, dtype=f32, device=dev)
    entropy = torch.empty(n, dtype=f32, device=dev) if params.with_entropy else None
    sum_sq = torch.empty(n, dtype=f32, device=dev) if params.with_stats else None
    top1 = torch.empty(n, dtype=torch.bool, device=dev) if params.with_stats else None
    row_stats = torch.empty((n, 3), dtype=f32, device=dev)
    if n == 0:
        return LogprobRowOutputs(logp, entropy, sum_sq, top1, row_stats)
    temp_ptr, temp, per_row = _temperature_args(params, temperature, logp)
    cap = params.softcap
    args = (logits, logits.stride(0), n, target.contiguous(), temp_ptr, logp,
            logp if entropy is None else entropy, logp if sum_sq is None else sum_sq,
            logp if top1 is None else top1.view(torch.int8), row_stats,
            vocab, params.ignore_index, 1.0 if cap is None else float(cap), temp)
    flags = dict(HAS_SOFTCAP=cap is not None, PER_ROW_TEMP=per_row, WITH_ENTROPY=params.with_entropy,
                 WITH_STATS=params.with_stats)
    _launch_rows(_row_logprobs_kernel, n, vocab, dev, args, flags)
    return LogprobRowOutputs(logp, entropy, sum_sq, top1, row_stats)


def row_logprobs_grad(logits: Tensor, target: Tensor, params, row_stats: Tensor, grad_logp: Optional[Tensor],
                      grad_entropy: Optional[Tensor], temperature: Optional[Tensor] = None,
                      grad_out: Optional[Tensor] = None) -> None:
    """The contract's ``row_logprobs_grad``: the gradient written in one read of each row."""
    _check_logits(logits)
    n, vocab = logits.shape
    if grad_out is None:
        grad_out = logits
    else:
        check_grad_out(grad_out, logits, _SUPPORTED_DTYPES)
    if n == 0:
        return
    f32 = torch.float32
    as_f32 = lambda t: None if t is None else t.to(f32).contiguous()  # noqa: E731
    row_stats, grad_logp, grad_entropy = as_f32(row_stats), as_f32(grad_logp), as_f32(grad_entropy)
    temp_ptr, temp, per_row = _temperature_args(params, temperature, row_stats)
    cap = params.softcap
    args = (logits, logits.stride(0), grad_out, grad_out.stride(0), n, target.contiguous(), temp_ptr, row_stats,
            row_stats if grad_logp is None else grad_logp, row_stats if grad_entropy is None else grad_entropy,
            vocab, params.ignore_index, 1.0 if cap is None else float(cap), temp)
    flags = dict(HAS_SOFTCAP=cap is not None, PER_ROW_TEMP=per_row, HAS_GRAD_LOGP=grad_logp is not None,
                 HAS_GRAD_ENTROPY=grad_entropy is not None)
    _launch_rows(_row_logprobs_grad_kernel, n, vocab, logits.device, args, flags)


# ---------------------------------------------------------------- two heads (docs/design.md, Two heads)
#
# The anchor (``row_anchor_loss_grad``) and distillation (``row_distill_loss_grad``) read a second, frozen
# head's row beside each row of the trained head.  With ``z = cap(z0) / T`` (trained) and ``zr`` likewise
# (second head), ``ls = z - lse``, ``lt = zr - lse_r``, pass 1 keeps, online over both rows in float32::
#
#     m, s = sum_j e^{z_j - m};  m_r, s_r = sum_j e^{zr_j - m_r}
#     MODE 0 (KL(second || trained)):  a = sum_j e^{zr_j - m_r} (zr_j - z_j),  KL = a / s_r + lse - lse_r
#     MODE 1 (KL(trained || second)):  a = sum_j e^{z_j - m} (z_j - zr_j),     KL = a / s + lse_r - lse
#     MODE 2 (generalized JSD):        a second read once lse, lse_r are known, with
#                                      log m = logaddexp(ls + log(1 - b), lt + log b):
#                                      kl_s = sum_j e^{ls_j} (ls_j - log m_j),  kl_t = sum_j e^{lt_j} (lt_j - log m_j)
#
# and the gradient kernel writes, in one more read of both rows, ``coef * g_j * sech^2(z0_j / cap)`` with
# ``g = pi - q`` (MODE 0), ``pi (ls - lt - KL)`` (MODE 1), ``pi (ls - log m - kl_s)`` (MODE 2), added to a
# gradient already there (the anchor's objective, ``ACCUMULATE``) or alone (distillation).  ``coef`` is
# per row (weights, the incoming scale, ``kl_coef``, ``1 - beta``, ``1/T``), 0 at invalid rows.

PAIR_FORWARD, PAIR_REVERSE, PAIR_JSD = 0, 1, 2


@_device_fn
def _pair_block(ptrs, io_mask, col_ok, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """A ``[ROWS, BLOCK]`` block of ``cap(z0) / T`` in float32 (``-inf`` past V) and the raw ``z0``."""
    z0 = tl.load(ptrs, mask=io_mask, other=0.0).to(tl.float32)
    z = z0
    if HAS_SOFTCAP:
        z = softcap * _tanh(z0 / softcap)
    return tl.where(col_ok[None, :], z * inv_temp, float("-inf")), z0


@_device_fn
def _online(m, s, acc, z, other, WITH_ACC: tl.constexpr):
    """Merge a block into ``(m, s = sum e^{z - m}, acc = sum e^{z - m} (z - other))``."""
    new_m = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(new_m == float("-inf"), 0.0, new_m)
    keep = tl.where(m == float("-inf"), 0.0, tl.exp2((m - shift) * LOG2E))
    e = tl.exp2((z - shift[:, None]) * LOG2E)
    s = s * keep + tl.sum(e, axis=1)
    if WITH_ACC:
        acc = acc * keep + tl.sum(tl.where(e > 0.0, e * (z - other), 0.0), axis=1)
    return new_m, s, acc


@_device_fn
def _log_mix(ls, lt, log1mb, logb):
    """``log((1 - b) e^{ls} + b e^{lt})``, elementwise."""
    a = ls + log1mb
    b = lt + logb
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + _log1p(tl.exp2((lo - hi) * LOG2E))


@triton.jit
def _pair_stats_kernel(
    logits_ptr, stride_row, ref_ptr, stride_ref, n_rows, target_ptr, stats_ptr, logp_ptr,
    V, ignore_index, softcap, inv_temp, log1mb, logb,
    HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row ``(lse, lse_r, KL or kl_s, kl_t)`` at ``stats_ptr + 4 * row`` and the trained head's
    ``logp`` of the target (0 at invalid rows, as the divergences)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    ref_ptrs = ref_ptr + rows * stride_ref
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    cols = tl.arange(0, BLOCK)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    m_r = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    s_r = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS], dtype=tl.float32)
    acc_r = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        bcols = start + cols
        col_ok = bcols < V
        io_mask = row_ok[:, None] & col_ok[None, :]
        z, _ = _pair_block(row_ptrs[:, None] + bcols[None, :], io_mask, col_ok, softcap, inv_temp, HAS_SOFTCAP)
        zr, _ = _pair_block(ref_ptrs[:, None] + bcols[None, :], io_mask, col_ok, softcap, inv_temp, HAS_SOFTCAP)
        m, s, acc = _online(m, s, acc, z, zr, MODE == 1)
        m_r, s_r, acc_r = _online(m_r, s_r, acc_r, zr, z, MODE == 0)
    lse = m + tl.log(s)
    lse_r = m_r + tl.log(s_r)
    kl_t = tl.zeros([ROWS], dtype=tl.float32)
    if MODE == 0:
        kl = acc_r / s_r + (lse - lse_r)
    elif MODE == 1:
        kl = acc / s + (lse_r - lse)
    else:
        kl = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            bcols = start + cols
            col_ok = bcols < V
            io_mask = row_ok[:, None] & col_ok[None, :]
            z, _ = _pair_block(row_ptrs[:, None] + bcols[None, :], io_mask, col_ok, softcap, inv_temp, HAS_SOFTCAP)
            zr, _ = _pair_block(ref_ptrs[:, None] + bcols[None, :], io_mask, col_ok, softcap, inv_temp,
                                HAS_SOFTCAP)
            ls = z - lse[:, None]
            lt = zr - lse_r[:, None]
            lm = _log_mix(ls, lt, log1mb, logb)
            ps = tl.exp2(ls * LOG2E)
            pt = tl.exp2(lt * LOG2E)
            kl += tl.sum(tl.where(ps > 0.0, ps * (ls - lm), 0.0), axis=1)
            kl_t += tl.sum(tl.where(pt > 0.0, pt * (lt - lm), 0.0), axis=1)
    z_y = tl.load(row_ptrs + y, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    tl.store(stats_ptr + 4 * rows, lse, mask=row_ok)
    tl.store(stats_ptr + 4 * rows + 1, lse_r, mask=row_ok)
    tl.store(stats_ptr + 4 * rows + 2, tl.where(valid, kl, 0.0), mask=row_ok)
    tl.store(stats_ptr + 4 * rows + 3, tl.where(valid, kl_t, 0.0), mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, z_y * inv_temp - lse, 0.0), mask=row_ok)


@triton.jit
def _pair_grad_kernel(
    logits_ptr, stride_row, ref_ptr, stride_ref, src_ptr, stride_src, dst_ptr, stride_dst, n_rows, target_ptr,
    stats_ptr, coef_ptr, V, ignore_index, softcap, inv_temp, log1mb, logb,
    HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr, ACCUMULATE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dst = (src +) coef * g * sech^2`` per row (the block comment above); zero rows at invalid rows
    (``src``'s, which are zero, with ``ACCUMULATE``).  ``dst`` may be the logits themselves."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    ref_ptrs = ref_ptr + rows * stride_ref
    y, valid = _load_targets(target_ptr, rows, row_ok, V, ignore_index)
    lse = tl.load(stats_ptr + 4 * rows, mask=row_ok, other=0.0)
    lse_r = tl.load(stats_ptr + 4 * rows + 1, mask=row_ok, other=0.0)
    kl = tl.load(stats_ptr + 4 * rows + 2, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        bcols = start + cols
        col_ok = bcols < V
        io_mask = row_ok[:, None] & col_ok[None, :]
        z, z0 = _pair_block(row_ptrs[:, None] + bcols[None, :], io_mask, col_ok, softcap, inv_temp, HAS_SOFTCAP)
        zr, _ = _pair_block(ref_ptrs[:, None] + bcols[None, :], io_mask, col_ok, softcap, inv_temp, HAS_SOFTCAP)
        ls = z - lse[:, None]
        lt = zr - lse_r[:, None]
        pi = tl.exp2(ls * LOG2E)
        if MODE == 0:
            g = pi - tl.exp2(lt * LOG2E)
        elif MODE == 1:
            g = tl.where(pi > 0.0, pi * ((ls - lt) - kl[:, None]), 0.0)
        else:
            g = tl.where(pi > 0.0, pi * ((ls - _log_mix(ls, lt, log1mb, logb)) - kl[:, None]), 0.0)
        g = g * coef[:, None]
        if HAS_SOFTCAP:
            g = g * _sech2(z0 / softcap)
        g = tl.where(valid[:, None], g, 0.0)
        if ACCUMULATE:
            g += tl.load(src_ptr + rows[:, None] * stride_src + bcols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        tl.store(dst_ptr + rows[:, None] * stride_dst + bcols[None, :], g.to(dst_ptr.dtype.element_ty), mask=io_mask)


def _launch_pair(kernel, n: int, vocab: int, device, args, flags) -> None:
    """Launch a two-head kernel over ``n`` rows: ``block_config``'s shape with the options' halved block
    (two rows' blocks live at once), halved again with a softcap at the same warps (its tanh and
    sech^2 of both rows): 8 entries of each row a thread at most, 4 with a softcap, so that ptxas holds
    them in ``MAX_REGISTERS`` without spilling (tests/backends/test_pair_codegen.py)."""
    rows, block, warps = block_config(vocab, options=True)
    if flags["HAS_SOFTCAP"] and not _interpreting() and block > 512:
        block //= 2
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(triton.cdiv(n, rows),)](*args, **flags, ROWS=rows, BLOCK=block, num_warps=warps,
                                        maxnreg=MAX_REGISTERS)


def _check_pair(logits: Tensor, ref_logits: Tensor) -> None:
    _check_logits(logits)
    if ref_logits.shape != logits.shape or ref_logits.dtype != logits.dtype or ref_logits.stride(1) != 1:
        raise ValueError(f"ref_logits must have the logits' shape {tuple(logits.shape)} and dtype {logits.dtype} "
                         f"with unit stride along V, got {tuple(ref_logits.shape)}, {ref_logits.dtype}, strides "
                         f"{ref_logits.stride()}")


def _pair_stats(logits, ref_logits, target, ignore_index, softcap, inv_temp, mode, beta=0.5):
    n, vocab = logits.shape
    stats = torch.zeros((n, 4), dtype=torch.float32, device=logits.device)
    logp = torch.zeros(n, dtype=torch.float32, device=logits.device)
    log1mb, logb = (float(torch.tensor(-beta).log1p()), float(torch.tensor(beta).log())) if mode == PAIR_JSD else (
        0.0, 0.0)
    if n:
        args = (logits, logits.stride(0), ref_logits, ref_logits.stride(0), n, target.contiguous(), stats, logp,
                vocab, ignore_index, 1.0 if softcap is None else float(softcap), inv_temp, log1mb, logb)
        _launch_pair(_pair_stats_kernel, n, vocab, logits.device, args,
                     dict(HAS_SOFTCAP=softcap is not None, MODE=mode))
    return stats, logp, (log1mb, logb)


def _pair_grad(logits, ref_logits, target, ignore_index, softcap, inv_temp, mode, logs, stats, coef, src, dst):
    n, vocab = logits.shape
    if n == 0:
        return
    accumulate = src is not None
    src = dst if src is None else src
    args = (logits, logits.stride(0), ref_logits, ref_logits.stride(0), src, src.stride(0), dst, dst.stride(0), n,
            target.contiguous(), stats, coef.to(torch.float32).contiguous(), vocab, ignore_index,
            1.0 if softcap is None else float(softcap), inv_temp, *logs)
    _launch_pair(_pair_grad_kernel, n, vocab, logits.device, args,
                 dict(HAS_SOFTCAP=softcap is not None, MODE=mode, ACCUMULATE=accumulate))


def _row_weights(target, token_weights, ignore_index, vocab):
    """``(valid, weight)`` per row: the token weight (1 without), 0 at invalid rows."""
    valid = (target != ignore_index) & (target >= 0) & (target < vocab)
    w = valid.to(torch.float32)
    return valid, w if token_weights is None else torch.where(valid, token_weights.to(torch.float32), 0.0)


def row_anchor_loss_grad(logits: Tensor, ref_logits: Tensor, target: Tensor, params: LossParams,
                         token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                         grad_out: Optional[Tensor] = None) -> RowOutputs:
    """The contract's ``row_anchor_loss_grad``: the objective's row kernel (:func:`row_loss_grad`) into a
    float32 gradient, and the KL's statistics (one online read of both rows) and gradient (one more
    read of both, added to the objective's and written once where it goes)."""
    _check_pair(logits, ref_logits)
    n, vocab = logits.shape
    mode = PAIR_FORWARD if params.kl == "forward" else PAIR_REVERSE
    stats, _, logs = _pair_stats(logits, ref_logits, target, params.ignore_index, params.softcap, 1.0, mode)
    valid, w = _row_weights(target, token_weights, params.ignore_index, vocab)
    kl_loss = _as_float32(params.kl_coef) * w * stats[:, 2]
    if grad_scale is None:
        out = row_loss_grad(logits, target, params, token_weights)
        return out._replace(loss=out.loss + kl_loss)
    if grad_out is not None:
        check_grad_out(grad_out, logits, _SUPPORTED_DTYPES)
    dst = logits if grad_out is None else grad_out
    work = dst if dst.dtype == torch.float32 and dst is not logits else torch.empty(
        (n, vocab), dtype=torch.float32, device=logits.device)
    out = row_loss_grad(logits, target, params, token_weights, grad_scale, grad_out=work)
    coef = _as_float32(params.kl_coef) * w * grad_scale.to(torch.float32)
    _pair_grad(logits, ref_logits, target, params.ignore_index, params.softcap, 1.0, mode, logs, stats, coef, work,
               dst)
    return out._replace(loss=out.loss + kl_loss)


def row_distill_loss_grad(logits: Tensor, ref_logits: Tensor, target: Tensor, params,
                          token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                          grad_out: Optional[Tensor] = None) -> RowOutputs:
    """The contract's ``row_distill_loss_grad``: the divergence's statistics in one online read of both
    rows (two for ``0 < beta < 1``) and the gradient in one more, written once."""
    _check_pair(logits, ref_logits)
    n, vocab = logits.shape
    beta = params.beta
    mode = PAIR_FORWARD if beta == 0.0 else PAIR_REVERSE if beta == 1.0 else PAIR_JSD
    inv_temp = _as_float32(1.0 / params.temperature)
    stats, logp, logs = _pair_stats(logits, ref_logits, target, params.ignore_index, None, inv_temp, mode, beta)
    valid, w = _row_weights(target, token_weights, params.ignore_index, vocab)
    per_row = stats[:, 2] if mode != PAIR_JSD else beta * stats[:, 3] + (1.0 - beta) * stats[:, 2]
    if grad_scale is not None:
        if grad_out is not None:
            check_grad_out(grad_out, logits, _SUPPORTED_DTYPES)
        dst = logits if grad_out is None else grad_out
        coef = w * grad_scale.to(torch.float32) * (inv_temp * (1.0 - beta if mode == PAIR_JSD else 1.0))
        _pair_grad(logits, ref_logits, target, params.ignore_index, None, inv_temp, mode, logs, stats, coef, None,
                   dst)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    return RowOutputs(loss=per_row * w, nll=-logp, prob=torch.where(valid, logp.exp(), zero), entropy=None,
                      correct=None)
