"""The chunked loss: chunk loop, GEMMs, fp32 dW accumulation (docs/design.md, Data path).

For each chunk of ``C`` token rows::

    logits = x_c @ W^T (+ b)                       # [C, V] float32 (see HeadGemms)
    backend row kernel                              # loss, stats; logits <- dL/dlogits (scaled)
    dx_c   = dlogits @ W                            # written into dx[chunk]
    dW    += dlogits^T @ x_c ;  db += sum(dlogits)  # accumulated in ``accum_dtype``

so at most one chunk of logits (which becomes its own gradient, in place) exists at
a time.  For ``mean``/``sum`` the gradients are computed in forward and scaled by
``grad_output`` in backward; for ``none`` forward only computes per-token losses
and backward recomputes the chunks with the per-token ``grad_output`` folded in.

One driver, :func:`run_chunks`, serves both paths: :class:`LinearChunks` makes each chunk's
logits with the GEMMs of :mod:`dft_kernels.gemm_policy` and takes their gradient back;
:class:`GivenChunks` slices logits the caller already has.  These are plain functions of
tensors and :class:`~dft_kernels.options.LossOptions`; ``dft_kernels.ops`` registers them
as torch custom ops with autograd (so ``torch.compile`` sees one opaque op per call, with
no graph break and no host sync inside).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .gemm_policy import HeadGemms
from .options import LossOptions
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


class _Accumulators:
    """Running sums of the per-token outputs over valid tokens, in ``dtype`` (:func:`wide_dtype`)."""

    def __init__(self, device, dtype: torch.dtype, with_stats: bool, with_entropy: bool):
        z = lambda: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
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

    def stats_outputs(self, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # distinct empty tensors: custom op outputs must not alias one another
        if not self.with_stats:
            return tuple(torch.empty(0, device=device) for _ in range(4))
        ent = self.entropy if self.entropy is not None else torch.empty(0, device=device)
        return self.nll, self.prob, self.correct, ent


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the losses, sums and scales for inputs of ``dtype``: float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def stash_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which gradients computed in forward wait for backward.  float16 ones stay
    float32 until ``grad_output`` (e.g. a GradScaler's loss scale) is applied, so small
    gradients do not underflow; other dtypes have float32's range and are cast at once."""
    return torch.float32 if dtype == torch.float16 else dtype


class LinearChunks:
    """Chunk logits computed as ``x @ W^T (+ b)``; their gradients go to ``dx``, ``dw``, ``db``
    (allocated only where wanted: ``dx`` in :func:`stash_dtype`, ``dw``/``db`` in ``accum_dtype``)."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], accum_dtype: torch.dtype,
                 need_dx: bool, need_dw: bool, need_db: bool):
        self.x, self.num_rows, self.gemms = x, x.shape[0], HeadGemms(x, weight, bias)
        self.dx = torch.empty(x.shape, dtype=stash_dtype(x.dtype), device=x.device) if need_dx else None
        self.dw = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if need_dw else None
        need_db = need_db and bias is not None
        self.db = torch.zeros(bias.shape, dtype=accum_dtype, device=bias.device) if need_db else None
        self.wants_grad = need_dx or need_dw or need_db

    def rows(self, start: int, end: int) -> Tensor:
        return self.gemms.logits(self.x[start:end])

    def backward(self, dlogits: Tensor, start: int, end: int) -> None:
        dx_c = None if self.dx is None else self.dx[start:end]
        self.gemms.backward(dlogits, self.x[start:end], dx_c, self.dw, self.db)


class GivenChunks:
    """Chunks of given ``[N, V]`` logits.  With ``need_grad`` each chunk is first copied into the
    gradient buffer ``grad`` (in :func:`stash_dtype`), which the row kernel then overwrites in
    place: the caller's logits are never modified."""

    def __init__(self, logits: Tensor, need_grad: bool):
        self.logits, self.num_rows, self.wants_grad = logits, logits.shape[0], need_grad
        self.grad = None
        if need_grad:
            self.grad = torch.empty(logits.shape, dtype=stash_dtype(logits.dtype), device=logits.device)

    def rows(self, start: int, end: int) -> Tensor:
        rows = self.logits[start:end]
        return rows if self.grad is None else self.grad[start:end].copy_(rows)

    def backward(self, dlogits: Tensor, start: int, end: int) -> None:
        pass  # dlogits already is grad[start:end]


def run_chunks(chunks, target: Tensor, token_weights: Optional[Tensor], params: LossParams, backend,
               chunk_size: int, grad_scale: Optional[Tensor], per_token: Optional[Tensor] = None,
               acc: Optional[_Accumulators] = None) -> None:
    """One pass of the row kernel over ``chunks`` (:class:`LinearChunks` or :class:`GivenChunks`).

    ``grad_scale`` None (or chunks that want no gradient) means forward only; a 1-D
    ``grad_scale`` is per token and is sliced per chunk.  ``per_token`` (if given) receives
    each chunk's loss vector; ``acc`` the running sums.
    """
    if not chunks.wants_grad:
        grad_scale = None
    for start in range(0, chunks.num_rows, chunk_size):
        end = min(start + chunk_size, chunks.num_rows)
        rows = chunks.rows(start, end)
        scale = grad_scale[start:end] if grad_scale is not None and grad_scale.dim() == 1 else grad_scale
        tw = None if token_weights is None else token_weights[start:end]
        out = backend.row_loss_grad(rows, target[start:end], params, tw, scale)
        if acc is not None:
            acc.add(out)
        if per_token is not None:
            per_token[start:end] = out.loss
        if grad_scale is not None:
            chunks.backward(rows, start, end)
        del rows, out


def _forward(chunks, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
             opts: LossOptions, backend, device, out_dtype: torch.dtype):
    """The loss (0-d, or ``[N]`` for ``none``) and the stats outputs; for ``mean``/``sum`` the
    chunks also receive the gradients for ``grad_output = 1``."""
    params = opts.row_params
    acc = _Accumulators(device, out_dtype, params.with_stats, params.needs_entropy)
    if opts.reduction == "none":
        per_token = torch.empty(chunks.num_rows, dtype=out_dtype, device=device)
        run_chunks(chunks, target, token_weights, params, backend, opts.chunk_size, None, per_token, acc)
        return per_token, acc.stats_outputs(device)
    grad_scale = torch.ones((), dtype=out_dtype, device=device)
    if divisor is not None:
        grad_scale = grad_scale / divisor
    run_chunks(chunks, target, token_weights, params, backend, opts.chunk_size, grad_scale, acc=acc)
    return (acc.loss * grad_scale).to(out_dtype), acc.stats_outputs(device)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   token_weights: Optional[Tensor], divisor: Optional[Tensor], opts: LossOptions, backend,
                   need_dx: bool, need_dw: bool, need_db: bool):
    """Forward of the chunked loss.  Inputs are already flattened and checked by
    :mod:`dft_kernels.functional`: ``x`` ``[N, H]`` contiguous, ``target`` ``[N]`` int64,
    ``token_weights`` ``[N]`` and ``divisor`` a 0-d tensor in :func:`wide_dtype` (or None; (``mean``:
    the valid count, or ``num_items_in_batch``) or None (``sum``/``none``).

    Returns ``(loss, dx, dw, db, stats)``: the loss (0-d, or ``[N]`` for ``none``); for
    ``mean``/``sum`` the gradients for ``grad_output = 1`` in :func:`stash_dtype` (None
    where not needed, and always None for ``none``, whose backward recomputes); the
    stats sums (nll, prob, correct, entropy: 0-d, or empty when not computed).
    """
    grads = opts.reduction != "none"
    chunks = LinearChunks(x, weight, bias, opts.accum_dtype, grads and need_dx, grads and need_dw,
                          grads and need_db)
    loss, stats = _forward(chunks, target, token_weights, divisor, opts, backend, x.device, wide_dtype(x.dtype))
    # one cast of the accumulators to the parameter dtype, at the end
    dw = _cast(chunks.dw, stash_dtype(weight.dtype))
    db = _cast(chunks.db, stash_dtype(weight.dtype if bias is None else bias.dtype))
    return loss, chunks.dx, dw, db, stats


def linear_backward_none(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         token_weights: Optional[Tensor], grad_loss: Tensor, opts: LossOptions, backend,
                         need_dx: bool, need_dw: bool, need_db: bool):
    """Backward of ``reduction="none"``: recompute each chunk with the per-token
    ``grad_loss`` folded into the row kernel's scale.  Returns ``(dx, dw, db)`` in the
    dtypes of ``x``, ``weight``, ``bias`` (None where not needed)."""
    chunks = LinearChunks(x, weight, bias, opts.accum_dtype, need_dx, need_dw, need_db)
    run_chunks(chunks, target, token_weights, opts.row_params, backend, opts.chunk_size,
               grad_loss.to(wide_dtype(x.dtype)).contiguous())
    db = _cast(chunks.db, weight.dtype if bias is None else bias.dtype)
    return _cast(chunks.dx, x.dtype), _cast(chunks.dw, weight.dtype), db


def logits_forward(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
                   opts: LossOptions, backend, need_grad: bool):
    """The same row kernel on given ``[N, V]`` logits.  Returns ``(loss, grad, stats)`` with
    ``grad`` the logits gradient for ``grad_output = 1`` (``mean``/``sum`` with
    ``need_grad``; else None) in :func:`stash_dtype`."""
    chunks = GivenChunks(logits, need_grad and opts.reduction != "none")
    loss, stats = _forward(chunks, target, token_weights, divisor, opts, backend, logits.device,
                           wide_dtype(logits.dtype))
    return loss, chunks.grad, stats


def logits_backward_none(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], grad_loss: Tensor,
                         opts: LossOptions, backend) -> Tensor:
    """Backward of ``reduction="none"`` on given logits; the gradient in the logits dtype."""
    chunks = GivenChunks(logits, True)
    run_chunks(chunks, target, token_weights, opts.row_params, backend, opts.chunk_size,
               grad_loss.to(wide_dtype(logits.dtype)).contiguous())
    return chunks.grad.to(logits.dtype)
