"""The chunked linear + loss autograd Function (docs/design.md, Data path).

For each chunk of ``C`` token rows::

    logits = x_c @ W^T (+ b)                       # [C, V] float32 (see HeadGemms)
    backend row kernel                              # loss, stats; logits <- dL/dlogits (scaled)
    dx_c   = dlogits @ W                            # written into dx[chunk]
    dW    += dlogits^T @ x_c ;  db += sum(dlogits)  # accumulated in ``accum_dtype``

so at most one chunk of logits (which becomes its own gradient, in place) exists at
a time.  For ``mean``/``sum`` the gradients are computed in forward and scaled by
``grad_output`` in backward; for ``none`` forward only computes per-token losses
and backward recomputes the chunks with the per-token ``grad_output`` folded in.

These are plain functions of tensors and :class:`LossParams`; ``dft_kernels.ops``
registers them as torch custom ops with autograd (so ``torch.compile`` sees one opaque
op per call, with no graph break and no host sync inside).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .backends import valid_rows
from .params import LossParams

DEFAULT_CHUNK_BYTES = 1 << 30
CHUNK_BYTES_ENV = "DFT_KERNELS_CHUNK_BYTES"


def chunk_bytes_budget() -> int:
    raw = os.environ.get(CHUNK_BYTES_ENV)
    if raw is None or raw == "":
        return DEFAULT_CHUNK_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{CHUNK_BYTES_ENV} must be a positive integer number of bytes, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{CHUNK_BYTES_ENV} must be a positive integer number of bytes, got {raw!r}")
    return value


def default_chunk_size(num_tokens: int, vocab_size: int, element_size: int,
                       budget: Optional[int] = None) -> int:
    """Largest power of two whose ``[C, V]`` logits fit the byte budget, at most ``num_tokens``
    rounded up to a power of two, and at least 1."""
    budget = chunk_bytes_budget() if budget is None else budget
    rows = max(1, budget // max(1, vocab_size * element_size))
    chunk = 1 << (rows.bit_length() - 1)
    cap = 1 << max(0, (max(1, num_tokens) - 1).bit_length())
    return max(1, min(chunk, cap))


_OUT_DTYPE_MM: dict[str, bool] = {}


def _mm_out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` runs for 16-bit operands on this device
    (cuBLAS: yes on recent torch; CPU: no).  Probed once per device type."""
    dev = device.type
    if dev not in _OUT_DTYPE_MM:
        ok = False
        if dev == "cuda":
            try:
                a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_MM[dev] = ok
    return _OUT_DTYPE_MM[dev]


class HeadGemms:
    """The three GEMMs of a chunk, with the precision policy of ``docs/api.md``:

    * logits are computed in float32 (float64 for float64 inputs) even for 16-bit
      inputs: rounding logits to bfloat16 alone costs ~1% relative error on DFT-type
      losses, which a fused kernel must not add;
    * on CUDA the 16-bit GEMMs write float32 directly (``out_dtype``) and the gradient
      is cast back to the input dtype for the ``dX``/``dW`` GEMMs; elsewhere the weight
      is upcast once per call and every GEMM runs in float32;
    * ``dW``/``db`` accumulate in ``accum_dtype``.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        self.x_dtype = x.dtype
        self.logits_dtype = torch.promote_types(x.dtype, torch.float32)
        self.weight, self.bias = weight, bias
        self.native = x.dtype == self.logits_dtype
        self.out_dtype_mm = not self.native and _mm_out_dtype_supported(x.device)
        up = not self.native and not self.out_dtype_mm
        self.w_up = weight.to(self.logits_dtype) if up else None
        self.b_up = None if bias is None or bias.dtype == self.logits_dtype else bias.to(self.logits_dtype)

    def logits(self, x_c: Tensor) -> Tensor:
        bias = self.bias if self.b_up is None else self.b_up
        if self.native:
            w = self.weight
        elif self.out_dtype_mm:
            out = torch.mm(x_c, self.weight.t(), out_dtype=self.logits_dtype)
            return out if bias is None else out.add_(bias)
        else:
            x_c, w = x_c.to(self.logits_dtype), self.w_up
        return x_c @ w.t() if bias is None else torch.addmm(bias, x_c, w.t())

    def backward(self, dlogits: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                 db: Optional[Tensor]) -> None:
        """``dx_c = dlogits @ W``; ``dw += dlogits^T x_c``; ``db += sum(dlogits)``."""
        if db is not None:
            db += dlogits.sum(dim=0, dtype=db.dtype)
        if self.native:
            g, w, xc = dlogits, self.weight, x_c
        elif self.out_dtype_mm:
            g, w, xc = dlogits.to(self.x_dtype), self.weight, x_c
        else:
            g, w, xc = dlogits, self.w_up, x_c.to(self.logits_dtype)
        if dx_c is not None:
            if g.dtype == dx_c.dtype:
                torch.mm(g, w, out=dx_c)
            else:
                dx_c.copy_(g @ w)
        if dw is not None:
            _addmm_acc(dw, g.t(), xc)


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``; ``acc`` may be wider than ``a``/``b`` (fp32 accumulation of bf16)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _mm_out_dtype_supported(acc.device):
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.add_(a.to(acc.dtype) @ b.to(acc.dtype))


class _Accumulators:
    """float32 running sums of the per-token outputs over valid tokens."""

    def __init__(self, device, with_stats: bool, with_entropy: bool):
        z = lambda: torch.zeros((), dtype=torch.float32, device=device)  # noqa: E731
        self.loss = z()
        self.with_stats = with_stats
        if with_stats:
            self.nll, self.prob, self.correct = z(), z(), z()
            self.entropy = z() if with_entropy else None

    def add(self, out) -> None:
        self.loss += out.loss.sum()
        if self.with_stats:
            self.nll += out.nll.sum()
            self.prob += out.prob.sum()
            self.correct += out.correct.sum()
            if self.entropy is not None:
                self.entropy += out.entropy.sum()


def _row_chunk(rows: Tensor, start: int, end: int, target: Tensor, token_weights: Optional[Tensor],
               params: LossParams, backend, grad_scale: Optional[Tensor], per_token: Optional[Tensor],
               acc: Optional[_Accumulators]) -> None:
    """The row kernel on rows ``[start, end)`` (``rows`` is that chunk): slices the per-token
    inputs, and collects the per-token loss and the stats sums."""
    scale = grad_scale
    if grad_scale is not None and grad_scale.dim() == 1:
        scale = grad_scale[start:end]
    tw = None if token_weights is None else token_weights[start:end]
    out = backend.row_loss_grad(rows, target[start:end], params, tw, scale)
    if acc is not None:
        acc.add(out)
    if per_token is not None:
        per_token[start:end] = out.loss


def run_chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
               token_weights: Optional[Tensor], params: LossParams, backend, chunk_size: int,
               grad_scale: Optional[Tensor], need_dx: bool, need_dw: bool, need_db: bool,
               accum_dtype: torch.dtype, per_token: Optional[Tensor] = None,
               acc: Optional[_Accumulators] = None):
    """One pass over the token chunks.  Returns ``(dx, dw_acc, db_acc)`` (None where not needed).

    ``grad_scale`` None means forward only.  A 1-D ``grad_scale`` is per token and is
    sliced per chunk.  ``per_token`` (if given) receives each chunk's loss vector.
    """
    n = x.shape[0]
    with_grad = grad_scale is not None and (need_dx or need_dw or need_db)
    dx = torch.empty(x.shape, dtype=stash_dtype(x.dtype), device=x.device) if with_grad and need_dx else None
    dw = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if with_grad and need_dw else None
    db = torch.zeros(bias.shape, dtype=accum_dtype, device=bias.device) if with_grad and need_db else None
    gemms = HeadGemms(x, weight, bias)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        x_c = x[start:end]
        logits = gemms.logits(x_c)
        _row_chunk(logits, start, end, target, token_weights, params, backend,
                   grad_scale if with_grad else None, per_token, acc)
        if with_grad:
            gemms.backward(logits, x_c, None if dx is None else dx[start:end], dw, db)
        del logits
    return dx, dw, db


def stash_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which gradients computed in forward wait for backward.  float16 ones stay
    float32 until ``grad_output`` (e.g. a GradScaler's loss scale) is applied, so small
    gradients do not underflow; other dtypes have float32's range and are cast at once."""
    return torch.float32 if dtype == torch.float16 else dtype


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   token_weights: Optional[Tensor], divisor: Optional[Tensor], params: LossParams, backend,
                   chunk_size: int, accum_dtype: torch.dtype, reduction: str, need_dx: bool, need_dw: bool,
                   need_db: bool):
    """Forward of the chunked loss.  Inputs are already flattened and checked by
    :mod:`dft_kernels.functional`: ``x`` ``[N, H]`` contiguous, ``target`` ``[N]`` int64,
    ``token_weights`` ``[N]`` float32 or None, ``divisor`` a float32 0-d tensor (``mean``:
    the valid count, or ``num_items_in_batch``) or None (``sum``/``none``).

    Returns ``(loss, dx, dw, db, stats)``: the loss (0-d, or ``[N]`` for ``none``); for
    ``mean``/``sum`` the gradients for ``grad_output = 1`` in :func:`stash_dtype` (None
    where not needed, and always None for ``none``, whose backward recomputes); the
    stats sums (nll, prob, correct, entropy: 0-d, or empty when not computed).
    """
    need_db = need_db and bias is not None
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    acc = _Accumulators(x.device, params.with_stats, params.needs_entropy)
    dx = dw = db = None
    if reduction == "none":
        per_token = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        run_chunks(x, weight, bias, target, token_weights, params, backend, chunk_size,
                   None, False, False, False, accum_dtype, per_token=per_token, acc=acc)
        loss = per_token.to(out_dtype)
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=x.device)
        if divisor is not None:
            grad_scale = grad_scale / divisor
        dx, dw, db = run_chunks(x, weight, bias, target, token_weights, params, backend, chunk_size,
                                grad_scale, need_dx, need_dw, need_db, accum_dtype, acc=acc)
        # one cast of the accumulators to the parameter dtype, at the end
        dw = None if dw is None else dw.to(stash_dtype(weight.dtype))
        db = None if db is None else db.to(stash_dtype(bias.dtype))
        loss = (acc.loss * grad_scale).to(out_dtype)
    return loss, dx, dw, db, _stats_outputs(acc, x.device)


def linear_backward_none(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         token_weights: Optional[Tensor], grad_loss: Tensor, params: LossParams, backend,
                         chunk_size: int, accum_dtype: torch.dtype, need_dx: bool, need_dw: bool,
                         need_db: bool):
    """Backward of ``reduction="none"``: recompute each chunk with the per-token
    ``grad_loss`` folded into the row kernel's scale.  Returns ``(dx, dw, db)`` in the
    dtypes of ``x``, ``weight``, ``bias`` (None where not needed)."""
    need_db = need_db and bias is not None
    dx, dw, db = run_chunks(x, weight, bias, target, token_weights, params, backend, chunk_size,
                            grad_loss.to(torch.float32).contiguous(), need_dx, need_dw, need_db, accum_dtype)
    dx = None if dx is None else dx.to(x.dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dx, dw, db


def _stats_outputs(acc: _Accumulators, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # distinct empty tensors: custom op outputs must not alias one another
    if not acc.with_stats:
        return tuple(torch.empty(0, device=device) for _ in range(4))
    ent = acc.entropy if acc.entropy is not None else torch.empty(0, device=device)
    return acc.nll, acc.prob, acc.correct, ent


def count_valid(target: Tensor, ignore_index: int, vocab_size: int) -> Tensor:
    """Number of valid tokens as a float32 0-d device tensor (no host sync)."""
    return valid_rows(target, ignore_index, vocab_size).sum(dtype=torch.float32)


def run_logit_chunks(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], params: LossParams,
                     backend, chunk_size: int, grad_scale: Optional[Tensor],
                     per_token: Optional[Tensor] = None, acc: Optional[_Accumulators] = None) -> Optional[Tensor]:
    """Row kernel over given logits, chunk by chunk.  Returns dL/dlogits when ``grad_scale`` is set.

    The caller's logits are never modified: each chunk is copied into the gradient buffer,
    which the kernel then overwrites in place.
    """
    grad = None
    if grad_scale is not None:
        grad = torch.empty(logits.shape, dtype=stash_dtype(logits.dtype), device=logits.device)
    for start in range(0, logits.shape[0], chunk_size):
        end = min(start + chunk_size, logits.shape[0])
        rows = logits[start:end]
        if grad is not None:
            rows = grad[start:end].copy_(rows)  # the kernel overwrites the copy, never the caller's logits
        _row_chunk(rows, start, end, target, token_weights, params, backend, grad_scale, per_token, acc)
    return grad


def logits_forward(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
                   params: LossParams, backend, chunk_size: int, reduction: str, need_grad: bool):
    """The same row kernel on given ``[N, V]`` logits.  Returns ``(loss, grad, stats)`` with
    ``grad`` the logits gradient for ``grad_output = 1`` (``mean``/``sum`` with
    ``need_grad``; else None) in :func:`stash_dtype`."""
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    acc = _Accumulators(logits.device, params.with_stats, params.needs_entropy)
    grad = None
    if reduction == "none":
        per_token = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        run_logit_chunks(logits, target, token_weights, params, backend, chunk_size, None,
                         per_token=per_token, acc=acc)
        loss = per_token.to(out_dtype)
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
        if divisor is not None:
            grad_scale = grad_scale / divisor
        grad = run_logit_chunks(logits, target, token_weights, params, backend, chunk_size,
                                grad_scale if need_grad else None, acc=acc)
        loss = (acc.loss * grad_scale).to(out_dtype)
    return loss, grad, _stats_outputs(acc, logits.device)


def logits_backward_none(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], grad_loss: Tensor,
                         params: LossParams, backend, chunk_size: int) -> Tensor:
    """Backward of ``reduction="none"`` on given logits; the gradient in the logits dtype."""
    grad = run_logit_chunks(logits, target, token_weights, params, backend, chunk_size,
                            grad_loss.to(torch.float32).contiguous())
    return grad.to(logits.dtype)
