"""Autograd for the vocab-parallel losses: the chunk drivers of :mod:`dft_kernels.chunked` run with a
:class:`~dft_kernels.vocab_parallel.row_kernel.VocabParallelRowKernel` as their row backend and this
rank's slice of the head (or of the logits); the input gradient is all-reduced over the group unless
the caller reduces it itself (``allreduce_dgrad=False``).

As on one rank, ``mean``/``sum`` compute the gradients in forward and backward scales them;
``none`` recomputes in backward (two collectives per chunk again, plus the ``dX`` all-reduce), so
every rank must run backward.  These are ``torch.autograd.Function`` s, not custom ops: a process
group is not a custom-op argument, and ``torch.compile`` of the vocab-parallel path is not supported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import chunked
from ..options import LossPlan

__all__ = ["ParallelRun", "linear_loss", "logits_loss"]


@dataclass(frozen=True)
class ParallelRun:
    """What one vocab-parallel call runs with, besides its tensors: the plan (chunk rows,
    accumulator dtype, which gradients), the row kernel over this rank's slice, the group."""

    plan: LossPlan                 # or a DistillPlan
    kernel: object                 # VocabParallelRowKernel, or VocabParallelPairKernel for two heads
    group: object                  # the tensor-parallel ProcessGroup
    allreduce_dgrad: bool = True   # False: the caller reduces dX itself

    @property
    def opts(self):
        return self.plan.options


def _autocast_off(method):
    """Forward/backward with ``torch.autocast`` off: the chunk driver computes in its inputs' dtypes
    (the precision policy), which the entry point has already cast to the autocast dtype."""

    @functools.wraps(method)
    def run(ctx, first, *args):
        with torch.autocast(first.device.type if first is not None else "cpu", enabled=False):
            return method(ctx, first, *args)

    return run


def _allreduce_dgrad(dx: Optional[Tensor], run: ParallelRun) -> None:
    if dx is not None and run.allreduce_dgrad:
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=run.group)


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, x, weight, bias, target, token_weights, divisor, run: ParallelRun, ref: Optional[tuple]):
        loss, dx, dw, db, stats = chunked.linear_forward(x, weight, bias, target, token_weights, divisor, run.plan,
                                                         run.kernel, ref=ref)
        _allreduce_dgrad(dx, run)
        ctx.run = run
        ctx.ref = ref if run.opts.reduction == "none" else None  # detached, frozen: not a graph input
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)
        if run.opts.reduction == "none":
            ctx.save_for_backward(x, weight, bias, target, token_weights)
        else:
            ctx.save_for_backward(dx, dw, db)
            ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (loss, *stats)

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_loss, *_stats):
        run: ParallelRun = ctx.run
        if grad_loss is None:
            return (None,) * 8
        if run.opts.reduction == "none":
            x, weight, bias, target, token_weights = ctx.saved_tensors
            dx, dw, db = chunked.linear_backward_none(x, weight, bias, target, token_weights, grad_loss, run.plan,
                                                      run.kernel, ref=ctx.ref)
            _allreduce_dgrad(dx, run)
        else:
            dx, dw, db = chunked.scale_stashes(ctx, ctx.saved_tensors, grad_loss, ctx.dtypes)
        return dx, dw, db, None, None, None, None, None


class _LogitsLoss(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, logits, target, token_weights, divisor, run: ParallelRun):
        loss, grad, stats = chunked.logits_forward(logits, target, token_weights, divisor, run.plan, run.kernel)
        ctx.run = run
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)
        ctx.logits_dtype = logits.dtype
        if run.opts.reduction == "none":
            ctx.save_for_backward(logits, target, token_weights)
        else:
            ctx.save_for_backward(grad)
        return (loss, *stats)

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_loss, *_stats):
        run: ParallelRun = ctx.run
        if grad_loss is None or not run.plan.need_dx:
            return (None,) * 5
        if run.opts.reduction == "none":
            logits, target, token_weights = ctx.saved_tensors
            grad = chunked.logits_backward_none(logits, target, token_weights, grad_loss, run.plan, run.kernel)
        else:
            (stash,) = ctx.saved_tensors
            (grad,) = chunked.scale_stashes(ctx, (stash,), grad_loss, (ctx.logits_dtype,))
        return grad, None, None, None, None


def linear_loss(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, token_weights: Optional[Tensor],
                divisor: Optional[Tensor], run: ParallelRun, ref: Optional[tuple] = None):
    """``(loss, nll_sum, prob_sum, correct_sum, entropy_sum)`` of the head slice ``weight``/``bias``
    (gradients to ``x`` — the full one unless ``allreduce_dgrad=False`` — and to this rank's slice).
    ``ref``: ``(ref_x, ref_weight, ref_bias)``, this rank's slice of a frozen second head (the anchor's
    reference, distillation's teacher), with a :class:`~dft_kernels.vocab_parallel.pair_kernel.
    VocabParallelPairKernel` as ``run.kernel``."""
    return _LinearLoss.apply(x, weight, bias, target, token_weights, divisor, run, ref)


def logits_loss(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
                run: ParallelRun):
    """The same on this rank's ``[N, V_r]`` slice of the logits (``run.plan.need_dx``: the logits need a gradient)."""
    return _LogitsLoss.apply(logits, target, token_weights, divisor, run)
