"""Public functional API: build the options, check and flatten the arguments, dispatch to the ops.

``linear_cross_entropy`` computes the loss from hidden states and the head weight,
chunk by chunk; ``cross_entropy`` runs the same row kernel on logits you already have.
The options and their defaults are declared once, in :class:`dft_kernels.options.LossOptions`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .checks import NumItems, Prepared, check_linear_args, check_logits, count_valid, prepare
from .chunked import chunk_row_bytes, default_chunk_size
from .objectives import ObjectiveLike
from .options import LossOptions, document_options
from .stats import LossStats
from .vocab_parallel.shard import is_dtensor

__all__ = ["linear_cross_entropy", "cross_entropy"]


def finish(loss: Tensor, stats_sums, prep: Prepared, opts: LossOptions, vocab_size: int):
    """Reshape a per-token loss (undoing the shift padding) and build LossStats."""
    if opts.reduction == "none":
        loss = loss.view(prep.out_shape)
        if opts.shift:
            loss = loss[..., :-1]
    if not opts.return_stats:
        return loss
    nll, prob, correct, ent = stats_sums
    num = count_valid(prep.target, opts.ignore_index, vocab_size)
    stats = LossStats.from_sums(num, nll, prob, correct, ent if ent.numel() == 1 else None)
    return loss, stats


def _autocast_cast(*tensors):
    """Inside ``torch.autocast``, the 16/32-bit float tensors cast once to the autocast dtype (a
    differentiable cast: gradients come back in the callers' dtypes), so that the loss is the
    one on inputs of that dtype, with its precision policy.  The ops themselves run with
    autocast off (:func:`dft_kernels.ops._autocast_off`)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_CASTS else t for t in tensors)


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # as autocast: float64 stays


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


@document_options
def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    objective: ObjectiveLike = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weights: Optional[Tensor] = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = torch.float32,
    logits_dtype: Optional[torch.dtype] = None,
    process_group=None,
    allreduce_dgrad: bool = True,
    validate: bool = True,
):
    """Loss of ``objective`` on logits ``input @ weight.T (+ bias)``, never materialising them.

    ``input (..., H)``, ``weight (V, H)``, ``target (...)`` int64; ``bias (V,)`` or None;
    ``token_weights (...)`` float multiplies each token's loss (no gradient);
    ``num_items_in_batch``: divide the summed loss by it instead (Hugging Face's gradient
    accumulation convention).  Returns the loss (0-d for ``mean``/``sum``, ``target``-shaped
    for ``none``), or ``(loss, LossStats)`` when ``return_stats``.  With ``process_group`` (or
    a DTensor ``weight`` sharded over the vocabulary), ``weight``/``bias`` are this rank's slice.
    """
    opts = LossOptions.from_arguments(locals())
    if opts.process_group is not None or is_dtensor(weight) or is_dtensor(input):
        from .vocab_parallel.functional import vocab_parallel_linear

        return vocab_parallel_linear(input, weight, target, bias, opts, num_items_in_batch, token_weights)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    vocab_size, hidden = weight.shape
    prep = prepare(input, "input", target, vocab_size, opts, num_items_in_batch, token_weights)
    x = _contiguous(input.reshape(-1, hidden))
    if opts.logits_dtype is not None and opts.logits_dtype != input.dtype:
        raise ValueError(f"logits_dtype={opts.logits_dtype} (the fast mode) needs input and weight of that dtype, "
                         f"got {input.dtype}")
    # chunk buffers: float32 logits (float64 for float64 input; 16-bit in the fast mode) and,
    # where the GEMMs read it in another dtype, the gradient (chunked.HeadGemms)
    chunk = opts.chunk_size or default_chunk_size(x.shape[0], vocab_size,
                                                  chunk_row_bytes(input.dtype, opts.logits_dtype, input.device),
                                                  device_type=input.device.type)
    accum = weight.dtype if opts.accum_dtype is None else torch.promote_types(opts.accum_dtype, weight.dtype)
    grad_on = torch.is_grad_enabled()
    loss, _dx, _dw, _db, *stats_sums = ops.lce_forward(
        x, _contiguous(weight), bias, prep.target, prep.token_weights, prep.divisor,
        opts.encode(chunk_size=chunk, accum_dtype=accum), grad_on and x.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad)
    return finish(loss, stats_sums, prep, opts, vocab_size)


@document_options
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    objective: ObjectiveLike = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weights: Optional[Tensor] = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
    validate: bool = True,
):
    """The same objectives on logits you already hold: ``logits (..., V)``, ``target (...)``.

    The gradient goes to ``logits``; the caller's logits are not modified.  The other
    arguments are those of :func:`linear_cross_entropy`; with ``process_group`` (or a DTensor
    sharded over its last dim), ``logits`` are this rank's ``(..., V_local)`` slice.
    """
    opts = LossOptions.from_arguments(locals())
    if opts.process_group is not None or is_dtensor(logits):
        from .vocab_parallel.functional import vocab_parallel_logits

        return vocab_parallel_logits(logits, target, opts, num_items_in_batch, token_weights)
    logits = check_logits(logits)
    vocab_size = logits.shape[-1]
    prep = prepare(logits, "logits", target, vocab_size, opts, num_items_in_batch, token_weights)
    flat = _contiguous(logits.reshape(-1, vocab_size))
    # the gradient buffer (in its stash dtype) is the only chunk-sized buffer
    chunk = opts.chunk_size or default_chunk_size(flat.shape[0], vocab_size, max(4, logits.element_size()),
                                                  device_type=logits.device.type)
    loss, _grad, *stats_sums = ops.ce_forward(
        flat, prep.target, prep.token_weights, prep.divisor, opts.encode(chunk_size=chunk),
        torch.is_grad_enabled() and flat.requires_grad)
    return finish(loss, stats_sums, prep, opts, vocab_size)

