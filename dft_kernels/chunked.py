"""The chunked loss: one chunk driver, its buffers and its GEMMs (docs/design.md, Data path).

For each chunk of ``C`` token rows, :func:`run_chunks` does::

    logits = x_c @ W^T (+ b)                        # into the one [C, V] logits buffer (HeadGemms)
    row step (backend, path)                        # loss, stats; the gradient, written once
    dx_c   = dlogits @ W                            # written into dx[chunk]
    dW    (+)= dlogits^T @ x_c ;  db += sum(dlogits) # in place in ``accum_dtype`` (first chunk writes)

The logits buffer (and, where the GEMMs read the gradient in another dtype, one gradient
buffer in that dtype, which the row kernel writes directly) is allocated once per call and
reused by every chunk, so at most one chunk of logits exists at a time and no ``[V, H]``
temporary is made.  For ``mean``/``sum`` the gradients are computed in forward and scaled
by ``grad_output`` in backward; for ``none`` forward only computes per-token losses and
backward recomputes the chunks with the per-token ``grad_output`` folded in.

The row step is the plan's (:class:`dft_kernels.options.LossPlan`): the two-pass row kernel
(``rows``), or the factored one (``factored``: the kernel reads each row once and writes the
gradient as ``row_scale[:, None] * G~``, and :meth:`HeadGemms.backward` applies ``row_scale``
on chunk-sized operands), or the experimental fused head (``fused``: logits never formed,
:mod:`dft_kernels.experimental.fused_head`).  :class:`LinearChunks` makes each chunk's logits
and takes their gradient back; :class:`GivenChunks` reads logits the caller already has.
These are plain functions of tensors and the plan; :mod:`dft_kernels.ops` registers them as
torch custom ops with autograd (so ``torch.compile`` sees one opaque op per call).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.cuda import OutOfMemoryError

from .backends import get_backend, log_once, valid_rows
from .options import ANCHOR, DISTILL, FACTORED, FUSED, LossParams, LossPlan, mm_out_dtype

__all__ = ["run_chunks", "linear_forward", "linear_backward_none", "logits_forward", "logits_backward_none",
           "LinearChunks", "GivenChunks", "RowSteps", "HeadGemms", "scale_stash", "scale_stashes", "wide_dtype",
           "stash_dtype", "TwoHeadChunks", "PairSteps", "LogprobSteps", "logprobs_linear_forward",
           "logprobs_linear_backward", "logprobs_logits_forward", "logprobs_logits_backward"]


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
    def plan(target: Tensor, plan: LossPlan, vocab_size: int) -> Optional["_Compaction"]:
        n = target.shape[0]
        if not plan.options.validate or n <= plan.chunk_size:
            return None
        valid = valid_rows(target, plan.options.ignore_index, vocab_size)
        index = valid.nonzero().squeeze(1)  # the host sync
        chunks = lambda rows: math.ceil(rows / plan.chunk_size)  # noqa: E731
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
    ``dx``, ``dw``, ``db`` (allocated only where the plan needs them: ``dx`` in ``dx_dtype``,
    ``dw``/``db`` in ``accum_dtype``; ``dw`` is written by the first chunk, never zero-filled).

    With a :class:`_Compaction`, chunks are over its valid rows: ``x`` rows are gathered into a
    chunk buffer and ``dX`` rows scattered into ``dx`` (zero at the ignored rows)."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: LossPlan, with_grad: bool,
                 accum_dtype: torch.dtype, dx_dtype: torch.dtype, compaction: Optional[_Compaction] = None):
        self.x, self.weight, self.compaction = x, weight, compaction
        self.gemms = HeadGemms(x, weight, bias, plan.logits_dtype, plan.grad_dtype)
        self.num_rows = x.shape[0] if compaction is None else compaction.index.numel()
        self.vocab_size, self.device = weight.shape[0], x.device
        need_dx, need_dw = with_grad and plan.need_dx, with_grad and plan.need_dw
        need_db = with_grad and plan.need_db and bias is not None
        self.dx = None
        if need_dx:
            self.dx = (torch.empty if compaction is None else torch.zeros)(x.shape, dtype=dx_dtype, device=x.device)
        self.dw = torch.empty(weight.shape, dtype=accum_dtype, device=weight.device) if need_dw else None
        self.db = torch.zeros(bias.shape, dtype=accum_dtype, device=bias.device) if need_db else None
        self.wants_grad = need_dx or need_dw or need_db
        self._first = True
        # the chunk buffers: logits (none for the fused head, which forms no logits), the gradient
        # (None: in place over the logits), the per-row factors of a factored gradient, gathered x rows
        c, g = min(plan.chunk_size, max(1, self.num_rows)), self.gemms
        fused, factored = plan.path == FUSED, plan.path in (FACTORED, FUSED) and self.wants_grad
        self.logits = None if fused else torch.empty((c, self.vocab_size), dtype=g.logits_dtype, device=self.device)
        self.grad = None
        if self.wants_grad and (fused or g.grad_dtype != g.logits_dtype):
            self.grad = torch.empty((c, self.vocab_size), dtype=g.grad_dtype, device=self.device)
        self.row_scale = torch.empty(c, dtype=torch.float32, device=self.device) if factored else None
        self._xbuf = None if compaction is None else torch.empty((c, x.shape[1]), dtype=x.dtype, device=x.device)

    def x_rows(self, start: int, end: int) -> Tensor:
        """The chunk's ``x`` rows (gathered, with a compaction)."""
        if self.compaction is None:
            return self.x[start:end]
        return torch.index_select(self.x, 0, self.compaction.index[start:end], out=self._xbuf[:end - start])

    def rows(self, start: int, end: int) -> tuple[Tensor, Optional[Tensor]]:
        """The chunk's logits (in the logits buffer) and where its gradient goes (None: in place)."""
        out = self.gemms.logits_into(self.x_rows(start, end), self.logits[:end - start])
        return out, None if self.grad is None else self.grad[:end - start]

    def backward(self, dlogits: Tensor, start: int, end: int, row_scale: Optional[Tensor] = None) -> None:
        """``dX``, ``dW``, ``db`` of the chunk from its gradient (``row_scale[:, None] * dlogits``
        when factored)."""
        x_c = self.x_rows(start, end)
        dx_c = None
        if self.dx is not None:
            dx_c = self.dx[start:end] if self.compaction is None else torch.empty(
                (end - start, self.x.shape[1]), dtype=self.dx.dtype, device=self.device)
        self.gemms.backward(dlogits, x_c, dx_c, self.dw, self.db, self._first, row_scale)
        self._first = False
        if dx_c is not None and self.compaction is not None:
            self.dx.index_copy_(0, self.compaction.index[start:end], dx_c)

    def finish(self) -> None:
        """After the last chunk: a ``dw`` that no chunk wrote (no rows) is zero; buffers dropped."""
        if self._first and self.dw is not None:
            self.dw.zero_()
        self.logits = self.grad = self.row_scale = self._xbuf = None
        self.gemms.release()


class GivenChunks:
    """Chunks of given ``[N, V]`` logits.  With ``need_grad`` the row kernel writes each chunk's
    gradient into ``grad`` (in ``grad_dtype``): the caller's logits are only read."""

    row_scale = None  # never factored

    def __init__(self, logits: Tensor, need_grad: bool, grad_dtype: torch.dtype):
        self.logits, self.num_rows, self.wants_grad = logits, logits.shape[0], need_grad
        self.grad = torch.empty(logits.shape, dtype=grad_dtype, device=logits.device) if need_grad else None

    def rows(self, start: int, end: int) -> tuple[Tensor, Optional[Tensor]]:
        return self.logits[start:end], None if self.grad is None else self.grad[start:end]

    def backward(self, dlogits: Tensor, start: int, end: int, row_scale: Optional[Tensor] = None) -> None:
        pass  # dlogits already is grad[start:end]

    def finish(self) -> None:
        pass


class TwoHeadChunks(LinearChunks):
    """:class:`LinearChunks` of the trained head, plus the logits of a second, frozen head on the same
    token rows (the anchor's reference head, distillation's teacher): ``ref_x @ ref_weight^T (+ ref_bias)``
    into a second ``[C, V]`` buffer of the call, made by :meth:`rows` together with the first head's, so
    that the row step reads both rows of a token in one pass (:attr:`ref_logits`: the current chunk's).
    The second head gets no gradient and is only read; its hidden size may differ from the first's."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], ref: tuple, plan, with_grad: bool,
                 accum_dtype: torch.dtype, dx_dtype: torch.dtype, compaction: Optional[_Compaction] = None):
        super().__init__(x, weight, bias, plan, with_grad, accum_dtype, dx_dtype, compaction)
        ref_x, ref_weight, ref_bias = ref
        self.ref_x = ref_x
        self.ref_gemms = HeadGemms(ref_x, ref_weight, ref_bias, plan.logits_dtype, plan.grad_dtype)
        c = self.logits.shape[0]
        self._ref_buf = torch.empty((c, self.vocab_size), dtype=self.ref_gemms.logits_dtype, device=self.device)
        self._ref_xbuf = None if compaction is None else torch.empty((c, ref_x.shape[1]), dtype=ref_x.dtype,
                                                                     device=ref_x.device)
        self.ref_logits = self._ref_buf[:0]

    def rows(self, start: int, end: int) -> tuple[Tensor, Optional[Tensor]]:
        if self.compaction is None:
            ref_rows = self.ref_x[start:end]
        else:
            ref_rows = torch.index_select(self.ref_x, 0, self.compaction.index[start:end],
                                          out=self._ref_xbuf[:end - start])
        self.ref_logits = self.ref_gemms.logits_into(ref_rows, self._ref_buf[:end - start])
        return super().rows(start, end)

    def finish(self) -> None:
        super().finish()
        self.ref_logits = self._ref_buf = self._ref_xbuf = None
        self.ref_gemms.release()


class RowSteps:
    """The plan's row steps for one call: :meth:`__call__` runs the current ``(backend, path)``
    on a chunk.  When it raises (anything but out-of-memory) and a next step exists (only
    ``backend="auto"`` plans have one), the reason is logged and the next step serves the rest
    of this call: a failing kernel raises at compile or launch, before writing anything, so the
    chunk is re-run from the same logits.  Nothing outlives the call.

    ``kernel``: an object with ``row_loss_grad`` that replaces the plan's steps (the
    vocab-parallel row kernel)."""

    def __init__(self, plan: LossPlan, kernel=None):
        self.params: LossParams = plan.params
        self._steps = [(kernel, plan.path, "vocab-parallel")] if kernel is not None else [
            (get_backend(name), path, name) for name, path in plan.steps]

    @property
    def path(self) -> str:
        return self._steps[0][1]

    def __call__(self, logits: Tensor, target: Tensor, token_weights: Optional[Tensor], scale: Optional[Tensor],
                 grad_out: Optional[Tensor], row_scale: Optional[Tensor]):
        """The chunk's :class:`~dft_kernels.backends.RowOutputs`, and the per-row factors where the
        gradient was written factored (else None)."""

        def call(module, path):
            if path == FACTORED and scale is not None:
                return module.row_loss_grad_factored(logits, target, self.params, token_weights, scale,
                                                     grad_out, row_scale), row_scale
            if scale is None or grad_out is None:
                return module.row_loss_grad(logits, target, self.params, token_weights, scale), None
            return module.row_loss_grad(logits, target, self.params, token_weights, scale, grad_out=grad_out), None

        return self._run(call)

    def _run(self, call):
        """``call(module, path)`` on the current step, handing the rest of the call to the next step
        when it raises (see the class docstring)."""
        while True:
            module, path, name = self._steps[0]
            try:
                return call(module, path)
            except OutOfMemoryError:
                raise
            except Exception as exc:
                if len(self._steps) == 1:
                    raise
                self._steps.pop(0)
                log_once(f"dft_kernels: backend 'auto': the {path} kernel of {name!r} failed "
                         f"({type(exc).__name__}: {exc}); this call uses {self._steps[0][1]} of "
                         f"{self._steps[0][2]!r}")


class PairSteps(RowSteps):
    """The plan's row steps of a two-head call (path ``"anchor"`` or ``"distill"``), with :class:`RowSteps`'
    arguments and fallback: the backend's ``row_anchor_loss_grad`` / ``row_distill_loss_grad`` reads the
    chunk's logits of both heads (the second from :attr:`TwoHeadChunks.ref_logits`)."""

    _METHODS = {ANCHOR: "row_anchor_loss_grad", DISTILL: "row_distill_loss_grad"}

    def __init__(self, plan, chunks: TwoHeadChunks, kernel=None):
        super().__init__(plan, kernel)
        self.chunks = chunks

    def __call__(self, logits: Tensor, target: Tensor, token_weights: Optional[Tensor], scale: Optional[Tensor],
                 grad_out: Optional[Tensor], row_scale: Optional[Tensor]):
        ref = self.chunks.ref_logits  # the chunk's (an empty one before the first chunk: a call without rows)

        def call(module, path):
            return getattr(module, self._METHODS[path])(logits, ref, target, self.params, token_weights, scale,
                                                        grad_out), None

        return self._run(call)


def run_chunks(chunks, rows, per_row: tuple, chunk_size: int, with_grad: bool, sink=None) -> None:
    """One pass of the row step ``rows`` over ``chunks`` (:class:`LinearChunks` or :class:`GivenChunks`).

    For each chunk of rows ``[start, end)``: its logits (``chunks.rows``), then
    ``rows(logits, *args, grad_out, row_scale) -> (outputs, row_scale)`` where ``args`` are the
    entries of ``per_row`` sliced to the chunk (``[N, ...]`` tensors; None and 0-d tensors pass
    as they are; the first is the target): the loss's :class:`RowSteps` takes ``(target,
    token_weights, grad_scale)``, the log-probs' :class:`LogprobSteps` ``(target, temperature,
    row_stats, grad_logp, grad_entropy)``;
    ``sink(start, end, outputs)`` when given; and, with ``with_grad``, the chunk's ``dX``/``dW``/``db``
    GEMMs from the gradient the step wrote (``chunks.backward``).  The loss's experimental fused
    head replaces the logits and the step by one kernel (``rows.path == FUSED``).
    """
    if chunks.num_rows == 0 and chunks.logits is not None:
        # no row to compute (all ignored and compacted away): the row step still sees an empty chunk in
        # the logits' dtype (forward only: the target, nothing else), so that a dtype its backend
        # rejects fails whatever the targets are
        rows(chunks.logits[:0], per_row[0][:0], *(None,) * (len(per_row) - 1), None, None)
    fused = None
    if rows.path == FUSED:
        from .experimental.fused_head import linear_loss_grad_fused as fused
    for start in range(0, chunks.num_rows, chunk_size):
        end = min(start + chunk_size, chunks.num_rows)
        args = tuple(a[start:end] if a is not None and a.dim() > 0 else a for a in per_row)
        row_scale = None if chunks.row_scale is None else chunks.row_scale[:end - start]
        if fused is not None:  # the logits GEMM writes the factored gradient: no logits
            tgt, tw, scale = args
            dlogits = None if scale is None else chunks.grad[:end - start]
            out = fused(chunks.x_rows(start, end), chunks.weight, tgt, rows.params, tw, scale, dlogits, row_scale)
            if out is None:
                raise ValueError("fused_head: the fused head declined a chunk the plan gave it")
        else:
            logits, grad_out = chunks.rows(start, end)
            out, row_scale = rows(logits, *args, grad_out, row_scale)
            dlogits = logits if grad_out is None else grad_out
        if sink is not None:
            sink(start, end, out)
        if with_grad:
            chunks.backward(dlogits, start, end, row_scale)
    chunks.finish()


def _loss_pass(chunks, rows: RowSteps, target: Tensor, token_weights: Optional[Tensor], chunk_size: int,
               grad_scale: Optional[Tensor], per_token: Optional[Tensor] = None,
               acc: Optional[_Accumulators] = None) -> None:
    """:func:`run_chunks` of the loss: ``grad_scale`` None (or chunks that want no gradient) means
    forward only, a 1-D ``grad_scale`` is per token; ``per_token`` (if given) receives each chunk's
    loss vector, ``acc`` the running sums."""
    if not chunks.wants_grad:
        grad_scale = None

    def sink(start, end, out):
        if acc is not None:
            acc.add(out)
        if per_token is not None:
            per_token[start:end] = out.loss

    run_chunks(chunks, rows, (target, token_weights, grad_scale), chunk_size, grad_scale is not None, sink)


def _forward(chunks, rows: RowSteps, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
             plan: LossPlan, device, out_dtype: torch.dtype, compaction: Optional[_Compaction] = None):
    """The loss (0-d, or ``[N]`` for ``none``) and the stats outputs; for ``mean``/``sum`` the
    chunks also receive the gradients for ``grad_output = 1``."""
    params = plan.params
    acc = _Accumulators(device, out_dtype, params.with_stats, params.needs_entropy)
    if plan.options.reduction == "none":
        per_token = torch.empty(chunks.num_rows, dtype=out_dtype, device=device)
        _loss_pass(chunks, rows, target, token_weights, plan.chunk_size, None, per_token, acc)
        return (per_token if compaction is None else compaction.scatter(per_token)), acc.stats_outputs(device)
    grad_scale = torch.ones((), dtype=out_dtype, device=device)
    if divisor is not None:
        grad_scale = grad_scale / divisor
    _loss_pass(chunks, rows, target, token_weights, plan.chunk_size, grad_scale, acc=acc)
    return (acc.loss * grad_scale).to(out_dtype), acc.stats_outputs(device)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _chunks_and_steps(x, weight, bias, ref, plan, with_grad, accum_dtype, dx_dtype, compaction, kernel):
    """The chunks and row steps of a call: one head (:class:`LinearChunks`, :class:`RowSteps`), or with
    ``ref`` (``(ref_x, ref_weight, ref_bias)``) two (:class:`TwoHeadChunks`, :class:`PairSteps`)."""
    if ref is None:
        return (LinearChunks(x, weight, bias, plan, with_grad, accum_dtype, dx_dtype, compaction),
                RowSteps(plan, kernel))
    chunks = TwoHeadChunks(x, weight, bias, ref, plan, with_grad, accum_dtype, dx_dtype, compaction)
    return chunks, PairSteps(plan, chunks, kernel)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   token_weights: Optional[Tensor], divisor: Optional[Tensor], plan: LossPlan,
                   kernel=None, compact: bool = False, ref: Optional[tuple] = None):
    """Forward of the chunked loss.  Inputs are already flattened and checked by
    :mod:`dft_kernels.functional`: ``x`` ``[N, H]`` contiguous, ``target`` ``[N]`` int64,
    ``token_weights`` ``[N]`` and ``divisor`` a 0-d tensor in :func:`wide_dtype` (``mean``:
    the valid count, or ``num_items_in_batch``) or None (``sum``/``none``).  ``kernel``: see
    :class:`RowSteps`.  ``compact``: skip the ignored rows when that saves a chunk
    (:class:`_Compaction`; single-process only).  ``ref``: ``(ref_x, ref_weight, ref_bias)`` of a
    second, frozen head on the same rows, for the two-head paths of the plan (``anchor``, ``distill``).

    Returns ``(loss, dx, dw, db, stats)``: the loss (0-d, or ``[N]`` for ``none``); for
    ``mean``/``sum`` the gradients for ``grad_output = 1`` (``dx`` in :func:`stash_dtype`,
    ``dw``/``db`` in the accumulator's; :func:`scale_stash` scales and casts them) (None
    where not needed, and always None for ``none``, whose backward recomputes); the
    stats sums (nll, prob, correct, entropy: 0-d, or empty when not computed).
    """
    compaction = _Compaction.plan(target, plan, weight.shape[0]) if compact else None
    # dW/db wait for backward like dX: a float16 accumulator would hold them for grad_output = 1, where
    # a mean's 1/N and a small objective weight push them below float16's normal range
    chunks, rows = _chunks_and_steps(x, weight, bias, ref, plan, plan.options.reduction != "none",
                                     stash_dtype(plan.accum_dtype), stash_dtype(x.dtype), compaction, kernel)
    if compaction is not None:
        target, token_weights = compaction.gather(target), compaction.gather(token_weights)
    loss, stats = _forward(chunks, rows, target, token_weights, divisor, plan, x.device, wide_dtype(x.dtype),
                           compaction)
    return loss, chunks.dx, chunks.dw, chunks.db, stats


def linear_backward_none(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         token_weights: Optional[Tensor], grad_loss: Tensor, plan: LossPlan, kernel=None,
                         compact: bool = False, ref: Optional[tuple] = None):
    """Backward of ``reduction="none"``: recompute each chunk with the per-token
    ``grad_loss`` folded into the row kernel's scale (``ref``: as :func:`linear_forward`).  Returns
    ``(dx, dw, db)`` in the dtypes of ``x``, ``weight``, ``bias`` (None where not needed)."""
    compaction = _Compaction.plan(target, plan, weight.shape[0]) if compact else None
    chunks, rows = _chunks_and_steps(x, weight, bias, ref, plan, True, plan.accum_dtype, x.dtype, compaction, kernel)
    grad_loss = grad_loss.to(wide_dtype(x.dtype)).contiguous()
    if compaction is not None:
        target, token_weights = compaction.gather(target), compaction.gather(token_weights)
        grad_loss = compaction.gather(grad_loss)
    _loss_pass(chunks, rows, target, token_weights, plan.chunk_size, grad_loss)
    db = _cast(chunks.db, weight.dtype if bias is None else bias.dtype)
    return chunks.dx, _cast(chunks.dw, weight.dtype), db


def logits_forward(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
                   plan: LossPlan, kernel=None):
    """The same row kernel on given ``[N, V]`` logits.  Returns ``(loss, grad, stats)`` with
    ``grad`` the logits gradient for ``grad_output = 1`` (``mean``/``sum`` with
    ``need_dx``; else None) in :func:`stash_dtype`."""
    chunks = GivenChunks(logits, plan.need_dx and plan.options.reduction != "none", stash_dtype(logits.dtype))
    loss, stats = _forward(chunks, RowSteps(plan, kernel), target, token_weights, divisor, plan, logits.device,
                           wide_dtype(logits.dtype))
    return loss, chunks.grad, stats


def logits_backward_none(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], grad_loss: Tensor,
                         plan: LossPlan, kernel=None) -> Tensor:
    """Backward of ``reduction="none"`` on given logits: the row kernel writes the gradient
    (``grad_output`` folded in) once, in the logits dtype."""
    chunks = GivenChunks(logits, True, logits.dtype)
    _loss_pass(chunks, RowSteps(plan, kernel), target, token_weights, plan.chunk_size,
               grad_loss.to(wide_dtype(logits.dtype)).contiguous())
    return chunks.grad


# ---------------------------------------------------------------- the log-prob family (docs/rl.md)


class LogprobSteps(RowSteps):
    """The plan's row steps of a log-prob call (path ``"logprobs"``), with :class:`RowSteps`' fallback.
    :meth:`__call__` runs ``row_logprobs`` on a chunk in the forward pass (``row_stats`` None) and
    ``row_logprobs_grad`` in the backward pass (the gradient written into ``grad_out``, or over the
    logits in place)."""

    def __call__(self, logits: Tensor, target: Tensor, temperature: Optional[Tensor], row_stats: Optional[Tensor],
                 grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], grad_out: Optional[Tensor],
                 row_scale: Optional[Tensor]):
        if row_stats is None:
            return self._run(lambda module, _: module.row_logprobs(logits, target, self.params, temperature)), None
        self._run(lambda module, _: module.row_logprobs_grad(logits, target, self.params, row_stats, grad_logp,
                                                             grad_entropy, temperature, grad_out))
        return None, None


class _LogprobOutputs:
    """The per-token outputs of a log-prob forward pass over ``n`` rows, filled chunk by chunk
    (:meth:`sink`); empty tensors where not computed (custom op outputs cannot be None)."""

    def __init__(self, n: int, params, dtype: torch.dtype, device):
        empty = lambda rows, dt=dtype: torch.empty(rows, dtype=dt, device=device)  # noqa: E731
        self.logp = empty(n)
        self.entropy = empty(n if params.with_entropy else 0)
        self.row_stats = torch.empty((n, 3), dtype=dtype, device=device)
        self.sum_sq = empty(n if params.with_stats else 0)
        self.top1 = empty(n if params.with_stats else 0, torch.bool)

    def sink(self, start: int, end: int, out) -> None:
        self.logp[start:end] = out.logp
        self.row_stats[start:end] = out.row_stats
        if out.entropy is not None:
            self.entropy[start:end] = out.entropy
        if out.sum_sq is not None:
            self.sum_sq[start:end] = out.sum_sq
            self.top1[start:end] = out.top1

    def tensors(self, compaction: Optional[_Compaction]) -> tuple:
        """``(logp, entropy, row_stats, sum_sq, top1)`` over all rows (zero at the ignored ones)."""
        outs = (self.logp, self.entropy, self.row_stats, self.sum_sq, self.top1)
        if compaction is None:
            return outs
        return tuple(t if t.numel() == 0 else compaction.scatter(t) for t in outs)


def logprobs_linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                            temperature: Optional[Tensor], plan, compact: bool = False) -> tuple:
    """Forward of :func:`dft_kernels.linear_logprobs`: ``(logp, entropy, row_stats, sum_sq, top1)``
    (:class:`_LogprobOutputs`), each chunk's logits made and read once; no gradient is formed here
    (backward recomputes the chunks, :func:`logprobs_linear_backward`).  ``x`` ``[N, H]`` contiguous,
    ``target`` ``[N]`` int64, ``temperature`` ``[N]`` in :func:`wide_dtype` or None."""
    compaction = _Compaction.plan(target, plan, weight.shape[0]) if compact else None
    chunks = LinearChunks(x, weight, bias, plan, False, plan.accum_dtype, x.dtype, compaction)
    if compaction is not None:
        target, temperature = compaction.gather(target), compaction.gather(temperature)
    outs = _LogprobOutputs(chunks.num_rows, plan.params, wide_dtype(x.dtype), x.device)
    run_chunks(chunks, LogprobSteps(plan), (target, temperature, None, None, None), plan.chunk_size, False,
               outs.sink)
    return outs.tensors(compaction)


def logprobs_linear_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             temperature: Optional[Tensor], row_stats: Tensor, grad_logp: Optional[Tensor],
                             grad_entropy: Optional[Tensor], plan, compact: bool = False):
    """Backward of :func:`dft_kernels.linear_logprobs`: every chunk's logits recomputed, its gradient
    for the upstream per-token ``grad_logp``/``grad_entropy`` (None: 0) written in one pass over the
    row from the forward's ``row_stats``, then the ``dX``/``dW``/``db`` GEMMs.  Returns ``(dx, dw,
    db)`` in the dtypes of ``x``, ``weight``, ``bias`` (None where the plan needs none)."""
    compaction = _Compaction.plan(target, plan, weight.shape[0]) if compact else None
    chunks = LinearChunks(x, weight, bias, plan, True, plan.accum_dtype, x.dtype, compaction)
    per_row = _logprob_grad_rows(target, temperature, row_stats, grad_logp, grad_entropy, x.dtype, compaction)
    run_chunks(chunks, LogprobSteps(plan), per_row, plan.chunk_size, chunks.wants_grad)
    db = _cast(chunks.db, weight.dtype if bias is None else bias.dtype)
    return chunks.dx, _cast(chunks.dw, weight.dtype), db


def logprobs_logits_forward(logits: Tensor, target: Tensor, temperature: Optional[Tensor], plan) -> tuple:
    """Forward of :func:`dft_kernels.logprobs` on given ``[N, V]`` logits (as
    :func:`logprobs_linear_forward`)."""
    chunks = GivenChunks(logits, False, logits.dtype)
    outs = _LogprobOutputs(chunks.num_rows, plan.params, wide_dtype(logits.dtype), logits.device)
    run_chunks(chunks, LogprobSteps(plan), (target, temperature, None, None, None), plan.chunk_size, False,
               outs.sink)
    return outs.tensors(None)


def logprobs_logits_backward(logits: Tensor, target: Tensor, temperature: Optional[Tensor], row_stats: Tensor,
                             grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], plan) -> Tensor:
    """Backward of :func:`dft_kernels.logprobs`: the logits gradient, written once in their dtype."""
    chunks = GivenChunks(logits, True, logits.dtype)
    per_row = _logprob_grad_rows(target, temperature, row_stats, grad_logp, grad_entropy, logits.dtype, None)
    run_chunks(chunks, LogprobSteps(plan), per_row, plan.chunk_size, True)
    return chunks.grad


def _logprob_grad_rows(target, temperature, row_stats, grad_logp, grad_entropy, dtype, compaction) -> tuple:
    """The backward pass's per-row arguments of :class:`LogprobSteps`, in :func:`wide_dtype`, contiguous
    (gathered to the valid rows with a compaction)."""
    wide = lambda t: None if t is None else t.to(wide_dtype(dtype)).contiguous()  # noqa: E731
    rows = (target, temperature, row_stats, wide(grad_logp), wide(grad_entropy))
    if compaction is None:
        return rows
    return tuple(compaction.gather(t) for t in rows)


# ---------------------------------------------------------------- the GEMMs of a chunk


class HeadGemms:
    """The three GEMMs of a chunk, with the precision policy of docs/design.md:

    * logits are computed in float32 (float64 for float64 inputs) even for 16-bit
      inputs: rounding logits to bfloat16 alone costs ~1% relative error on DFT-type
      losses, which a fused kernel must not add.  The fast mode (``logits_dtype`` equal to the
      16-bit input dtype) writes them in 16 bits instead, as the input-dtype GEMM does;
    * where the device has an ``mm`` that writes float32 from 16-bit operands
      (:data:`dft_kernels.options.MM_OUT_DTYPE`; CUDA), the 16-bit GEMMs use it, and the row kernel writes the
      gradient once in :attr:`grad_dtype`, the dtype the ``dX``/``dW`` GEMMs read: the input
      dtype for bfloat16, float32 for float16 (cast with a power-of-two scale, see
      :meth:`_backward_fp16`); elsewhere (CPU) a 16-bit weight is upcast once per call and
      every GEMM but the fast mode's logits runs in float32;
    * ``dW`` accumulates in ``accum_dtype`` in place; ``db`` likewise.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], logits_dtype: torch.dtype,
                 grad_dtype: torch.dtype):
        self.x_dtype = x.dtype
        self.compute_dtype = torch.promote_types(x.dtype, torch.float32)
        self.logits_dtype, self.grad_dtype = logits_dtype, grad_dtype  # the plan's (options.head_dtypes)
        self.weight, self.bias = weight, bias
        self.native = x.dtype == self.compute_dtype
        self.mm = None if self.native else mm_out_dtype(x.device)
        self.w_up = weight.to(self.compute_dtype) if not self.native and self.mm is None else None
        self._fp16: Optional[Tensor] = None  # float16 copy of the gradient (_backward_fp16), reused
        self._dx32: Optional[Tensor] = None  # float32 dX product of a factored gradient, reused
        self._xs: Optional[Tensor] = None  # x rows times the row factors, in the gradient's dtype, reused
        # bias in the dtype of the logits it is added to
        self.bias_l = None if bias is None or bias.dtype == self.logits_dtype else bias.to(self.logits_dtype)

    def logits_into(self, x_c: Tensor, out: Tensor) -> Tensor:
        """``out = x_c @ W^T (+ b)`` in ``out``'s dtype (:attr:`logits_dtype`)."""
        bias = self.bias if self.bias_l is None else self.bias_l
        if self.logits_dtype == self.x_dtype:  # float32/64 inputs, or the 16-bit fast mode
            w = self.weight
        elif self.mm is not None:
            self.mm(x_c, self.weight.t(), self.logits_dtype, out=out)
            return out if bias is None else out.add_(bias)
        else:
            x_c, w = x_c.to(self.logits_dtype), self.w_up
        if bias is None:
            return torch.mm(x_c, w.t(), out=out)
        return torch.addmm(bias, x_c, w.t(), out=out)

    def backward(self, grad: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                 db: Optional[Tensor], first: bool, row_scale: Optional[Tensor] = None) -> None:
        """``dx_c = grad @ W``; ``dw (+)= grad^T x_c`` (written by the ``first`` chunk,
        accumulated after); ``db += sum(grad)``.  ``grad`` (in :attr:`grad_dtype`, the row
        kernel's gradient buffer) may be overwritten.  With ``row_scale`` the gradient is
        ``row_scale[:, None] * grad`` (a factored row kernel; no ``db``, not float16): see
        :meth:`_backward_factored`."""
        if row_scale is not None:
            if db is not None or self.x_dtype == torch.float16:
                raise ValueError("row_scale: a factored gradient is for float32/bfloat16 inputs "
                                 "without a bias gradient")
            self._backward_factored(grad, row_scale, x_c, dx_c, dw, first)
            return
        if db is not None:
            db += grad.sum(dim=0, dtype=db.dtype)
        if self.mm is not None and self.x_dtype == torch.float16:
            self._backward_fp16(grad, x_c, dx_c, dw, first)
            return
        w = self.weight if self.w_up is None else self.w_up
        if dx_c is not None:
            if grad.dtype == dx_c.dtype:
                torch.mm(grad, w, out=dx_c)
            else:
                dx_c.copy_(grad @ w)
        if dw is not None:
            xc = x_c if x_c.dtype == grad.dtype else x_c.to(grad.dtype)
            _product_into(dw, grad.t(), xc, self.mm, first)

    def _backward_factored(self, grad: Tensor, row_scale: Tensor, x_c: Tensor, dx_c: Optional[Tensor],
                           dw: Optional[Tensor], first: bool) -> None:
        """``dx_c = r (grad @ W)`` and ``dw (+)= grad^T (r x_c)`` for the gradient ``r grad``
        (``r = row_scale`` per row).  The factor multiplies the float32 ``dX`` product before
        its one rounding to ``dx_c``'s dtype, and the chunk's ``x`` rows (rounded once to the
        gradient's dtype) before the ``dW`` GEMM: chunk-sized passes instead of a pass over the
        ``[C, V]`` gradient."""
        r = row_scale[:, None]
        w = self.weight if self.w_up is None else self.w_up
        if dx_c is not None:
            if dx_c.dtype == torch.float32 and grad.dtype == torch.float32:
                torch.mm(grad, w, out=dx_c).mul_(r)
            else:
                shape = (grad.shape[0], w.shape[1])
                if self._dx32 is None or self._dx32.shape[0] < shape[0]:
                    self._dx32 = torch.empty(shape, dtype=torch.float32, device=grad.device)
                prod = self._dx32[:shape[0]]
                if grad.dtype == torch.float32:
                    torch.mm(grad, w, out=prod)
                else:
                    self.mm(grad, w, torch.float32, out=prod)
                torch.mul(prod, r, out=dx_c)
        if dw is not None:
            if self._xs is None or self._xs.shape[0] < x_c.shape[0]:
                self._xs = torch.empty((x_c.shape[0], x_c.shape[1]), dtype=grad.dtype, device=grad.device)
            xs = torch.mul(x_c, r, out=self._xs[:x_c.shape[0]])
            _product_into(dw, grad.t(), xs, self.mm, first)

    def release(self) -> None:
        """Drop the reused per-call buffers (after the last chunk)."""
        self._fp16 = self._dx32 = self._xs = None

    def _backward_fp16(self, grad: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                       first: bool) -> None:
        """The ``dX``/``dW`` GEMMs on float16 operands with float32 products (``self.mm``).

        float16 has too little range for the float32 gradient: scaled by the reduction's
        ``1/N`` (and a DFT weight ``p``) its entries are often below float16's smallest
        subnormal (6e-8) and flush to zero, while a loss scale in ``grad_output`` (``none``)
        can push them past its largest value (65504).  So the gradient is multiplied by
        ``2^k`` (exact, computed on the device: no host sync) bringing the largest entry to
        ``[2^13, 2^14)`` before the cast, and the float32 products by ``2^-k`` after; a float32
        ``dW`` accumulator is scaled by ``2^k`` around the in-place accumulation (exact).
        """
        low, high = torch.aminmax(grad)  # the largest |entry|, without an |grad| temporary
        _, exponent = torch.frexp(torch.maximum(-low, high))
        shift = (_FP16_TOP_EXPONENT - exponent).clamp(-_MAX_SHIFT, _MAX_SHIFT)
        scale = torch.ldexp(torch.ones((), dtype=grad.dtype, device=grad.device), shift)
        unscale = scale.reciprocal()  # a power of two: exact
        if self._fp16 is None or self._fp16.shape[0] < grad.shape[0]:
            self._fp16 = torch.empty(grad.shape, dtype=torch.float16, device=grad.device)  # once per call
        g = self._fp16[:grad.shape[0]].copy_(grad.mul_(scale))
        if dx_c is not None:
            prod = self.mm(g, self.weight, torch.float32)
            dx_c.copy_(prod.mul_(unscale))
        if dw is None:
            return
        if dw.dtype == torch.float32:
            if first:
                self.mm(g.t(), x_c, torch.float32, out=dw)
            else:
                dw.mul_(scale)
                self.mm(g.t(), x_c, torch.float32, out=dw, accumulate=True)
            dw.mul_(unscale)
            return
        # a float16 accumulator (accum_dtype=None): float32 products of row blocks of dW, unscaled
        # and added (or written) block by block, so no [V, H] float32 temporary exists
        gt = g.t()
        for s in range(0, dw.shape[0], _DW_BLOCK_ROWS):
            prod = self.mm(gt[s:s + _DW_BLOCK_ROWS], x_c, torch.float32).mul_(unscale)
            if first:
                dw[s:s + _DW_BLOCK_ROWS].copy_(prod)
            else:
                dw[s:s + _DW_BLOCK_ROWS].add_(prod)


_FP16_TOP_EXPONENT = 14  # float16 gradients are scaled to a largest entry in [2^13, 2^14)
_MAX_SHIFT = 100  # 2^+-100 stays finite in float32 (all-zero or subnormal gradients)
_DW_BLOCK_ROWS = 8192  # rows of dW per float32 product when dW accumulates in float16


def _product_into(acc: Tensor, a: Tensor, b: Tensor, mm, first: bool) -> None:
    """``acc = a @ b`` (``first``) or ``acc += a @ b``, in place; ``acc`` may be wider than
    ``a``/``b``: 16-bit operands through the device's ``mm`` with float32 output, else the
    operands (chunk-sized) are cast to ``acc``'s dtype, never the ``[V, H]`` product."""
    if a.dtype != acc.dtype and mm is not None and acc.dtype == torch.float32:
        mm(a, b, torch.float32, out=acc, accumulate=not first)
        return
    if a.dtype != acc.dtype:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)
