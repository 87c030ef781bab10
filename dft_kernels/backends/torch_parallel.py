"""Pure-PyTorch split row kernel (contract in ``dft_kernels.backends.split``), any device and dtype.

Pass 1 on this rank's slice ``z`` (softcapped)::

    m_r = max_j z_j;  e_j = exp(z_j - m_r)
    r_r = sum_{j != one argmax} e_j;  t_r = -sum_j e_j log e_j = sum_j e_j (m_r - z_j)

Pass 2 writes ``scale * (a exp(z_j - M) inv_sum - c)`` (times ``1 / cosh(z0_j / softcap)^2``)
over the slice and ``scale * target_grad`` (times the same factor) at the target column.

Math in float32 (float64 for float64 logits).  Pass 1 works on one chunk-sized copy; pass 2
works in place for float32 logits without softcap, else on one copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import LossParams
from .split import PartialRowStats, RowGradCoefficients, owned_rows

NAME = "torch"


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _softcapped(logits: Tensor, softcap, copy: bool) -> Tensor:
    work = logits.to(_compute_dtype(logits), copy=copy)
    if softcap is not None:
        work.div_(softcap).tanh_().mul_(softcap)
    return work


def partial_row_stats(logits: Tensor, target: Tensor, vocab_start: int, params: LossParams) -> PartialRowStats:
    n, local_size = logits.shape
    owned, local = owned_rows(target, vocab_start, local_size, params.ignore_index)
    work = _softcapped(logits, params.softcap, copy=True)

    m = work.amax(dim=1, keepdim=True)
    z_target = work.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill_(~owned, 0.0)
    # torch.argmax returns the first maximal index, as the single-rank kernels do
    argmax = work.argmax(dim=1).add_(vocab_start) if params.with_stats else None
    z_sum = work.sum(dim=1) if params.label_smoothing != 0.0 else None

    e = work.sub_(m).exp_()
    at_max = e == 1.0
    rest = e.masked_fill_(at_max, 0.0).sum(dim=1)
    # the maxima are 0 now and add nothing to -sum e log e (their own term is 1 * log 1 = 0)
    spread = -torch.special.xlogy(e, e).sum(dim=1) if params.needs_entropy else None
    # each tie at the max adds an exact 1 (counted from a second sum, not an int64 copy of the mask)
    ties = (e.masked_fill_(at_max, 1.0).sum(dim=1) - rest).round_()
    rest = rest + (ties - 1.0)
    return PartialRowStats(max=m.squeeze(1), rest=rest, spread=spread, z_sum=z_sum, target_logit=z_target,
                           argmax=argmax)


def row_grad(logits: Tensor, target: Tensor, vocab_start: int, params: LossParams,
             coefficients: RowGradCoefficients) -> None:
    n, local_size = logits.shape
    k = coefficients
    cap = params.softcap
    in_place = logits.dtype == _compute_dtype(logits) and cap is None
    work = _softcapped(logits, cap, copy=not in_place)

    grad = work.sub_(k.max.unsqueeze(1)).exp_().mul_((k.a * k.inv_sum).unsqueeze(1))
    if k.c is not None:
        grad.sub_(k.c.unsqueeze(1))
    owned, local = owned_rows(target, vocab_start, local_size, params.ignore_index)
    index = local.unsqueeze(1)
    at_target = torch.where(owned, k.target_grad, grad.gather(1, index).squeeze(1))
    grad.scatter_(1, index, at_target.unsqueeze(1))
    if cap is not None:
        # 1 - (z / c)^2 = 1 / cosh(z0 / c)^2 from the raw logits (grad is a copy here); float32
        # logits are turned into the factor in place, as they are overwritten with grad below
        grad.mul_(logits.to(grad.dtype).div_(cap).cosh_().square_().reciprocal_())
    grad.mul_(k.scale.unsqueeze(1))
    if grad is not logits:
        logits.copy_(grad)
