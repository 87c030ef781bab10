"""The chunked losses as torch custom ops (``torch.library.custom_op``) with autograd.

``torch.compile`` sees each call as one opaque op with a fake (shape-only) implementation,
so a training step that calls :func:`dft_kernels.linear_cross_entropy` compiles with
``fullgraph=True``: no graph break, and no host sync inside (``validate=False``).

Ops (namespace ``dft_kernels``)::

    lce_forward(x, weight, bias?, target, token_weights?, divisor?, options, need_dx, need_dw, need_db)
        -> (loss, dx, dw, db, nll_sum, prob_sum, correct_sum, entropy_sum)
    lce_backward_none(x, weight, bias?, target, token_weights?, grad_loss, options, need_dx, need_dw, need_db)
        -> (dx, dw, db)
    ce_forward(logits, target, token_weights?, divisor?, options, need_grad)
        -> (loss, grad, nll_sum, prob_sum, correct_sum, entropy_sum)
    ce_backward_none(logits, target, token_weights?, grad_loss, options) -> grad

``options`` is :meth:`LossOptions.encode` of the call's options, with ``chunk_size`` and
``accum_dtype`` already resolved; the ops decode it and resolve the backend (once per op
call, before any work).  A gradient output that is not computed is an empty tensor
(custom ops cannot return None); so is a stats sum that is not computed.  For
``mean``/``sum`` the forward op already returns the gradients for ``grad_output = 1``
and the registered backward scales them in place (:func:`dft_kernels.chunked.scale_stash`;
a second backward through the same graph gets a scaled copy); for ``none`` the backward op
recomputes.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import chunked
from .backends import resolve_backend
from .options import decode

__all__ = ["lce_forward", "lce_backward_none", "ce_forward", "ce_backward_none", "IMPLEMENTATIONS"]

_T8 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_T6 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_T3 = tuple[Tensor, Tensor, Tensor]


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty(0, dtype=dtype) if t is None else t


def _or_none(t: Tensor, wanted: bool) -> Optional[Tensor]:
    return t if wanted else None


def _stats_fake(device, options: str, dtype: torch.dtype) -> tuple[Tensor, ...]:
    opts = decode(options)
    f32 = chunked.wide_dtype(dtype)
    shape = () if opts.return_stats else (0,)
    ent_shape = () if opts.return_stats and opts.objective.needs_entropy else (0,)
    return (torch.empty(shape, dtype=f32, device=device), torch.empty(shape, dtype=f32, device=device),
            torch.empty(shape, dtype=f32, device=device), torch.empty(ent_shape, dtype=f32, device=device))


def _per_token_loss(rows: Tensor, options: str) -> Tensor:
    out_dtype = chunked.wide_dtype(rows.dtype)
    return rows.new_empty((rows.shape[0],) if decode(options).reduction == "none" else (), dtype=out_dtype)


def _autocast_off(impl):
    """Run an op's implementation with ``torch.autocast`` off: the ops compute in the dtypes of
    their inputs (the precision policy of :mod:`dft_kernels.gemm_policy`), which an enclosing
    autocast would otherwise silently change (e.g. float32 GEMMs run in bfloat16).  The entry
    points cast the inputs to the autocast dtype instead (:mod:`dft_kernels.functional`)."""

    @functools.wraps(impl)
    def run(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return impl(*args)

    return run


# ---------------------------------------------------------------- linear + loss


@_autocast_off
def _lce_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                      token_weights: Optional[Tensor], divisor: Optional[Tensor], options: str,
                      need_dx: bool, need_dw: bool, need_db: bool) -> _T8:
    opts = decode(options)
    be = resolve_backend(opts.backend, x.device)
    loss, dx, dw, db, stats = chunked.linear_forward(
        x, weight, bias, target, token_weights, divisor, opts, be, need_dx, need_dw, need_db, compact=True)
    stash_x, stash_w = chunked.stash_dtype(x.dtype), chunked.stash_dtype(opts.accum_dtype)
    return (loss, _or_empty(dx, x, stash_x), _or_empty(dw, weight, stash_w), _or_empty(db, weight, stash_w),
            *stats)


lce_forward = torch.library.custom_op("dft_kernels::lce_forward", mutates_args=())(_lce_forward_impl)


@lce_forward.register_fake
def _(x, weight, bias, target, token_weights, divisor, options, need_dx, need_dw, need_db):
    opts = decode(options)
    grads = opts.reduction != "none"
    dx = x.new_empty(x.shape if grads and need_dx else (0,), dtype=chunked.stash_dtype(x.dtype))
    stash_w = chunked.stash_dtype(opts.accum_dtype)
    dw = weight.new_empty(weight.shape if grads and need_dw else (0,), dtype=stash_w)
    has_db = grads and need_db and bias is not None
    db = weight.new_empty((weight.shape[0],) if has_db else (0,), dtype=stash_w)
    return (_per_token_loss(x, options), dx, dw, db, *_stats_fake(x.device, options, x.dtype))


@_autocast_off
def _lce_backward_none_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                            token_weights: Optional[Tensor], grad_loss: Tensor, options: str,
                            need_dx: bool, need_dw: bool, need_db: bool) -> _T3:
    opts = decode(options)
    be = resolve_backend(opts.backend, x.device)
    dx, dw, db = chunked.linear_backward_none(x, weight, bias, target, token_weights, grad_loss, opts, be,
                                              need_dx, need_dw, need_db, compact=True)
    return _or_empty(dx, x), _or_empty(dw, weight), _or_empty(db, weight)


lce_backward_none = torch.library.custom_op("dft_kernels::lce_backward_none", mutates_args=())(
    _lce_backward_none_impl)


@lce_backward_none.register_fake
def _(x, weight, bias, target, token_weights, grad_loss, options, need_dx, need_dw, need_db):
    dx = x.new_empty(x.shape if need_dx else (0,))
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    db = weight.new_empty((weight.shape[0],) if need_db and bias is not None else (0,))
    return dx, dw, db


def _lce_setup_context(ctx, inputs, output):
    x, weight, bias, target, token_weights, _divisor, options, need_dx, need_dw, need_db = inputs
    ctx.num_inputs = len(inputs)
    ctx.reduction = decode(options).reduction
    ctx.need = (need_dx, need_dw, need_db and bias is not None)
    # Only the loss is differentiable.  Without this, backward would materialise zero
    # gradients for the dx/dw/db outputs: one more [V, H] (and [N, H]) buffer at the peak.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.reduction == "none":
        ctx.save_for_backward(x, weight, bias, target, token_weights)
        ctx.options = options
    else:
        ctx.save_for_backward(*output[1:4])
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _lce_backward(ctx, grad_loss, *_unused):
    need_dx, need_dw, need_db = ctx.need
    if grad_loss is None:  # no gradient reached the loss (set_materialize_grads(False))
        return (None,) * ctx.num_inputs
    if ctx.reduction == "none":
        x, weight, bias, target, token_weights = ctx.saved_tensors
        dx, dw, db = torch.ops.dft_kernels.lce_backward_none(
            x, weight, bias, target, token_weights, grad_loss, ctx.options, need_dx, need_dw, need_db)
        grads = (_or_none(dx, need_dx), _or_none(dw, need_dw), _or_none(db, need_db))
    else:
        stashes = (t if wanted else None for t, wanted in zip(ctx.saved_tensors, ctx.need))
        grads = chunked.scale_stashes(ctx, stashes, grad_loss, ctx.dtypes)
    return (*grads, *(None,) * (ctx.num_inputs - len(grads)))  # x, weight, bias; nothing else


torch.library.register_autograd("dft_kernels::lce_forward", _lce_backward, setup_context=_lce_setup_context)


# ---------------------------------------------------------------- loss on given logits


@_autocast_off
def _ce_forward_impl(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
                     options: str, need_grad: bool) -> _T6:
    opts = decode(options)
    be = resolve_backend(opts.backend, logits.device)
    loss, grad, stats = chunked.logits_forward(logits, target, token_weights, divisor, opts, be, need_grad)
    return (loss, _or_empty(grad, logits, chunked.stash_dtype(logits.dtype)), *stats)


ce_forward = torch.library.custom_op("dft_kernels::ce_forward", mutates_args=())(_ce_forward_impl)


@ce_forward.register_fake
def _(logits, target, token_weights, divisor, options, need_grad):
    has_grad = decode(options).reduction != "none" and need_grad
    grad = logits.new_empty(logits.shape if has_grad else (0,), dtype=chunked.stash_dtype(logits.dtype))
    return (_per_token_loss(logits, options), grad, *_stats_fake(logits.device, options, logits.dtype))


@_autocast_off
def _ce_backward_none_impl(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], grad_loss: Tensor,
                           options: str) -> Tensor:
    opts = decode(options)
    be = resolve_backend(opts.backend, logits.device)
    return chunked.logits_backward_none(logits, target, token_weights, grad_loss, opts, be)


ce_backward_none = torch.library.custom_op("dft_kernels::ce_backward_none", mutates_args=())(
    _ce_backward_none_impl)


@ce_backward_none.register_fake
def _(logits, target, token_weights, grad_loss, options):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, target, token_weights, _divisor, options, need_grad = inputs
    ctx.num_inputs = len(inputs)
    ctx.reduction, ctx.need_grad, ctx.logits_dtype = decode(options).reduction, need_grad, logits.dtype
    # Only the loss is differentiable (else backward would allocate zeros for the [N, V] grad output).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.reduction == "none":
        ctx.save_for_backward(logits, target, token_weights)
        ctx.options = options
    else:
        ctx.save_for_backward(output[1])


def _ce_backward(ctx, grad_loss, *_unused):
    grad = None
    if ctx.need_grad and grad_loss is not None:  # None: no gradient reached the loss
        if ctx.reduction == "none":
            logits, target, token_weights = ctx.saved_tensors
            grad = torch.ops.dft_kernels.ce_backward_none(logits, target, token_weights, grad_loss, ctx.options)
        else:
            (stash,) = ctx.saved_tensors
            (grad,) = chunked.scale_stashes(ctx, (stash,), grad_loss, (ctx.logits_dtype,))
    return (grad, *(None,) * (ctx.num_inputs - 1))  # logits only


torch.library.register_autograd("dft_kernels::ce_forward", _ce_backward, setup_context=_ce_setup_context)


# qualified op name -> its eager Python implementation (for tools that trace inside the ops,
# e.g. the memory recorder in tests/test_memory.py)
IMPLEMENTATIONS = {
    "dft_kernels::lce_forward": _lce_forward_impl,
    "dft_kernels::lce_backward_none": _lce_backward_none_impl,
    "dft_kernels::ce_forward": _ce_forward_impl,
    "dft_kernels::ce_backward_none": _ce_backward_none_impl,
}
