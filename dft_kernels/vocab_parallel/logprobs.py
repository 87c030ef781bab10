"""Vocab-parallel :func:`dk.linear_logprobs` and :func:`dk.logprobs`: per-token log-probs and entropy over a
head (or logits) whose vocabulary is split over the ranks of a process group (torch on every device).

Per chunk of ``C`` token rows each rank computes its slice of the logits ``z`` (float32; softcap,
then the temperature), its row max ``m_r``, ``rest_r = sum_{j != local argmax} e^{z_j - m_r}``,
``spread_r = sum_j e^{z_j - m_r} (m_r - z_j)`` and the target logit where it holds the target.
One ``all_reduce(MAX)`` of ``m_r`` and one ``all_reduce(SUM)`` of a packed ``[C, 4]`` tensor (``[C, 6]``
with the statistics of ``return_stats``) give the
global ``M``, ``R`` (the sum over all but one global argmax), ``spread`` and ``z_y``, combined as in
:mod:`dft_kernels.vocab_parallel.row_kernel`; then, as on one rank, ``logp = (z_y - M) - log1p(R)``,
``gap = spread / (1 + R)`` and ``H = log1p(R) + gap`` (no cancellation when ``p ~ 1``).  Forward keeps
``(M, log1p(R), gap)`` per row; backward recomputes each chunk's slice of the logits and writes

    dL/dz_j = a (1[j = y] - pi_j) - c pi_j ((z_j - M) + gap)      (a = dL/dlogp, c = dL/dH)

(the target entry's ``a (1 - pi_y)`` as ``-a expm1(logp)``), then ``dX`` (all-reduced over the group
once per call), this rank's ``dW`` (float32 accumulator) and ``db``; on given logits, the gradient of
this rank's slice.  Every rank must make the same
calls with the same input and target, and run backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .shard import VocabShard

__all__ = ["linear_logprobs_parallel", "logprobs_parallel", "default_chunk_rows"]

CHUNK_BYTES = 64 << 20


def default_chunk_rows(max_local_size: int) -> int:
    """Rows per chunk: a float32 ``[C, V_r]`` logits slice of about 64 MiB on the widest rank (the
    same on every rank, so every rank runs the same number of collectives)."""
    return max(1, CHUNK_BYTES // (4 * max(1, max_local_size)))


def _scale(z: Tensor, softcap: Optional[float], temp: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``(z, tanh)``: float32 (float64) logits after softcap and temperature, and the softcap's ``tanh``
    (None without softcap) for the chain rule."""
    th = None
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = softcap * th
    if temp is not None:
        z = z / temp[:, None]
    return z, th


class _Head:
    """Where a chunk's logits slice comes from and where its gradient goes: ``x @ weight.T (+ bias)``."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        self.x, self.weight, self.bias = x, weight, bias
        self.wide = torch.promote_types(x.dtype, torch.float32)

    def logits(self, s: int, e: int) -> Tensor:
        z = (self.x[s:e] @ self.weight.t()).to(self.wide)
        return z if self.bias is None else z + self.bias.to(self.wide)


class _Given:
    """A chunk's logits slice read from logits this rank holds ``[N, V_r]``."""

    def __init__(self, logits: Tensor):
        self.flat = logits
        self.wide = torch.promote_types(logits.dtype, torch.float32)

    def logits(self, s: int, e: int) -> Tensor:
        return self.flat[s:e].to(self.wide)


def _owned(target: Tensor, shard: VocabShard, ignore_index: int) -> tuple[Tensor, Tensor]:
    local = target - shard.vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < shard.local_size)
    return owned, torch.where(owned, local, torch.zeros_like(local))


def _forward_chunk(z: Tensor, target: Tensor, valid: Tensor, shard: VocabShard, ignore_index: int,
                   with_stats: bool):
    """``(logp, entropy, M, log1p(R), gap, sum_sq, is_top1)`` of one chunk, global (two collectives).

    With ``with_stats`` the packed sum also carries ``sum_j e^{2(z_j - M)}`` (``sum_sq = that / (1 + R)^2``)
    and how many maximal logits sit at a global index before the target: the target is the argmax (the
    first maximal index, as ``argmax`` on one process) where its logit is ``M`` and that count is 0."""
    m_r, arg = z.max(dim=1)
    e = torch.exp(z - m_r[:, None])
    spread_r = (e * (m_r[:, None] - z)).sum(1)
    sq_r = e.square().sum(1) if with_stats else None
    e.scatter_(1, arg[:, None], 0.0)
    rest_r = e.sum(1)
    owned, col = _owned(target, shard, ignore_index)
    z_y = torch.where(owned, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(m_r))
    big_m = m_r.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=shard.group)
    at_max = m_r == big_m
    f = torch.exp(m_r - big_m)
    far = f == 0.0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    one_plus_r = 1.0 + rest_r
    columns = [torch.where(at_max, rest_r, torch.where(far, zero, f * one_plus_r)), at_max.to(z.dtype), z_y,
               torch.where(far, zero, f * (spread_r + (big_m - m_r) * one_plus_r))]
    if with_stats:
        columns.append(torch.where(far, zero, f * f * sq_r))
        index = torch.arange(shard.vocab_start, shard.vocab_start + z.shape[1], device=z.device)
        before = (z == big_m[:, None]) & (index[None, :] < target[:, None])
        columns.append(before.sum(1).to(z.dtype))
    packed = torch.stack(columns, dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    rest, n_at_max, z_y, spread = packed[:, :4].unbind(1)
    r = rest + (n_at_max - 1.0)
    log1p_r = torch.log1p(r)
    gap = spread / (1.0 + r)
    logp = torch.where(valid, (z_y - big_m) - log1p_r, zero)
    entropy = torch.where(valid, log1p_r + gap, zero)
    sum_sq = is_top1 = None
    if with_stats:
        sum_sq = torch.where(valid, packed[:, 4] / (1.0 + r).square(), zero)
        is_top1 = valid & (z_y == big_m) & (packed[:, 5] == 0.0)
    return logp, entropy, big_m, log1p_r, gap, sum_sq, is_top1


def _forward(source, target: Tensor, temperature: Optional[Tensor], softcap: Optional[float], shard: VocabShard,
             ignore_index: int, chunk: int, with_stats: bool):
    """Every chunk's forward: ``(logp, entropy, row stats [N, 3], sum_sq or None, is_top1 or None)``."""
    n = target.shape[0]
    wide = source.wide
    device = target.device
    logp = torch.zeros(n, dtype=wide, device=device)
    entropy = torch.zeros_like(logp)
    stats = torch.zeros(n, 3, dtype=wide, device=device)
    sum_sq = torch.zeros_like(logp) if with_stats else None
    is_top1 = torch.zeros(n, dtype=torch.bool, device=device) if with_stats else None
    valid = target != ignore_index
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z, _ = _scale(source.logits(s, e), softcap, None if temperature is None else temperature[s:e])
            lp, h, big_m, log1p_r, gap, sq, top1 = _forward_chunk(z, target[s:e], valid[s:e], shard, ignore_index,
                                                                  with_stats)
            logp[s:e], entropy[s:e] = lp, h
            stats[s:e] = torch.stack([big_m, log1p_r, gap], dim=1)
            if with_stats:
                sum_sq[s:e], is_top1[s:e] = sq, top1
    return logp, entropy, stats, sum_sq, is_top1


def _backward_chunks(source, target, temperature, softcap, shard: VocabShard, ignore_index: int, chunk: int,
                     stats: Tensor, logp: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor]):
    """Yield ``(s, e, dz)``: each chunk's gradient w.r.t. this rank's slice of the raw logits."""
    n = target.shape[0]
    wide = stats.dtype
    valid = target != ignore_index
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        temp = None if temperature is None else temperature[s:e]
        z, th = _scale(source.logits(s, e), softcap, temp)
        big_m, log1p_r, gap = stats[s:e].unbind(1)
        shifted = z - big_m[:, None]
        pi = torch.exp(shifted - log1p_r[:, None])
        ok = valid[s:e].to(z.dtype)
        a = torch.zeros_like(big_m) if grad_logp is None else grad_logp[s:e].to(wide) * ok
        c = torch.zeros_like(big_m) if grad_entropy is None else grad_entropy[s:e].to(wide) * ok
        dz = -pi * (a[:, None] + c[:, None] * (shifted + gap[:, None]))
        owned, col = _owned(target[s:e], shard, ignore_index)
        # the target entry: a (1 - pi_y) as -a expm1(logp), exact when pi_y ~ 1
        y_val = -a * torch.expm1(logp[s:e]) - c * pi.gather(1, col[:, None]).squeeze(1) * (
            shifted.gather(1, col[:, None]).squeeze(1) + gap)
        dz.scatter_(1, col[:, None], torch.where(owned, y_val, dz.gather(1, col[:, None]).squeeze(1))[:, None])
        if temp is not None:
            dz = dz / temp[:, None]
        if th is not None:
            dz = dz * (1.0 - th * th)
        yield s, e, dz


def _forward_and_save(ctx, source, operands: tuple, target, temperature, softcap, shard, ignore_index, chunk,
                      with_stats):
    """The autograd Functions' forward: every chunk (:func:`_forward`), then what backward needs saved."""
    logp, entropy, stats, sum_sq, is_top1 = _forward(source, target, temperature, softcap, shard, ignore_index,
                                                     chunk, with_stats)
    ctx.save_for_backward(*operands, target, temperature, stats, logp)
    ctx.softcap, ctx.shard, ctx.ignore_index, ctx.chunk = softcap, shard, ignore_index, chunk
    ctx.set_materialize_grads(False)
    if with_stats:
        ctx.mark_non_differentiable(sum_sq, is_top1)
    return logp, entropy, sum_sq, is_top1


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, temperature, softcap, shard, ignore_index, chunk, with_stats):
        return _forward_and_save(ctx, _Head(x, weight, bias), (x, weight, bias), target, temperature, softcap, shard,
                                 ignore_index, chunk, with_stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_sum_sq, _grad_top1):
        x, weight, bias, target, temperature, stats, logp = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        wide = stats.dtype
        dx = torch.zeros_like(x) if need_x else None
        dw = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_b else None
        with torch.no_grad():
            for s, e, dz in _backward_chunks(_Head(x, weight, bias), target, temperature, ctx.softcap, ctx.shard,
                                             ctx.ignore_index, ctx.chunk, stats, logp, grad_logp, grad_entropy):
                if need_x:
                    dx[s:e] = (dz.to(weight.dtype) @ weight).to(x.dtype)
                if need_w:
                    dw += dz.t() @ x[s:e].to(wide)
                if need_b:
                    db += dz.sum(0)
        if need_x:
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.shard.group)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None, None)


class _LogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, softcap, shard, ignore_index, chunk, with_stats):
        return _forward_and_save(ctx, _Given(logits), (logits,), target, temperature, softcap, shard, ignore_index,
                                 chunk, with_stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_sum_sq, _grad_top1):
        logits, target, temperature, stats, logp = ctx.saved_tensors
        dlogits = torch.zeros_like(logits)
        with torch.no_grad():
            for s, e, dz in _backward_chunks(_Given(logits), target, temperature, ctx.softcap, ctx.shard,
                                             ctx.ignore_index, ctx.chunk, stats, logp, grad_logp, grad_entropy):
                dlogits[s:e] = dz.to(logits.dtype)
        return dlogits, None, None, None, None, None, None, None


def linear_logprobs_parallel(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             temperature: Optional[Tensor], softcap: Optional[float], shard: VocabShard,
                             ignore_index: int, chunk_rows: Optional[int], with_stats: bool = False):
    """``(logp, entropy, sum_sq, is_top1)`` ``[N]`` of ``x [N, H]`` over this rank's head slice
    ``weight [V_r, H]`` (the last two None without ``with_stats``); ``temperature`` ``[N]`` (per row,
    already shifted) or None (the caller folded a scalar into it)."""
    chunk = chunk_rows or default_chunk_rows(shard.max_local_size)
    return _LinearLogprobs.apply(x, weight, bias, target, temperature, softcap, shard, ignore_index, chunk,
                                 with_stats)


def logprobs_parallel(logits: Tensor, target: Tensor, temperature: Optional[Tensor], softcap: Optional[float],
                      shard: VocabShard, ignore_index: int, chunk_rows: Optional[int], with_stats: bool = False):
    """As :func:`linear_logprobs_parallel` on this rank's slice of logits you hold, ``logits [N, V_r]``; the
    gradient goes to that slice (no collective in backward)."""
    chunk = chunk_rows or default_chunk_rows(shard.max_local_size)
    return _LogitsLogprobs.apply(logits, target, temperature, softcap, shard, ignore_index, chunk, with_stats)
