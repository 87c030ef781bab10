"""The chunked loss: chunk loop, GEMMs, fp32 dW accumulation (docs/design.md, Data path).

For each chunk of ``C`` token rows::

    logits = x_c @ W^T (+ b)                       # into the one [C, V] logits buffer (see HeadGemms)
    backend row kernel                              # loss, stats; the gradient, written once
    dx_c   = dlogits @ W                            # written into dx[chunk]
    dW    (+)= dlogits^T @ x_c ;  db += sum(dlogits) # in place in ``accum_dtype`` (first chunk writes)

The logits buffer (and, where the GEMMs read the gradient in another dtype, one gradient
buffer in that dtype, which the row kernel writes directly) is allocated once per call and
reused by every chunk, so at most one chunk of logits exists at a time and no ``[V, H]``
temporary is made.  For ``mean``/``sum`` the gradients are computed in forward and scaled
by ``grad_output`` in backward; for ``none`` forward only computes per-token losses and
backward recomputes the chunks with the per-token ``grad_output`` folded in.

One driver, :func:`run_chunks`, serves both paths: :class:`LinearChunks` makes each chunk's
logits with the GEMMs of :mod:`dft_kernels.gemm_policy` and takes their gradient back;
:class:`GivenChunks` reads logits the caller already has and writes their gradient into
its own buffer.  These are plain functions of tensors and
:class:`~dft_kernels.options.LossOptions`; ``dft_kernels.ops`` registers them as torch custom
ops with autograd (so ``torch.compile`` sees one opaque op per call, with no graph break).

Where the backend has ``row_loss_grad_factored`` (triton) and the options allow, the row kernel
reads each logits row once and writes the gradient as ``row_scale[:, None] * G~``; the
GEMMs then apply ``row_scale`` on chunk-sized operands (:meth:`HeadGemms._backward_factored
<dft_kernels.gemm_policy.HeadGemms._backward_factored>`; docs/design.md, Data path).
``DFT_KERNELS_FACTORED=0`` turns that off.

``DFT_KERNELS_OVERLAP=1`` runs the row kernel of chunk ``k`` on a second CUDA stream,
overlapped with the GEMMs of chunk ``k + 1`` (two logits buffers then); off by default, and
a no-op off CUDA.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from .backends import valid_rows
from .gemm_policy import HeadGemms
from .options import LossOptions
from .params import LossParams

CHUNK_BYTES_ENV = "DFT_KERNELS_CHUNK_BYTES"
OVERLAP_ENV = "DFT_KERNELS_OVERLAP"
FACTORED_ENV = "DFT_KERNELS_FACTORED"
FUSED_GEMM_ENV = "DFT_KERNELS_FUSED_GEMM"
# Bytes of chunk buffers (logits, plus the gradient buffer where it has its own dtype) per
# device type: on a GPU large enough chunks keep the GEMMs compute-bound (2048 rows at
# V = 128256 for 16-bit inputs: 1.5 GiB); on CPU chunks only bound memory.
CHUNK_BYTES = {"cuda": 3 << 29, "cpu": 1 << 28}
DEFAULT_CHUNK_BYTES = 1 << 30  # other device types
CHUNK_ROWS_MULTIPLE = 256  # GEMM tile friendly, without the halving a power of two can cost
FUSED_SLOT = "fused"  # the chunk buffers of a fused head (no logits buffer)


def chunk_bytes_budget(device_type: str = "cuda") -> int:
    """The byte budget of the chunk buffers: ``DFT_KERNELS_CHUNK_BYTES``, else :data:`CHUNK_BYTES`."""
    raw = os.environ.get(CHUNK_BYTES_ENV)
    if raw is None or raw == "":
        return CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{CHUNK_BYTES_ENV} must be a positive integer number of bytes, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{CHUNK_BYTES_ENV} must be a positive integer number of bytes, got {raw!r}")
    return value


def default_chunk_size(num_tokens: int, vocab_size: int, row_element_bytes: int,
                       budget: Optional[int] = None, device_type: str = "cuda") -> int:
    """Rows per chunk: the most rows whose chunk buffers (``row_element_bytes`` per logit:
    the logits buffer plus any separate gradient buffer) fit the byte budget, rounded down to
    a multiple of 256 (fewer rows only when not even 256 fit), and no more than the tokens
    need: ``num_tokens`` rounded up to a multiple of 256 (a power of two below 256), so
    that small batches keep small chunks while the chunk sizes, which enter the compiled
    graph, stay few."""
    budget = chunk_bytes_budget(device_type) if budget is None else budget
    rows = max(1, budget // max(1, vocab_size * row_element_bytes))
    chunk = rows - rows % CHUNK_ROWS_MULTIPLE if rows >= CHUNK_ROWS_MULTIPLE else rows
    n = max(1, num_tokens)
    cap = (1 << (n - 1).bit_length()) if n < CHUNK_ROWS_MULTIPLE else -(-n // CHUNK_ROWS_MULTIPLE) * CHUNK_ROWS_MULTIPLE
    return max(1, min(chunk, cap))


def chunk_row_bytes(x_dtype: torch.dtype, logits_dtype: Optional[torch.dtype], device: torch.device) -> int:
    """Bytes per logit of the chunk buffers of :class:`LinearChunks` (its logits buffer and, where
    the GEMMs read the gradient in another dtype, its gradient buffer)."""
    gemms = HeadGemms.dtypes(x_dtype, logits_dtype, device)
    logits_bytes = gemms[0].itemsize
    return logits_bytes + (gemms[1].itemsize if gemms[1] != gemms[0] else 0)


def overlap_enabled() -> bool:
    return os.environ.get(OVERLAP_ENV, "") not in ("", "0")


def fused_gemm_enabled() -> bool:
    """The backend's fused head (``linear_loss_grad_fused``: the logits GEMM writes the factored
    gradient, no logits tensor) where it has one; off unless ``DFT_KERNELS_FUSED_GEMM=1``."""
    return os.environ.get(FUSED_GEMM_ENV, "") not in ("", "0")


def factored_enabled() -> bool:
    """The one-read factored gradient (``row_loss_grad_factored``) where a backend has it; on
    unless ``DFT_KERNELS_FACTORED=0``."""
    return os.environ.get(FACTORED_ENV, "") != "0"


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


def scale_stash(stash: Optional[Tensor], grad_output: Tensor, dtype: torch.dtype,
                applied: Optional[Tensor] = None) -> Optional[Tensor]:
    """A gradient computed in forward for ``grad_output = 1``, times ``grad_output``, in ``dtype``.

    Where the stash is wider (the ``dW`` accumulator, float16's float32 ``dX``) the scale and
    the cast are one pass writing the returned gradient.  Otherwise the first backward
    (``applied`` None) scales the stash in place, so no second copy exists; a later backward
    through the same graph (``retain_graph=True``, gradcheck) finds the stash already scaled
    by ``applied`` and returns a scaled copy, ``stash * (grad_output / applied)`` (nan where
    ``applied`` was 0: then the stash is lost, and says so).  The in-place scale
    goes through ``.data``: autograd's saved-tensor version check would otherwise refuse
    that later backward."""
    if stash is None:
        return None
    g = grad_output.to(wide_dtype(grad_output.dtype))
    if stash.dtype != dtype:
        # a wider stash (the float32 dW accumulator, float16's float32 dX), left as it is: scale
        # and cast in one pass into the returned gradient
        return torch.mul(stash, g, out=torch.empty(stash.shape, dtype=dtype, device=stash.device))
    if applied is not None:
        return stash * (g / applied)
    stash.data.mul_(g)
    return stash



def scale_stashes(ctx, stashes, grad_output: Tensor, dtypes) -> tuple:
    """:func:`scale_stash` over the gradients an autograd ``ctx`` saved in forward, keeping on
    ``ctx.applied`` the scale the first backward applied in place (for any later backward)."""
    applied = getattr(ctx, "applied", None)
    grads = tuple(scale_stash(t, grad_output, dt, applied) for t, dt in zip(stashes, dtypes))
    if applied is None:
        ctx.applied = grad_output.to(wide_dtype(grad_output.dtype))
    return grads

class _Compaction:
    """The valid rows of a call (``index``, int64 ``[n_valid]``), when skipping the ignored ones
    saves at least one chunk: the chunk loop then runs over the valid rows only, gathering
    ``x`` rows per chunk and scattering ``dX`` rows and per-token losses back; ignored rows keep
    a zero gradient and a zero loss.  Finding them costs one host sync, so it is only done
    where the entry point syncs anyway (``validate=True``)."""

    def __init__(self, index: Tensor, num_rows: int):
        self.index, self.num_rows = index, num_rows

    @staticmethod
    def plan(target: Tensor, opts: LossOptions, vocab_size: int) -> Optional["_Compaction"]:
        n = target.shape[0]
        if not opts.validate or n <= opts.chunk_size:
            return None
        valid = valid_rows(target, opts.ignore_index, vocab_size)
        index = valid.nonzero().squeeze(1)  # the host sync
        chunks = lambda rows: math.ceil(rows / opts.chunk_size)  # noqa: E731
        if chunks(index.numel()) >= chunks(n):
            return None
        return _Compaction(index, n)

    def gather(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None or t.dim() == 0 else t.index_select(0, self.index)

    def scatter(self, t: Tensor) -> Tensor:
        """``t`` (per valid row) as a per-row tensor over all rows, zero at the ignored ones."""
        full = t.new_zeros((self.num_rows, *t.shape[1:]))
        return full.index_copy_(0, self.index, t)


class LinearChunks:
    """Chunk logits computed as ``x @ W^T (+ b)`` into one reused buffer; their gradients go to
    ``dx``, ``dw``, ``db`` (allocated only where wanted: ``dx`` in :func:`stash_dtype`, ``dw``/``db``
    in ``accum_dtype``; ``dw`` is written by the first chunk, never zero-filled).

    With a :class:`_Compaction`, chunks are over its valid rows: ``x`` rows are gathered into a
    chunk buffer and ``dX`` rows scattered into ``dx`` (zero at the ignored rows)."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], accum_dtype: torch.dtype,
                 need_dx: bool, need_dw: bool, need_db: bool, chunk_size: int,
                 logits_dtype: Optional[torch.dtype] = None, compaction: Optional[_Compaction] = None,
                 dx_dtype: Optional[torch.dtype] = None):
        self.x, self.gemms, self.compaction = x, HeadGemms(x, weight, bias, logits_dtype), compaction
        self.num_rows = x.shape[0] if compaction is None else compaction.index.numel()
        self.vocab_size, self.device = weight.shape[0], x.device
        self.chunk_size = min(chunk_size, max(1, self.num_rows))
        dx_dtype = stash_dtype(x.dtype) if dx_dtype is None else dx_dtype
        self.dx = None
        if need_dx:
            self.dx = (torch.empty if compaction is None else torch.zeros)(x.shape, dtype=dx_dtype, device=x.device)
        self.dw = torch.empty(weight.shape, dtype=accum_dtype, device=weight.device) if need_dw else None
        need_db = need_db and bias is not None
        self.db = torch.zeros(bias.shape, dtype=accum_dtype, device=bias.device) if need_db else None
        self.wants_grad = need_dx or need_dw or need_db
        # The row kernel may write the gradient as a per-row factor times a matrix (one read of
        # the logits instead of two): the GEMMs apply the factor, on float32 products for dX and
        # on the chunk's x rows for dW.  Not for float16 (its gradient is rescaled to fit float16's
        # range, see HeadGemms) nor with a bias gradient.
        self.factorable = self.db is None and x.dtype in (torch.float32, torch.bfloat16)
        self.fusable = self.factorable and bias is None
        self._first = True
        # slot (0, 1, or FUSED_SLOT) -> (logits, gradient, gathered x rows) / row factors
        self._buffers: dict = {}
        self._row_scales: dict = {}

    def _buffer(self, slot, with_grad: bool, with_logits: bool = True):
        """Chunk buffers of ``slot`` (one slot, two with overlap, :data:`FUSED_SLOT` for a fused
        head), allocated on first use: logits (None without them), the gradient buffer (None: in
        place over the logits), the gathered ``x`` rows (compaction only)."""
        if slot not in self._buffers:
            c, g = self.chunk_size, self.gemms
            logits = None
            if with_logits:
                logits = torch.empty((c, self.vocab_size), dtype=g.logits_dtype, device=self.device)
            grad = None
            if with_grad and (not with_logits or g.grad_dtype != g.logits_dtype):
                grad = torch.empty((c, self.vocab_size), dtype=g.grad_dtype, device=self.device)
            xbuf = None
            if self.compaction is not None:
                xbuf = torch.empty((c, self.x.shape[1]), dtype=self.x.dtype, device=self.device)
            self._buffers[slot] = (logits, grad, xbuf)
        return self._buffers[slot]

    def row_scale(self, slot: int, rows: int) -> Tensor:
        """The slot's float32 buffer for a factored gradient's per-row factors (first ``rows``)."""
        if slot not in self._row_scales:
            self._row_scales[slot] = torch.empty(self.chunk_size, dtype=torch.float32, device=self.device)
        return self._row_scales[slot][:rows]

    def fused_rows(self, start: int, end: int, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
        """For a backend's fused head: the chunk's ``x`` rows and the buffer its factored gradient
        goes to (in the GEMMs' gradient dtype; no logits buffer exists on this path)."""
        _, grad, xbuf = self._buffer(FUSED_SLOT, with_grad, with_logits=False)
        return self._x_rows(start, end, xbuf), None if grad is None else grad[:end - start]

    def _x_rows(self, start: int, end: int, xbuf: Optional[Tensor]) -> Tensor:
        if self.compaction is None:
            return self.x[start:end]
        return torch.index_select(self.x, 0, self.compaction.index[start:end], out=xbuf[:end - start])

    def rows(self, start: int, end: int, slot: int = 0, with_grad: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """The chunk's logits (in the slot's buffer) and where its gradient goes (None: in place)."""
        logits, grad, xbuf = self._buffer(slot, with_grad)
        out = self.gemms.logits_into(self._x_rows(start, end, xbuf), logits[:end - start])
        return out, None if grad is None else grad[:end - start]

    def backward(self, dlogits: Tensor, start: int, end: int, slot=0,
                 row_scale: Optional[Tensor] = None) -> None:
        x_c = self._x_rows(start, end, self._buffers[slot][2]) if self.compaction is not None else self.x[start:end]
        dx_c = None
        if self.dx is not None:
            dx_c = self.dx[start:end] if self.compaction is None else torch.empty(
                (end - start, self.x.shape[1]), dtype=self.dx.dtype, device=self.device)
        self.gemms.backward(dlogits, x_c, dx_c, self.dw, self.db, self._first, row_scale)
        self._first = False
        if dx_c is not None and self.compaction is not None:
            self.dx.index_copy_(0, self.compaction.index[start:end], dx_c)

    def release(self, slot) -> None:
        """Drop the buffers of ``slot`` (a fused head that declined the call)."""
        self._buffers.pop(slot, None)
        self._row_scales.pop(slot, None)

    def finish(self) -> None:
        """After the last chunk: a ``dw`` that no chunk wrote (no rows) is zero."""
        if self._first and self.dw is not None:
            self.dw.zero_()
        self._buffers.clear()
        self._row_scales.clear()
        self.gemms.release()


class GivenChunks:
    """Chunks of given ``[N, V]`` logits.  With ``need_grad`` the row kernel writes each chunk's
    gradient into ``grad`` (in ``grad_dtype``, default :func:`stash_dtype`): the caller's logits
    are only read."""

    def __init__(self, logits: Tensor, need_grad: bool, grad_dtype: Optional[torch.dtype] = None):
        self.logits, self.num_rows, self.wants_grad = logits, logits.shape[0], need_grad
        self.grad = None
        if need_grad:
            dtype = stash_dtype(logits.dtype) if grad_dtype is None else grad_dtype
            self.grad = torch.empty(logits.shape, dtype=dtype, device=logits.device)

    def rows(self, start: int, end: int, slot: int = 0, with_grad: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        return self.logits[start:end], None if self.grad is None else self.grad[start:end]

    def backward(self, dlogits: Tensor, start: int, end: int, slot: int = 0,
                 row_scale: Optional[Tensor] = None) -> None:
        pass  # dlogits already is grad[start:end] (never factored: GivenChunks has no row_scale)

    def finish(self) -> None:
        pass


def _row_call(backend, logits: Tensor, grad_out: Optional[Tensor], target: Tensor, token_weights, params,
              scale):
    if grad_out is None or scale is None:
        return backend.row_loss_grad(logits, target, params, token_weights, scale)
    return backend.row_loss_grad(logits, target, params, token_weights, scale, grad_out=grad_out)


def run_chunks(chunks, target: Tensor, token_weights: Optional[Tensor], params: LossParams, backend,
               chunk_size: int, grad_scale: Optional[Tensor], per_token: Optional[Tensor] = None,
               acc: Optional[_Accumulators] = None) -> None:
    """One pass of the row kernel over ``chunks`` (:class:`LinearChunks` or :class:`GivenChunks`).

    ``grad_scale`` None (or chunks that want no gradient) means forward only; a 1-D
    ``grad_scale`` is per token and is sliced per chunk.  ``per_token`` (if given) receives
    each chunk's loss vector; ``acc`` the running sums.  ``target``, ``token_weights``,
    ``grad_scale`` and ``per_token`` are indexed like the chunks' rows.
    """
    if not chunks.wants_grad:
        grad_scale = None
    with_grad = grad_scale is not None
    starts = range(0, chunks.num_rows, chunk_size)
    if chunks.num_rows == 0:
        # no row to compute (all ignored and compacted away): the backend still sees an empty chunk in
        # the logits' dtype, so that a dtype it rejects fails whatever the targets are
        dtype = chunks.logits.dtype if isinstance(chunks, GivenChunks) else chunks.gemms.logits_dtype
        _row_call(backend, torch.empty((0, 1), dtype=dtype, device=target.device), None, target[:0], None, params, None)
    factored = None
    if with_grad and getattr(chunks, "factorable", False) and factored_enabled():
        factored = getattr(backend, "row_loss_grad_factored", None)
    fused = None
    if getattr(chunks, "fusable", False) and fused_gemm_enabled():
        fused = getattr(backend, "linear_loss_grad_fused", None)

    def chunk_inputs(start: int, end: int):
        """The chunk's targets, token weights and gradient scale."""
        scale = grad_scale[start:end] if grad_scale is not None and grad_scale.dim() == 1 else grad_scale
        return target[start:end], None if token_weights is None else token_weights[start:end], scale

    def record(start: int, end: int, out) -> None:
        if acc is not None:
            acc.add(out)
        if per_token is not None:
            per_token[start:end] = out.loss

    def fused_loop() -> bool:
        """The loop over the backend's fused head: per chunk one call that makes the loss and the
        factored gradient from ``x`` rows and ``W`` (no logits), then the ``dX``/``dW`` GEMMs.
        False, having done nothing, where the backend does not fuse these inputs or options (it
        says so on the first chunk, before writing anything)."""
        for k, start in enumerate(starts):
            end = min(start + chunk_size, chunks.num_rows)
            x_c, grad = chunks.fused_rows(start, end, with_grad)
            row_scale = chunks.row_scale(FUSED_SLOT, end - start) if with_grad else None
            tgt, tw, scale = chunk_inputs(start, end)
            out = fused(x_c, chunks.gemms.weight, tgt, params, tw, scale, grad, row_scale)
            if out is None:
                if k == 0:
                    chunks.release(FUSED_SLOT)
                    return False
                raise RuntimeError("the fused head refused a chunk after accepting the first")
            record(start, end, out)
            if with_grad:
                chunks.backward(grad, start, end, FUSED_SLOT, row_scale)
        return True

    if fused is not None and fused_loop():
        chunks.finish()
        return

    def logits(start: int, slot: int):
        end = min(start + chunk_size, chunks.num_rows)
        return (start, end, *chunks.rows(start, end, slot, with_grad))

    def row_kernel(start: int, end: int, rows: Tensor, grad_out: Optional[Tensor],
                   slot: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """Loss and gradient of a chunk: ``(gradient, None)``, or ``(G~, row_scale)`` where the
        backend wrote it factored (gradient = ``row_scale[:, None] * G~``)."""
        tgt, tw, scale = chunk_inputs(start, end)
        row_scale = out = None
        if factored is not None:
            row_scale = chunks.row_scale(slot, end - start)
            out = factored(rows, tgt, params, tw, scale, grad_out, row_scale)
            if out is None:  # the backend does not factor these options
                row_scale = None
        if out is None:
            out = _row_call(backend, rows, grad_out, tgt, tw, params, scale)
        record(start, end, out)
        return (rows if grad_out is None else grad_out), row_scale

    if with_grad and overlap_enabled() and isinstance(chunks, LinearChunks) and chunks.device.type == "cuda":
        _run_overlapped(chunks, starts, logits, row_kernel)
    else:
        for start in starts:
            start, end, rows, grad_out = logits(start, 0)
            dlogits, row_scale = row_kernel(start, end, rows, grad_out)
            if with_grad:
                chunks.backward(dlogits, start, end, row_scale=row_scale)
            del rows, grad_out, dlogits, row_scale
    chunks.finish()


def _run_overlapped(chunks: LinearChunks, starts, logits, row_kernel) -> None:
    """The loop of :func:`run_chunks` with the logits GEMM of chunk ``k + 1`` issued on the current
    stream before the ``dX``/``dW`` GEMMs of chunk ``k``, whose row kernel runs on a side stream
    meanwhile.  Two buffer slots alternate; stream order on the main stream keeps chunk
    ``k - 1``'s GEMMs ahead of the logits GEMM that reuses its slot, and events order the rest."""
    main = torch.cuda.current_stream(chunks.device)
    side = torch.cuda.Stream(chunks.device)
    pending = None  # (start, end, dlogits, slot, event, row_scale) of the chunk whose GEMMs come next
    for k, start in enumerate(starts):
        slot = k % 2
        start, end, rows, grad_out = logits(start, slot)  # on the main stream
        done = torch.cuda.Event()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dlogits, row_scale = row_kernel(start, end, rows, grad_out, slot)
            done.record(side)
        if pending is not None:
            main.wait_event(pending[4])
            chunks.backward(pending[2], pending[0], pending[1], pending[3], pending[5])
        pending = (start, end, dlogits, slot, done, row_scale)
    if pending is not None:
        main.wait_event(pending[4])
        chunks.backward(pending[2], pending[0], pending[1], pending[3], pending[5])
    main.wait_stream(side)


def _forward(chunks, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
             opts: LossOptions, backend, device, out_dtype: torch.dtype, plan: Optional[_Compaction] = None):
    """The loss (0-d, or ``[N]`` for ``none``) and the stats outputs; for ``mean``/``sum`` the
    chunks also receive the gradients for ``grad_output = 1``."""
    params = opts.row_params
    acc = _Accumulators(device, out_dtype, params.with_stats, params.needs_entropy)
    if opts.reduction == "none":
        per_token = torch.empty(chunks.num_rows, dtype=out_dtype, device=device)
        run_chunks(chunks, target, token_weights, params, backend, opts.chunk_size, None, per_token, acc)
        return (per_token if plan is None else plan.scatter(per_token)), acc.stats_outputs(device)
    grad_scale = torch.ones((), dtype=out_dtype, device=device)
    if divisor is not None:
        grad_scale = grad_scale / divisor
    run_chunks(chunks, target, token_weights, params, backend, opts.chunk_size, grad_scale, acc=acc)
    return (acc.loss * grad_scale).to(out_dtype), acc.stats_outputs(device)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   token_weights: Optional[Tensor], divisor: Optional[Tensor], opts: LossOptions, backend,
                   need_dx: bool, need_dw: bool, need_db: bool, compact: bool = False):
    """Forward of the chunked loss.  Inputs are already flattened and checked by
    :mod:`dft_kernels.functional`: ``x`` ``[N, H]`` contiguous, ``target`` ``[N]`` int64,
    ``token_weights`` ``[N]`` and ``divisor`` a 0-d tensor in :func:`wide_dtype` (``mean``:
    the valid count, or ``num_items_in_batch``) or None (``sum``/``none``).  ``compact``: skip
    the ignored rows when that saves a chunk (:class:`_Compaction`; single-process only).

    Returns ``(loss, dx, dw, db, stats)``: the loss (0-d, or ``[N]`` for ``none``); for
    ``mean``/``sum`` the gradients for ``grad_output = 1`` (``dx`` in :func:`stash_dtype`,
    ``dw``/``db`` in ``accum_dtype``; :func:`scale_stash` scales and casts them) (None
    where not needed, and always None for ``none``, whose backward recomputes); the
    stats sums (nll, prob, correct, entropy: 0-d, or empty when not computed).
    """
    grads = opts.reduction != "none"
    plan = _Compaction.plan(target, opts, weight.shape[0]) if compact else None
    # dW/db wait for backward like dX: a float16 accumulator would hold them for grad_output = 1, where
    # a mean's 1/N and a small objective weight push them below float16's normal range
    chunks = LinearChunks(x, weight, bias, stash_dtype(opts.accum_dtype), grads and need_dx, grads and need_dw,
                          grads and need_db, opts.chunk_size, opts.logits_dtype, plan)
    if plan is not None:
        target, token_weights = plan.gather(target), plan.gather(token_weights)
    loss, stats = _forward(chunks, target, token_weights, divisor, opts, backend, x.device, wide_dtype(x.dtype), plan)
    # dW/db wait for backward in the accumulators themselves: scale_stash scales and casts them in one pass
    return loss, chunks.dx, chunks.dw, chunks.db, stats


def linear_backward_none(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         token_weights: Optional[Tensor], grad_loss: Tensor, opts: LossOptions, backend,
                         need_dx: bool, need_dw: bool, need_db: bool, compact: bool = False):
    """Backward of ``reduction="none"``: recompute each chunk with the per-token
    ``grad_loss`` folded into the row kernel's scale.  Returns ``(dx, dw, db)`` in the
    dtypes of ``x``, ``weight``, ``bias`` (None where not needed)."""
    plan = _Compaction.plan(target, opts, weight.shape[0]) if compact else None
    chunks = LinearChunks(x, weight, bias, opts.accum_dtype, need_dx, need_dw, need_db, opts.chunk_size,
                          opts.logits_dtype, plan, dx_dtype=x.dtype)
    grad_loss = grad_loss.to(wide_dtype(x.dtype)).contiguous()
    if plan is not None:
        target, token_weights, grad_loss = plan.gather(target), plan.gather(token_weights), plan.gather(grad_loss)
    run_chunks(chunks, target, token_weights, opts.row_params, backend, opts.chunk_size, grad_loss)
    db = _cast(chunks.db, weight.dtype if bias is None else bias.dtype)
    return chunks.dx, _cast(chunks.dw, weight.dtype), db


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
    """Backward of ``reduction="none"`` on given logits: the row kernel writes the gradient
    (``grad_output`` folded in) once, in the logits dtype."""
    chunks = GivenChunks(logits, True, grad_dtype=logits.dtype)
    run_chunks(chunks, target, token_weights, opts.row_params, backend, opts.chunk_size,
               grad_loss.to(wide_dtype(logits.dtype)).contiguous())
    return chunks.grad
