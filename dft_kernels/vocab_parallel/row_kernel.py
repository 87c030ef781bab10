"""The row contract of ``dft_kernels.backends`` for this rank's vocabulary slice: split pass 1,
combine over the process group, objective epilogue, split pass 2.

Combine (per chunk of ``C`` rows, exactly two collectives): after pass 1 gives this rank's
``m_r, r_r, t_r, sum z, z_y, argmax`` (see ``dft_kernels.backends.split``),

1. ``all_reduce(MAX)`` of ``m_r`` (``[C]``) gives the row max ``M``;
2. ``all_reduce(SUM)`` of one packed ``[C, k]`` tensor with, per rank (``f = e^{m_r - M}``)::

       rest    r_r                          if m_r == M, else f (1 + r_r)
       at_max  [m_r == M]
       z_y     the target logit (0 on ranks that do not hold the target)
       spread  f (t_r + (M - m_r)(1 + r_r))          entropy objectives
       z_sum   sum_j z_j                             label smoothing
       hit     [m_r == M and argmax_r == y]          stats
       before  [m_r == M and argmax_r <  y]          stats

   so that, with ``R = sum rest + (sum at_max - 1)`` (the sum of ``e^{z_j - M}`` over all but one
   global argmax, as on one rank: no ``1 + R - 1`` cancellation when ``p ~ 1``)::

       lse = M + log1p(R);  logp = (z_y - M) - log1p(R);  H = log1p(R) + spread / (1 + R)
       mean_j z_j = z_sum / V;  argmax == y  <=>  hit == 1 and before == 0

   (the smallest global index among the maxima, as on one rank: the first maximum of the rank
   holding the target is the target, and no earlier rank reaches the max).

The epilogue (loss, ``w = -g`` and pass 2's coefficients) runs on these ``[C]`` vectors in torch,
identically on every rank, so the loss and stats need no further communication.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import RowOutputs, valid_rows, via_in_place
from ..backends.split import PartialRowStats, RowGradCoefficients
from ..objectives import epilogue
from ..options import LossParams
from .shard import VocabShard

__all__ = ["GlobalRowStats", "combine_row_stats", "epilogue", "VocabParallelRowKernel", "packed_columns"]


class GlobalRowStats(NamedTuple):
    """Per-row statistics of the whole vocabulary, identical on every rank."""

    max: Tensor
    inv_sum: Tensor              # 1 / (1 + R)
    lse: Tensor
    logp: Tensor
    entropy: Optional[Tensor]
    z_mean: Optional[Tensor]
    correct: Optional[Tensor]    # bool


def packed_columns(params: LossParams) -> int:
    """``k``, the width of the packed SUM all-reduce: 3, plus 1 for entropy objectives, 1 for label
    smoothing, 2 with stats."""
    return 3 + int(params.needs_entropy) + int(params.label_smoothing != 0.0) + 2 * int(params.with_stats)


def combine_row_stats(partial: PartialRowStats, target: Tensor, params: LossParams, shard: VocabShard,
                      vocab_size: int) -> GlobalRowStats:
    """The two all-reduces of one chunk and the global statistics (module docstring)."""
    m_r = partial.max
    big_m = m_r.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=shard.group)
    at_max = m_r == big_m
    f = torch.exp(m_r - big_m)
    # a slice whose max is far below M (or -inf) adds exactly 0, never 0 * inf
    far = f == 0.0
    one_plus_r = 1.0 + partial.rest
    zero = torch.zeros((), dtype=m_r.dtype, device=m_r.device)
    columns = [torch.where(at_max, partial.rest, torch.where(far, zero, f * one_plus_r)),
               at_max.to(m_r.dtype), partial.target_logit]
    if params.needs_entropy:
        columns.append(torch.where(far, zero, f * (partial.spread + (big_m - m_r) * one_plus_r)))
    if params.label_smoothing != 0.0:
        columns.append(partial.z_sum)
    if params.with_stats:
        columns.append((at_max & (partial.argmax == target)).to(m_r.dtype))
        columns.append((at_max & (partial.argmax < target)).to(m_r.dtype))
    packed = torch.stack(columns, dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)

    sums = iter(packed.unbind(dim=1))
    rest, n_at_max, z_y = next(sums), next(sums), next(sums)
    r = rest + (n_at_max - 1.0)
    log1p_r = torch.log1p(r)
    inv_sum = 1.0 / (1.0 + r)
    entropy = log1p_r + next(sums) * inv_sum if params.needs_entropy else None
    z_mean = next(sums) / vocab_size if params.label_smoothing != 0.0 else None
    correct = None
    if params.with_stats:
        hit, before = next(sums), next(sums)
        correct = (hit == 1.0) & (before == 0.0)
    return GlobalRowStats(max=big_m, inv_sum=inv_sum, lse=big_m + log1p_r, logp=(z_y - big_m) - log1p_r,
                          entropy=entropy, z_mean=z_mean, correct=correct)


def global_epilogue(stats: GlobalRowStats, target: Tensor, params: LossParams, vocab_size: int,
                    token_weights: Optional[Tensor], grad_scale: Optional[Tensor]):
    """``(RowOutputs, RowGradCoefficients or None)`` from the global statistics: the objective's
    epilogue (:func:`dft_kernels.objectives.epilogue`, as in the single-rank torch backend)."""
    lse, entropy = stats.lse, stats.entropy
    valid = valid_rows(target, params.ignore_index, vocab_size)
    # rows without a valid target have no z_y (0 stands in): logp = 0 keeps their zero-weighted
    # terms finite whatever the row holds (masked -inf columns), as in the single-process kernels
    logp = stats.logp.masked_fill(~valid, 0.0)
    dtype = logp.dtype
    # ignored rows get all-zero coefficients, so pass 2 writes exact zeros whatever their statistics
    ep = epilogue(params.objective, logp, entropy, lse, stats.z_mean, params.label_smoothing, params.z_loss,
                  vocab_size)
    row_weight = valid.to(dtype)
    if token_weights is not None:
        row_weight = row_weight * token_weights.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # the row contract's outputs: float32, float64 for float64 logits (the compute dtype)
    outputs = RowOutputs(
        loss=torch.where(valid, ep.loss * row_weight, zero),
        nll=torch.where(valid, -logp, zero),
        prob=torch.where(valid, torch.exp(logp), zero),
        entropy=None if entropy is None else torch.where(valid, entropy, zero),
        correct=None if stats.correct is None else (stats.correct & valid).to(dtype),
    )
    if grad_scale is None:
        return outputs, None
    a, c, target_grad = (None if t is None else torch.where(valid, t, zero) for t in (ep.a, ep.c, ep.target_grad))
    scale = row_weight * grad_scale.to(dtype)
    return outputs, RowGradCoefficients(max=stats.max, inv_sum=stats.inv_sum, a=a, c=c, target_grad=target_grad,
                                        scale=scale)


class VocabParallelRowKernel:
    """A row backend (contract of ``dft_kernels.backends``) over this rank's slice of the vocabulary:
    ``logits`` are ``[n, V_r]``, ``target`` global ids, and the outputs are the global ones, the same on
    every rank.  Every call runs two collectives on ``shard.group``, so every rank must make the same calls
    in the same order (the chunk loop does)."""

    def __init__(self, split_backend, shard: VocabShard):
        self.split = split_backend
        self.shard = shard
        self.name = f"{split_backend.NAME} (vocab-parallel)"

    def row_loss_grad(self, logits: Tensor, target: Tensor, params: LossParams,
                      token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                      grad_out: Optional[Tensor] = None) -> RowOutputs:
        if grad_scale is not None and grad_out is not None and grad_out is not logits:
            # the split kernels write in place: through a copy (backends.via_in_place)
            return via_in_place(self.row_loss_grad, logits, grad_out, target, params, token_weights, grad_scale)
        shard = self.shard
        partial = self.split.partial_row_stats(logits, target, shard.vocab_start, params)
        stats = combine_row_stats(partial, target, params, shard, shard.vocab_size)
        outputs, coefficients = global_epilogue(stats, target, params, shard.vocab_size, token_weights, grad_scale)
        if coefficients is not None:
            self.split.row_grad(logits, target, shard.vocab_start, params, coefficients)
        return outputs
