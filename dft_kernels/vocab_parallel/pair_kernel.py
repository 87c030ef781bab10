"""The two-head row contract (``row_anchor_loss_grad``, ``row_distill_loss_grad`` of
``dft_kernels.backends``) on this rank's vocabulary slice of *both* heads: the anchored loss (ASFT) and
distillation over a vocab-parallel head.  Both heads are split alike: rank ``r`` holds columns
``[vocab_start, vocab_start + V_r)`` of the trained head's logits ``z`` and of the frozen head's ``u``.

Per chunk of ``C`` rows, with ``lse`` the whole row's log-sum-exp::

    1. all_reduce(MAX) of [C, 2]: each head's row max M (slices of -inf add nothing)
    2. all_reduce(SUM) of [C, 2]: sum_j e^{z_j - M_z}, sum_j e^{u_j - M_u}   ->  log pi = z - lse_z,
                                                                              log q  = u - lse_u
    3. all_reduce(SUM) of the slice's share of the divergence (and, distilling, the student's target
       log-prob, 0 on ranks without the target)

Anchor (``params.kl``, weight ``kl_coef`` times the token weight; ``softcap`` caps both heads)::

    forward  KL(q || pi) = sum_j q_j (log q_j - log pi_j)      d/dz_j = pi_j - q_j
    reverse  KL(pi || q) = sum_j pi_j (log pi_j - log q_j)     d/dz_j = pi_j (log pi_j - log q_j - KL)

added to the objective's loss and gradient from :class:`~dft_kernels.vocab_parallel.row_kernel.
VocabParallelRowKernel` (its own two collectives).  Distillation (temperature ``T`` divides both heads'
logits, ``log m = logaddexp(log pi + log(1 - beta), log q + log beta)``)::

    beta = 0:  KL(q || pi)          beta = 1:  KL(pi || q)
    else:      beta KL(q || m) + (1 - beta) KL(pi || m),
               d/dz_j = (1 - beta) pi_j (log pi_j - log m_j - KL(pi || m)) / T

Every gradient term is local once the row's sums are known, so the slice's gradient needs no further
communication.  The divergence math runs in torch, in float32 (float64 for float64 logits), on any
device; entries of zero mass (``-inf`` logits) add 0, never ``0 * inf``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import RowOutputs
from ..backends.split import owned_rows
from ..backends.torch import distill_outputs, pair_prologue
from .row_kernel import VocabParallelRowKernel
from .shard import VocabShard

__all__ = ["VocabParallelPairKernel"]

def _global_log_softmax(z: Tensor, u: Tensor, group) -> tuple[Tensor, Tensor]:
    """``(log pi, log q)``: the log-softmax over the whole vocabulary of this rank's slices ``z`` and
    ``u`` (``[C, V_r]`` in the math dtype, overwritten), two collectives."""
    big_m = torch.stack((z.amax(dim=1), u.amax(dim=1)), dim=1)
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    z.sub_(big_m[:, :1])
    u.sub_(big_m[:, 1:])
    sums = torch.stack((z.exp().sum(dim=1), u.exp().sum(dim=1)), dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_sums = sums.log_()
    return z.sub_(log_sums[:, :1]), u.sub_(log_sums[:, 1:])


def _masked_sum(weight: Tensor, log_ratio: Tensor) -> Tensor:
    """``sum_j weight_j log_ratio_j`` per row, 0 where ``weight_j`` is 0 (``log_ratio`` may be ``nan``
    or ``inf`` there)."""
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return torch.where(weight > 0, weight * log_ratio, zero).sum(dim=1)


class VocabParallelPairKernel:
    """The two-head row backend over this rank's slice of both heads (module docstring).  ``logits``
    and ``ref_logits`` are ``[n, V_r]``, ``target`` global ids; outputs are the whole row's, the same on
    every rank.  Every call runs the same collectives in the same order on every rank."""

    def __init__(self, split_backend, shard: VocabShard):
        self.rows = VocabParallelRowKernel(split_backend, shard)
        self.shard = shard
        self.name = f"{split_backend.NAME} (vocab-parallel, two heads)"

    def row_anchor_loss_grad(self, logits: Tensor, ref_logits: Tensor, target: Tensor, params,
                             token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                             grad_out: Optional[Tensor] = None) -> RowOutputs:
        dtype, valid, grad_out = pair_prologue(logits, target, params, grad_scale, grad_out, self.shard.vocab_size)
        cap = params.softcap
        z, u = (t.to(dtype, copy=True) for t in (logits, ref_logits))
        if cap is not None:
            z.div_(cap).tanh_().mul_(cap)
            u.div_(cap).tanh_().mul_(cap)
        log_pi, log_q = _global_log_softmax(z, u, self.shard.group)
        with_grad = grad_scale is not None
        if params.kl == "forward":
            q = log_q.exp()
            part = _masked_sum(q, log_q - log_pi)
            kl_grad = log_pi.exp_().sub_(q) if with_grad else None
            del q
        else:
            pi = log_pi.exp()
            d = log_pi.sub_(log_q)
            part = _masked_sum(pi, d)
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self.shard.group)
        kl = part
        if with_grad and params.kl != "forward":
            zero = torch.zeros((), dtype=dtype, device=logits.device)
            kl_grad = torch.where(pi > 0, d.sub_(kl.unsqueeze(1)).mul_(pi), zero)
        del log_q
        zero = torch.zeros((), dtype=dtype, device=logits.device)
        weight = params.kl_coef * (1.0 if token_weights is None else token_weights.to(dtype))
        row_weight = torch.where(valid, weight, zero)
        kl = torch.where(valid, kl, zero)
        if not with_grad:
            out = self.rows.row_loss_grad(logits, target, params, token_weights)
            return out._replace(loss=out.loss + (kl * row_weight).to(out.loss.dtype))
        if cap is not None:  # d cap(z0) / d z0, from the raw logits before any overwrite
            kl_grad.mul_(logits.to(dtype, copy=True).div_(cap).cosh_().square_().reciprocal_())
        kl_grad.mul_((row_weight * grad_scale.to(dtype)).unsqueeze(1))
        kl_grad = torch.where(valid.unsqueeze(1), kl_grad, zero)
        # the objective's gradient in the math dtype, in place on a copy of the logits (or on them)
        dest = logits if grad_out is None else grad_out
        work = logits if (grad_out is None and logits.dtype == dtype) else logits.to(dtype, copy=True)
        out = self.rows.row_loss_grad(work, target, params, token_weights, grad_scale)
        work.add_(kl_grad)
        if work is not dest:
            dest.copy_(work)
        return out._replace(loss=out.loss + (kl * row_weight).to(out.loss.dtype))

    def row_distill_loss_grad(self, logits: Tensor, ref_logits: Tensor, target: Tensor, params,
                              token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                              grad_out: Optional[Tensor] = None) -> RowOutputs:
        dtype, valid, grad_out = pair_prologue(logits, target, params, grad_scale, grad_out, self.shard.vocab_size)
        temp, beta = params.temperature, params.beta
        s, t = (x.to(dtype, copy=True).div_(temp) for x in (logits, ref_logits))
        s, t = _global_log_softmax(s, t, self.shard.group)
        zero = torch.zeros((), dtype=dtype, device=logits.device)
        owned, local = owned_rows(target, self.shard.vocab_start, self.shard.local_size, params.ignore_index)
        s_y = torch.where(owned, s.gather(1, local.unsqueeze(1)).squeeze(1), zero)
        with_grad = grad_scale is not None
        if beta == 0.0:
            pi_t = t.exp()
            parts = [_masked_sum(pi_t, t - s)]
        elif beta == 1.0:
            pi_s = s.exp()
            d = torch.where(pi_s > 0, s - t, zero)
            parts = [(pi_s * d).sum(dim=1)]
        else:
            log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
            parts = [_masked_sum(t.exp(), t - log_m)]
            pi_s = s.exp()
            d = torch.where(pi_s > 0, s - log_m, zero)
            del log_m
            parts.append((pi_s * d).sum(dim=1))
        packed = torch.stack([s_y, *parts], dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.shard.group)
        logp = torch.where(valid, packed[:, 0], zero)
        if beta == 0.0:
            loss = packed[:, 1]
            grad = s.exp_().sub_(pi_t) if with_grad else None
        elif beta == 1.0:
            loss = packed[:, 1]
            grad = d.sub_(loss.unsqueeze(1)).mul_(pi_s) if with_grad else None
        else:
            kl_s = packed[:, 2]
            loss = beta * packed[:, 1] + (1.0 - beta) * kl_s
            grad = d.sub_(kl_s.unsqueeze(1)).mul_(pi_s).mul_(1.0 - beta) if with_grad else None
        return distill_outputs(loss, grad, logp, valid, token_weights, grad_scale, temp,
                               logits if grad_out is None else grad_out)
