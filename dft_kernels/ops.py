"""The chunked losses as torch custom ops (``torch.library.custom_op``) with autograd.

``torch.compile`` sees each call as one opaque op with a fake (shape-only) implementation,
so a training step that calls :func:`dft_kernels.linear_cross_entropy` compiles with
``fullgraph=True``: no graph break, and no host sync inside (``validate=False``).

Ops (namespace ``dft_kernels``)::

    lce_forward(x, weight, bias?, target, token_weights?, divisor?, plan, ref_x?, ref_weight?, ref_bias?)
        -> (loss, dx, dw, db, nll_sum, prob_sum, correct_sum, entropy_sum)
    lce_backward_none(x, weight, bias?, target, token_weights?, grad_loss, plan, ref_x?, ref_weight?, ref_bias?)
        -> (dx, dw, db)
    ce_forward(logits, target, token_weights?, divisor?, plan)
        -> (loss, grad, nll_sum, prob_sum, correct_sum, entropy_sum)
    ce_backward_none(logits, target, token_weights?, grad_loss, plan) -> grad

``plan`` is :meth:`ChunkPlan.encode` of the plan the entry point resolved (backend steps, path,
chunk rows, dtypes, which gradients); the ops decode it (cached) and run it as it is.  The ``ref_*``
tensors are a second, frozen head (the anchored loss, distillation), given with such a plan.  A
gradient output that is not computed is an empty tensor
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
from .options import decode_plan

__all__ = ["lce_forward", "lce_backward_none", "ce_forward", "ce_backward_none", "linear_logprobs_forward",
           "linear_logprobs_backward", "logprobs_forward", "logprobs_backward", "IMPLEMENTATIONS"]

_T8 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_T6 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_T3 = tuple[Tensor, Tensor, Tensor]


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty(0, dtype=dtype) if t is None else t


def _or_none(t: Tensor, wanted: bool) -> Optional[Tensor]:
    return t if wanted else None


def _stats_fake(device, plan: str, dtype: torch.dtype) -> tuple[Tensor, ...]:
    params = decode_plan(plan).params
    f32 = chunked.wide_dtype(dtype)
    shape = () if params.with_stats else (0,)
    ent_shape = () if params.with_stats and params.needs_entropy else (0,)
    return (torch.empty(shape, dtype=f32, device=device), torch.empty(shape, dtype=f32, device=device),
            torch.empty(shape, dtype=f32, device=device), torch.empty(ent_shape, dtype=f32, device=device))


def _per_token_loss(rows: Tensor, plan: str) -> Tensor:
    out_dtype = chunked.wide_dtype(rows.dtype)
    return rows.new_empty((rows.shape[0],) if decode_plan(plan).options.reduction == "none" else (), dtype=out_dtype)


def _autocast_off(impl):
    """Run an op's implementation with ``torch.autocast`` off: the ops compute in the dtypes of
    their inputs (the precision policy of :class:`dft_kernels.chunked.HeadGemms`), which an enclosing
    autocast would otherwise silently change (e.g. float32 GEMMs run in bfloat16).  The entry
    points cast the inputs to the autocast dtype instead (:mod:`dft_kernels.functional`)."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return impl(*args, **kwargs)

    return run


# ---------------------------------------------------------------- linear + loss
#
# With ``ref_weight`` (and ``ref_x``, ``ref_bias``): the loss of the trained head (x, weight, bias) with a
# second, frozen head read beside it, chunk by chunk: the anchored objective (``plan``: an anchored
# LossPlan's encoding) or distillation (a DistillPlan's).  The second head gets no gradient.


def _second_head(ref_x: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor]):
    return None if ref_weight is None else (ref_x, ref_weight, ref_bias)


@_autocast_off
def _lce_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                      token_weights: Optional[Tensor], divisor: Optional[Tensor], plan: str,
                      ref_x: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                      ref_bias: Optional[Tensor] = None) -> _T8:
    p = decode_plan(plan)
    loss, dx, dw, db, stats = chunked.linear_forward(x, weight, bias, target, token_weights, divisor, p,
                                                     compact=True, ref=_second_head(ref_x, ref_weight, ref_bias))
    stash_x, stash_w = chunked.stash_dtype(x.dtype), chunked.stash_dtype(p.accum_dtype)
    return (loss, _or_empty(dx, x, stash_x), _or_empty(dw, weight, stash_w), _or_empty(db, weight, stash_w),
            *stats)


lce_forward = torch.library.custom_op("dft_kernels::lce_forward", mutates_args=())(_lce_forward_impl)


@lce_forward.register_fake
def _(x, weight, bias, target, token_weights, divisor, plan, ref_x=None, ref_weight=None, ref_bias=None):
    p = decode_plan(plan)
    grads = p.options.reduction != "none"
    dx = x.new_empty(x.shape if grads and p.need_dx else (0,), dtype=chunked.stash_dtype(x.dtype))
    stash_w = chunked.stash_dtype(p.accum_dtype)
    dw = weight.new_empty(weight.shape if grads and p.need_dw else (0,), dtype=stash_w)
    has_db = grads and p.need_db and bias is not None
    db = weight.new_empty((weight.shape[0],) if has_db else (0,), dtype=stash_w)
    return (_per_token_loss(x, plan), dx, dw, db, *_stats_fake(x.device, plan, x.dtype))


@_autocast_off
def _lce_backward_none_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                            token_weights: Optional[Tensor], grad_loss: Tensor, plan: str,
                            ref_x: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                            ref_bias: Optional[Tensor] = None) -> _T3:
    dx, dw, db = chunked.linear_backward_none(x, weight, bias, target, token_weights, grad_loss, decode_plan(plan),
                                              compact=True, ref=_second_head(ref_x, ref_weight, ref_bias))
    return _or_empty(dx, x), _or_empty(dw, weight), _or_empty(db, weight)


lce_backward_none = torch.library.custom_op("dft_kernels::lce_backward_none", mutates_args=())(
    _lce_backward_none_impl)


@lce_backward_none.register_fake
def _(x, weight, bias, target, token_weights, grad_loss, plan, ref_x=None, ref_weight=None, ref_bias=None):
    return _grads_fake(x, weight, bias, decode_plan(plan))


def _grads_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], p) -> _T3:
    dx = x.new_empty(x.shape if p.need_dx else (0,))
    dw = weight.new_empty(weight.shape if p.need_dw else (0,))
    db = weight.new_empty((weight.shape[0],) if p.need_db and bias is not None else (0,))
    return dx, dw, db


def _lce_setup_context(ctx, inputs, output):
    x, weight, bias, target, token_weights, _divisor, plan, *second = inputs
    p = decode_plan(plan)
    ctx.num_inputs = len(inputs)
    ctx.reduction = p.options.reduction
    ctx.need = (p.need_dx, p.need_dw, p.need_db and bias is not None)
    # Only the loss is differentiable.  Without this, backward would materialise zero
    # gradients for the dx/dw/db outputs: one more [V, H] (and [N, H]) buffer at the peak.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.reduction == "none":
        ctx.save_for_backward(x, weight, bias, target, token_weights, *second)
        ctx.plan = plan
    else:
        ctx.save_for_backward(*output[1:4])
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _lce_backward(ctx, grad_loss, *_unused):
    need_dx, need_dw, need_db = ctx.need
    if grad_loss is None:  # no gradient reached the loss (set_materialize_grads(False))
        return (None,) * ctx.num_inputs
    if ctx.reduction == "none":
        x, weight, bias, target, token_weights, *second = ctx.saved_tensors
        dx, dw, db = torch.ops.dft_kernels.lce_backward_none(x, weight, bias, target, token_weights, grad_loss,
                                                             ctx.plan, *second)
        grads = (_or_none(dx, need_dx), _or_none(dw, need_dw), _or_none(db, need_db))
    else:
        stashes = (t if wanted else None for t, wanted in zip(ctx.saved_tensors, ctx.need))
        grads = chunked.scale_stashes(ctx, stashes, grad_loss, ctx.dtypes)
    return (*grads, *(None,) * (ctx.num_inputs - len(grads)))  # x, weight, bias; never the second head


torch.library.register_autograd("dft_kernels::lce_forward", _lce_backward, setup_context=_lce_setup_context)


# ---------------------------------------------------------------- loss on given logits


@_autocast_off
def _ce_forward_impl(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], divisor: Optional[Tensor],
                     plan: str) -> _T6:
    loss, grad, stats = chunked.logits_forward(logits, target, token_weights, divisor, decode_plan(plan))
    return (loss, _or_empty(grad, logits, chunked.stash_dtype(logits.dtype)), *stats)


ce_forward = torch.library.custom_op("dft_kernels::ce_forward", mutates_args=())(_ce_forward_impl)


@ce_forward.register_fake
def _(logits, target, token_weights, divisor, plan):
    p = decode_plan(plan)
    has_grad = p.options.reduction != "none" and p.need_dx
    grad = logits.new_empty(logits.shape if has_grad else (0,), dtype=chunked.stash_dtype(logits.dtype))
    return (_per_token_loss(logits, plan), grad, *_stats_fake(logits.device, plan, logits.dtype))


@_autocast_off
def _ce_backward_none_impl(logits: Tensor, target: Tensor, token_weights: Optional[Tensor], grad_loss: Tensor,
                           plan: str) -> Tensor:
    return chunked.logits_backward_none(logits, target, token_weights, grad_loss, decode_plan(plan))


ce_backward_none = torch.library.custom_op("dft_kernels::ce_backward_none", mutates_args=())(
    _ce_backward_none_impl)


@ce_backward_none.register_fake
def _(logits, target, token_weights, grad_loss, plan):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, target, token_weights, _divisor, plan = inputs
    p = decode_plan(plan)
    ctx.num_inputs = len(inputs)
    ctx.reduction, ctx.need_grad, ctx.logits_dtype = p.options.reduction, p.need_dx, logits.dtype
    # Only the loss is differentiable (else backward would allocate zeros for the [N, V] grad output).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.reduction == "none":
        ctx.save_for_backward(logits, target, token_weights)
        ctx.plan = plan
    else:
        ctx.save_for_backward(output[1])


def _ce_backward(ctx, grad_loss, *_unused):
    grad = None
    if ctx.need_grad and grad_loss is not None:  # None: no gradient reached the loss
        if ctx.reduction == "none":
            logits, target, token_weights = ctx.saved_tensors
            grad = torch.ops.dft_kernels.ce_backward_none(logits, target, token_weights, grad_loss, ctx.plan)
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


# ---------------------------------------------------------------- the log-prob family (docs/rl.md)
#
#   linear_logprobs_forward(x, weight, bias?, target, temperature?, plan)
#       -> (logp, entropy, row_stats, sum_sq, top1)
#   linear_logprobs_backward(x, weight, bias?, target, temperature?, row_stats, grad_logp?, grad_entropy?, plan)
#       -> (dx, dw, db)
#   logprobs_forward(logits, target, temperature?, plan) -> (logp, entropy, row_stats, sum_sq, top1)
#   logprobs_backward(logits, target, temperature?, row_stats, grad_logp?, grad_entropy?, plan) -> grad
#
# ``plan`` is :meth:`LogprobPlan.encode`'s string.  ``logp`` and ``entropy`` are differentiable (an
# entropy that was not asked for is an empty tensor); ``row_stats`` ([N, 3]: what backward reads
# instead of a second pass over each row), ``sum_sq`` and ``top1`` are not.  Backward recomputes
# every chunk's logits and writes the gradient of both outputs in one pass over each row.

_T5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _logprob_outputs_fake(rows: Tensor, plan: str) -> _T5:
    params = decode_plan(plan).params
    n, wide = rows.shape[0], chunked.wide_dtype(rows.dtype)
    new = lambda shape, dtype=wide: rows.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new((n,)), new((n if params.with_entropy else 0,)), new((n, 3)), new((n if params.with_stats else 0,)),
            new((n if params.with_stats else 0,), torch.bool))


@_autocast_off
def _linear_logprobs_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                  temperature: Optional[Tensor], plan: str) -> _T5:
    return chunked.logprobs_linear_forward(x, weight, bias, target, temperature, decode_plan(plan),
                                           compact=True)


linear_logprobs_forward = torch.library.custom_op("dft_kernels::linear_logprobs_forward", mutates_args=())(
    _linear_logprobs_forward_impl)


@linear_logprobs_forward.register_fake
def _(x, weight, bias, target, temperature, plan):
    return _logprob_outputs_fake(x, plan)


@_autocast_off
def _linear_logprobs_backward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                   temperature: Optional[Tensor], row_stats: Tensor, grad_logp: Optional[Tensor],
                                   grad_entropy: Optional[Tensor], plan: str) -> _T3:
    dx, dw, db = chunked.logprobs_linear_backward(x, weight, bias, target, temperature, row_stats, grad_logp,
                                                  grad_entropy, decode_plan(plan), compact=True)
    return _or_empty(dx, x), _or_empty(dw, weight), _or_empty(db, weight)


linear_logprobs_backward = torch.library.custom_op("dft_kernels::linear_logprobs_backward", mutates_args=())(
    _linear_logprobs_backward_impl)


@linear_logprobs_backward.register_fake
def _(x, weight, bias, target, temperature, row_stats, grad_logp, grad_entropy, plan):
    return _grads_fake(x, weight, bias, decode_plan(plan))


def _linear_logprobs_setup_context(ctx, inputs, output):
    x, weight, bias, target, temperature, plan = inputs
    p = decode_plan(plan)
    ctx.num_inputs, ctx.plan = len(inputs), plan
    ctx.need = (p.need_dx, p.need_dw, p.need_db and bias is not None)
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, target, temperature, output[2])


def _linear_logprobs_backward(ctx, grad_logp, grad_entropy, *_unused):
    if grad_logp is None and grad_entropy is None:  # no gradient reached either output
        return (None,) * ctx.num_inputs
    x, weight, bias, target, temperature, row_stats = ctx.saved_tensors
    dx, dw, db = torch.ops.dft_kernels.linear_logprobs_backward(x, weight, bias, target, temperature, row_stats,
                                                                grad_logp, grad_entropy, ctx.plan)
    need_dx, need_dw, need_db = ctx.need
    grads = (_or_none(dx, need_dx), _or_none(dw, need_dw), _or_none(db, need_db))
    return (*grads, *(None,) * (ctx.num_inputs - len(grads)))


torch.library.register_autograd("dft_kernels::linear_logprobs_forward", _linear_logprobs_backward,
                                setup_context=_linear_logprobs_setup_context)


@_autocast_off
def _logprobs_forward_impl(logits: Tensor, target: Tensor, temperature: Optional[Tensor], plan: str) -> _T5:
    return chunked.logprobs_logits_forward(logits, target, temperature, decode_plan(plan))


logprobs_forward = torch.library.custom_op("dft_kernels::logprobs_forward", mutates_args=())(_logprobs_forward_impl)


@logprobs_forward.register_fake
def _(logits, target, temperature, plan):
    return _logprob_outputs_fake(logits, plan)


@_autocast_off
def _logprobs_backward_impl(logits: Tensor, target: Tensor, temperature: Optional[Tensor], row_stats: Tensor,
                            grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], plan: str) -> Tensor:
    return chunked.logprobs_logits_backward(logits, target, temperature, row_stats, grad_logp, grad_entropy,
                                            decode_plan(plan))


logprobs_backward = torch.library.custom_op("dft_kernels::logprobs_backward", mutates_args=())(
    _logprobs_backward_impl)


@logprobs_backward.register_fake
def _(logits, target, temperature, row_stats, grad_logp, grad_entropy, plan):
    return torch.empty_like(logits)


def _logprobs_setup_context(ctx, inputs, output):
    logits, target, temperature, plan = inputs
    ctx.num_inputs, ctx.plan = len(inputs), plan
    ctx.need_grad = decode_plan(plan).need_dx
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, temperature, output[2])


def _logprobs_backward(ctx, grad_logp, grad_entropy, *_unused):
    grad = None
    if ctx.need_grad and (grad_logp is not None or grad_entropy is not None):
        logits, target, temperature, row_stats = ctx.saved_tensors
        grad = torch.ops.dft_kernels.logprobs_backward(logits, target, temperature, row_stats, grad_logp,
                                                       grad_entropy, ctx.plan)
    return (grad, *(None,) * (ctx.num_inputs - 1))


torch.library.register_autograd("dft_kernels::logprobs_forward", _logprobs_backward,
                                setup_context=_logprobs_setup_context)

IMPLEMENTATIONS.update({
    "dft_kernels::linear_logprobs_forward": _linear_logprobs_forward_impl,
    "dft_kernels::linear_logprobs_backward": _linear_logprobs_backward_impl,
    "dft_kernels::logprobs_forward": _logprobs_forward_impl,
    "dft_kernels::logprobs_backward": _logprobs_backward_impl,
})
