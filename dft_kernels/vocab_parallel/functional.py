"""The vocab-parallel branch of :func:`dft_kernels.linear_cross_entropy` and :func:`dft_kernels.cross_entropy`:
unwrap DTensors, learn the slice layout, check the arguments against the *global* vocabulary, run the
chunked loss with the vocab-parallel row kernel.  ``dft_kernels.functional`` calls these when a
``process_group`` is given or an operand is a DTensor; with no group (or a group of one rank) the
local tensors go back to the single-process path.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.split import resolve_split_backend
from ..checks import NumItems, check_linear_args, check_logits, prepare
from ..chunked import default_chunk_size
from ..options import LINEAR_ONLY_OPTIONS, LossOptions
from .autograd import ParallelRun, linear_loss, logits_loss
from .row_kernel import VocabParallelRowKernel
from .shard import gather_layout, unwrap_head, unwrap_logits, unwrap_replicated

__all__ = ["vocab_parallel_linear", "vocab_parallel_logits"]


def _sharded(group) -> bool:
    if group is None:
        return False
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call "
                         "torch.distributed.init_process_group first)")
    return dist.get_world_size(group) > 1


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _single_process_options(opts: LossOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "process_group"}


def vocab_parallel_linear(input, weight, target, bias, opts: LossOptions, num_items_in_batch: NumItems,
                          token_weights: Optional[Tensor]):
    from ..functional import _autocast_cast, finish, linear_cross_entropy

    weight, bias, group = unwrap_head(weight, bias, opts.process_group)
    input = unwrap_replicated("input", input, partial_grad=_sharded(group) and not opts.allreduce_dgrad)
    if not _sharded(group):
        return linear_cross_entropy(input, weight, target, bias=bias, num_items_in_batch=num_items_in_batch,
                                    token_weights=token_weights, **_single_process_options(opts))
    if opts.logits_dtype is not None:
        raise ValueError("logits_dtype: the fast mode (16-bit chunk logits) is not supported on the vocab-parallel "
                         "path; leave it None")
    # under torch.autocast: one cast to its dtype, as on one process (the Functions run with autocast off)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    local_vocab, hidden = weight.shape
    x = _contiguous(input.reshape(-1, hidden))
    split = resolve_split_backend(opts.backend, input.device)
    shard = gather_layout(group, local_vocab, x.shape[0], opts.chunk_size, input.device)
    prep = prepare(input, "input", target, shard.vocab_size, opts, num_items_in_batch, token_weights)
    grad_on = torch.is_grad_enabled()
    resolved = dataclasses.replace(
        opts,
        # the default chunk from the largest slice, so that every rank loops over the same chunks
        chunk_size=opts.chunk_size or default_chunk_size(x.shape[0], shard.max_local_size,
                                                         max(4, input.element_size())),
        accum_dtype=weight.dtype if opts.accum_dtype is None else torch.promote_types(opts.accum_dtype, weight.dtype))
    run = ParallelRun(opts=resolved, kernel=VocabParallelRowKernel(split, shard), group=group,
                      need_dx=grad_on and x.requires_grad, need_dw=grad_on and weight.requires_grad,
                      need_db=grad_on and bias is not None and bias.requires_grad)
    loss, *stats_sums = linear_loss(x, _contiguous(weight), bias, prep.target, prep.token_weights, prep.divisor,
                                    run)
    return finish(loss, stats_sums, prep, opts, shard.vocab_size)


def vocab_parallel_logits(logits, target, opts: LossOptions, num_items_in_batch: NumItems,
                          token_weights: Optional[Tensor]):
    from ..functional import cross_entropy, finish

    logits, group = unwrap_logits(logits, opts.process_group)
    if not _sharded(group):
        options = _single_process_options(opts)
        for name in LINEAR_ONLY_OPTIONS:  # not options of cross_entropy
            del options[name]
        return cross_entropy(logits, target, num_items_in_batch=num_items_in_batch, token_weights=token_weights,
                             **options)
    logits = check_logits(logits)
    local_vocab = logits.shape[-1]
    flat = _contiguous(logits.reshape(-1, local_vocab))
    split = resolve_split_backend(opts.backend, logits.device)
    shard = gather_layout(group, local_vocab, flat.shape[0], opts.chunk_size, logits.device)
    prep = prepare(logits, "logits", target, shard.vocab_size, opts, num_items_in_batch, token_weights)
    resolved = dataclasses.replace(
        opts, chunk_size=opts.chunk_size or default_chunk_size(flat.shape[0], shard.max_local_size,
                                                               logits.element_size()))
    run = ParallelRun(opts=resolved, kernel=VocabParallelRowKernel(split, shard), group=group,
                      need_dx=torch.is_grad_enabled() and flat.requires_grad)
    loss, *stats_sums = logits_loss(flat, prep.target, prep.token_weights, prep.divisor, run)
    return finish(loss, stats_sums, prep, opts, shard.vocab_size)
