"""Pure-PyTorch row backend: runs on any device and dtype (the CPU path).

Implements the contract in ``dft_kernels.backends`` with whole-row tensor ops::

    z     = softcap * tanh(z0 / softcap)        (or z0)
    m     = max(z);  r = sum_{j != argmax} exp(z_j - m);  lse = m + log1p(r)
    logp  = (z_y - m) - log1p(r);  softmax = exp(z - m) / (1 + r)
    H     = -sum_j softmax_j log softmax_j      (entropy objectives only)
    H_k   = the same over the top-k logits      (EAFT(top_k=k): the H its weight reads; torch.topk per chunk)
    L     = (1 - eps) * L_obj + eps * w * (lse - mean_j z_j) + lam * lse^2,   w = -g
    dL/dz0 = ((w + 2 lam lse) softmax - w (1 - eps) onehot - w eps / V) * (1 - (z / softcap)^2)

with the target entry written as ``a expm1(logp) + 2 lam lse + w eps (1 - 1/V)`` and the cap factor as
``1 / cosh(z0 / softcap)^2`` so that neither cancels.

Math is done in float32 (float64 for float64 logits); the gradient is written into
``grad_out`` (or back into ``logits``) in its dtype.  One chunk-sized working buffer (none
when the gradient's destination has the math dtype: it becomes the working buffer) plus a
boolean mask; the chunk loop in ``dft_kernels.chunked`` bounds them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..objectives import epilogue
from ..options import LossParams
from . import LogprobRowOutputs, RowOutputs, check_grad_out, valid_rows

NAME = "torch"


def supports(path: str, params) -> str:
    """"" for the two-pass ``"rows"`` path, the log-prob family ``"logprobs"`` and the two-head paths
    ``"anchor"`` and ``"distill"`` (the contract's paths)."""
    return "" if path in ("rows", "logprobs", "anchor", "distill") else f"the {NAME} backend has no {path!r} path"


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def row_loss_grad(logits: Tensor, target: Tensor, params: LossParams,
                  token_weights: Optional[Tensor] = None,
                  grad_scale: Optional[Tensor] = None, grad_out: Optional[Tensor] = None) -> RowOutputs:
    n, vocab = logits.shape
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = valid_rows(target, params.ignore_index, vocab)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    cap = params.softcap

    # One working buffer that becomes z, then exp(z - m), then softmax, then the gradient.
    # It is the logits themselves when they are to be overwritten anyway and nothing
    # later needs the raw values; otherwise a copy.
    if grad_scale is None:
        grad_out = None
    elif grad_out is not None:
        check_grad_out(grad_out, logits, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    dest = logits if grad_out is None else grad_out  # where the gradient goes
    if grad_out is not None and grad_out.dtype == compute_dtype:
        work = grad_out.copy_(logits)
    elif grad_scale is not None and grad_out is None and logits.dtype == compute_dtype and cap is None:
        work = logits  # the cap factor below reads the raw logits: not in place with a cap
    else:
        work = logits.to(compute_dtype, copy=True)
    if cap is not None:
        work.div_(cap).tanh_().mul_(cap)

    top_k = params.objective.entropy_top_k
    weight_entropy = None if top_k is None else top_k_entropy(work, top_k)  # while work holds z
    m = work.amax(dim=1, keepdim=True)
    z_target = work.gather(1, safe_target).squeeze(1)
    correct = (work.argmax(dim=1) == target).to(torch.float32) if params.with_stats else None
    z_mean = work.mean(dim=1) if params.label_smoothing != 0.0 else None

    # lse = m + log1p(r), r = sum of exp(z_j - m) over all but one maximal entry.  Keeping
    # r apart from the max's exact 1 keeps logp accurate when p is close to 1.
    work.sub_(m).exp_()
    at_max = work == 1.0
    r_others = work.masked_fill_(at_max, 0.0).sum(dim=1)
    work.masked_fill_(at_max, 1.0)
    del at_max
    # Ties at the max each add an exact 1.  They are counted from a second sum rather than
    # with at_max.sum(), which would materialise the mask as int64 (2 chunks of memory).
    ties = (work.sum(dim=1) - r_others).round_()
    r = r_others + (ties - 1.0)
    log1p_r = torch.log1p(r)
    m = m.squeeze(1)
    lse = m + log1p_r
    # rows without a valid target read column 0, which may be masked (-inf): logp = 0 keeps
    # their (zero-weighted) loss and gradient finite, 0 rather than inf * 0
    logp = ((z_target - m) - log1p_r).masked_fill_(~valid, 0.0)

    entropy = None
    if params.needs_entropy:
        # H = log1p(r) + t / (1 + r), t = sum_j e^{z_j - m} (m - z_j) = -sum_j xlogy(e_j, e_j): two
        # non-negative parts from log-space values, as the other backends.  Not -sum_j p_j log p_j:
        # the log of a float32 p ~ 1 costs its rounding, large against a small -log p (rel err 3e-5
        # at H = 1.8e-3).
        entropy = log1p_r + (-torch.special.xlogy(work, work).sum(dim=1)) / (1.0 + r)
    softmax = work.div_((1.0 + r).unsqueeze(1))

    ep = epilogue(params.objective, logp, entropy if weight_entropy is None else weight_entropy, lse, z_mean,
                  params.label_smoothing, params.z_loss, vocab)

    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    row_weight = valid.to(compute_dtype)
    if token_weights is not None:
        row_weight = row_weight * token_weights.to(compute_dtype)
    loss = torch.where(valid, ep.loss * row_weight, zero)  # ignored rows: 0, even where their stand-in loss is inf

    if grad_scale is not None:
        # softmax becomes the gradient in place: a * softmax - c, with the target entry of the epilogue
        grad = softmax.mul_(ep.a.unsqueeze(1))
        if ep.c is not None:
            grad.sub_(ep.c.unsqueeze(1))
        grad.scatter_(1, safe_target, ep.target_grad.unsqueeze(1))
        if cap is not None:
            # chain factor of the cap, 1 - (z / c)^2 = 1 / cosh(z0 / c)^2 (no cancellation
            # near the cap), from the raw logits (a copy: they stay untouched).
            grad.mul_(logits.to(compute_dtype, copy=True).div_(cap).cosh_().square_().reciprocal_())
        grad.mul_((row_weight * grad_scale.to(compute_dtype)).unsqueeze(1))
        if grad is not dest:
            dest.copy_(grad)

    f32 = compute_dtype  # the contract's float32, float64 for float64 logits
    return RowOutputs(
        loss=loss.to(f32),
        nll=torch.where(valid, -logp, zero).to(f32),
        prob=torch.where(valid, torch.exp(logp), zero).to(f32),
        entropy=None if entropy is None else torch.where(valid, entropy, zero).to(f32),
        correct=None if correct is None else correct * valid,
    )


def top_k_entropy(z: Tensor, k: int) -> Tensor:
    """Per row of ``z`` ``[n, V]``, the entropy of the softmax of its ``min(k, V)`` largest entries alone:
    ``log1p(r) + t / (1 + r)`` over them as for the whole row, with ``r`` the sum of ``e^{z_j - max}``
    but the max's and ``t = sum e^{z_j - max} (max - z_j)`` (no cancellation; ``-inf`` entries add 0).
    Only ``[n, k]`` tensors besides ``z``, which is read once and left untouched."""
    top = torch.topk(z, min(k, z.shape[1]), dim=1).values  # sorted: column 0 is the row's max
    d = top - top[:, :1]
    e = torch.exp(d)
    r = e[:, 1:].sum(dim=1)
    t = -torch.where(e > 0.0, e * d, torch.zeros((), dtype=e.dtype, device=e.device)).sum(dim=1)
    return torch.log1p(r) + t / (1.0 + r)


# ---------------------------------------------------------------- the log-prob family (docs/rl.md)


def _scaled_logits(logits: Tensor, valid: Tensor, params, temperature: Optional[Tensor], dtype: torch.dtype,
                   out: Optional[Tensor] = None) -> Tensor:
    """A working copy (into ``out`` when given) of ``z = softcap * tanh(z0 / softcap) / T`` in ``dtype``;
    invalid rows use ``T = 1`` (their temperature may be anything)."""
    work = logits.to(dtype, copy=True) if out is None else out.copy_(logits)
    if params.softcap is not None:
        work.div_(params.softcap).tanh_().mul_(params.softcap)
    if temperature is not None:
        t = temperature.to(dtype)
        work.div_(torch.where(valid, t, torch.ones_like(t)).unsqueeze(1))
    elif params.temperature != 1.0:
        work.div_(params.temperature)
    return work


def row_logprobs(logits: Tensor, target: Tensor, params, temperature: Optional[Tensor] = None) -> LogprobRowOutputs:
    """The contract's ``row_logprobs`` (``dft_kernels.backends``) with whole-row tensor ops:
    ``lse = m + log1p(r)`` with ``r`` the sum of ``e^{z_j - m}`` over all but one maximal entry
    (so ``logp`` stays accurate when ``p ~ 1``), ``gap = sum_j pi_j (m - z_j)`` from non-negative terms."""
    n, vocab = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = valid_rows(target, params.ignore_index, vocab)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    work = _scaled_logits(logits, valid, params, temperature, dtype)
    m = work.amax(dim=1, keepdim=True)
    z_target = work.gather(1, safe_target).squeeze(1)
    top1 = (work.argmax(dim=1) == target) & valid if params.with_stats else None
    d = work.sub_(m)  # z - m <= 0
    e = torch.exp(d)  # in [0, 1]: the max entries exactly 1
    m = m.squeeze(1)
    t = None
    if params.with_entropy:  # sum_j e_j (m - z_j): -inf logits (no mass) add 0, not 0 * inf
        t = -(d.mul_(e).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)).sum(dim=1)
    del d, work
    at_max = e == 1.0
    r_others = e.masked_fill_(at_max, 0.0).sum(dim=1)
    e.masked_fill_(at_max, 1.0)
    del at_max
    r = r_others + ((e.sum(dim=1) - r_others).round_() - 1.0)  # + the ties at the max (each an exact 1)
    log1p_r = torch.log1p(r)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    logp = torch.where(valid, (z_target - m) - log1p_r, zero)
    gap = torch.zeros_like(r) if t is None else t / (1.0 + r)
    entropy = None if t is None else torch.where(valid, log1p_r + gap, zero)
    sum_sq = None
    if params.with_stats:
        sum_sq = torch.where(valid, e.square_().sum(dim=1) / (1.0 + r).square(), zero)
    return LogprobRowOutputs(logp, entropy, sum_sq, top1, torch.stack([m, log1p_r, gap], dim=1))


def row_logprobs_grad(logits: Tensor, target: Tensor, params, row_stats: Tensor, grad_logp: Optional[Tensor],
                      grad_entropy: Optional[Tensor], temperature: Optional[Tensor] = None,
                      grad_out: Optional[Tensor] = None) -> None:
    """The contract's ``row_logprobs_grad``: ``-pi_j (a + c ((z_j - m) + gap))`` off the target,
    ``-a expm1(logp) - c p ((z_y - m) + gap)`` on it, over ``T``, times the cap's ``sech^2``."""
    n, vocab = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if grad_out is not None:
        check_grad_out(grad_out, logits, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    dest = logits if grad_out is None else grad_out
    valid = valid_rows(target, params.ignore_index, vocab)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    work = _scaled_logits(logits, valid, params, temperature, dtype,
                          out=grad_out if grad_out is not None and grad_out.dtype == dtype else None)
    m, log1p_r, gap = (s.to(dtype).unsqueeze(1) for s in row_stats.unbind(1))
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    a = zero if grad_logp is None else grad_logp.to(dtype).unsqueeze(1)
    c = None if grad_entropy is None else grad_entropy.to(dtype).unsqueeze(1)
    d = work.sub_(m)  # z - m
    d_y = d.gather(1, safe_target)
    logp = d_y - log1p_r
    target_grad = -a * torch.expm1(logp)
    if c is not None:
        target_grad = target_grad - c * torch.exp(logp) * (d_y + gap)
    # In place from here: two [n, V] working tensors at the most (options._TORCH_LOGPROB_WORK_ROWS).
    pi = d.sub(log1p_r).exp_()
    if c is None:
        del work, d
        grad = pi.mul_(a).neg_()
    else:
        grad = d.add_(gap).mul_(c).add_(a).mul_(pi).neg_()  # -pi (a + c (log pi + H))
        del pi
    # -inf logits (pi = 0): their gradient is 0, not 0 * inf; the only nan of a valid row but a nan logit's
    grad.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    grad.scatter_(1, safe_target, target_grad)
    row_factor = torch.where(valid, torch.ones((), dtype=dtype, device=logits.device), zero)
    if temperature is not None:
        t = temperature.to(dtype)
        row_factor = row_factor / torch.where(valid, t, torch.ones_like(t))
    elif params.temperature != 1.0:
        row_factor = row_factor / params.temperature
    grad.mul_(row_factor.unsqueeze(1))
    if params.softcap is not None:
        grad.mul_(logits.to(dtype, copy=True).div_(params.softcap).cosh_().square_().reciprocal_())
    grad.masked_fill_(valid.logical_not().unsqueeze(1), 0.0)  # invalid rows: 0 even where entries were not finite
    dest.copy_(grad)


# ---------------------------------------------------------------- two heads (docs/objectives.md, Anchored objectives)


def _capped(logits: Tensor, cap: Optional[float], dtype: torch.dtype) -> Tensor:
    z = logits.to(dtype, copy=True)
    if cap is not None:
        z.div_(cap).tanh_().mul_(cap)
    return z


def _cap_factor(logits: Tensor, cap: Optional[float], dtype: torch.dtype) -> Optional[Tensor]:
    """``d softcap(z0) / d z0 = 1 / cosh(z0 / cap)^2`` (None without a cap)."""
    if cap is None:
        return None
    return logits.to(dtype, copy=True).div_(cap).cosh_().square_().reciprocal_()


def _kl_rows(log_pi: Tensor, log_q: Tensor, direction: str, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Per row ``KL(q || pi)`` (``forward``) or ``KL(pi || q)`` (``reverse``) of two log-softmax rows, and
    its gradient with respect to the logits of ``pi``: ``pi - q``, or ``pi (log pi - log q - KL)``.
    Entries of zero mass (``-inf`` logits) add 0, never ``0 * inf``."""
    pi, q = log_pi.exp(), log_q.exp()
    zero = torch.zeros((), dtype=pi.dtype, device=pi.device)
    if direction == "forward":
        kl = torch.where(q > 0, q * (log_q - log_pi), zero).sum(dim=1)
        return kl, (pi.sub_(q) if with_grad else None)
    d = torch.where(pi > 0, log_pi - log_q, zero)
    kl = (pi * d).sum(dim=1)
    return kl, (d.sub_(kl.unsqueeze(1)).mul_(pi) if with_grad else None)


def pair_prologue(logits: Tensor, target: Tensor, params, grad_scale: Optional[Tensor],
                  grad_out: Optional[Tensor], vocab_size: Optional[int] = None):
    """``(math dtype, valid rows, grad_out)`` of a two-head row call (here and on a vocab-parallel slice,
    whose ``vocab_size`` is the whole head's; default: the logits' width): ``grad_out`` is dropped without a
    gradient and checked otherwise."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = valid_rows(target, params.ignore_index, logits.shape[1] if vocab_size is None else vocab_size)
    if grad_scale is None:
        grad_out = None
    elif grad_out is not None:
        check_grad_out(grad_out, logits, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    return dtype, valid, grad_out


def row_anchor_loss_grad(logits: Tensor, ref_logits: Tensor, target: Tensor, params: LossParams,
                         token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                         grad_out: Optional[Tensor] = None) -> RowOutputs:
    """The contract's ``row_anchor_loss_grad``: :func:`row_loss_grad` of the objective plus, per valid
    row, ``kl_coef * KL`` between ``pi = softmax(cap(logits))`` and ``q = softmax(cap(ref_logits))``
    (``params.kl``: ``forward`` is ``KL(q || pi)``, ``reverse`` ``KL(pi || q)``), times the token weight;
    the KL's gradient (``pi - q``, or ``pi (log pi - log q - KL)``, times the cap's ``sech^2``) is added
    to the objective's before the one write into ``grad_out`` (or over ``logits``).  ``ref_logits`` are
    only read."""
    n, vocab = logits.shape
    dtype, valid, grad_out = pair_prologue(logits, target, params, grad_scale, grad_out)
    with_grad = grad_scale is not None
    # the KL first: row_loss_grad may overwrite the logits with the objective's gradient
    log_pi = torch.log_softmax(_capped(logits, params.softcap, dtype), dim=1)
    log_q = torch.log_softmax(_capped(ref_logits, params.softcap, dtype), dim=1)
    kl, kl_grad = _kl_rows(log_pi, log_q, params.kl, with_grad)
    del log_pi, log_q
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    row_weight = torch.where(valid, params.kl_coef * (1.0 if token_weights is None else token_weights.to(dtype)), zero)
    kl = torch.where(valid, kl, zero)
    if not with_grad:
        out = row_loss_grad(logits, target, params, token_weights)
        return out._replace(loss=out.loss + (kl * row_weight).to(out.loss.dtype))
    cap_factor = _cap_factor(logits, params.softcap, dtype)  # before the logits may be overwritten
    dest = logits if grad_out is None else grad_out
    # the objective's gradient in the math dtype (in place over the logits only where they have it:
    # row_loss_grad must not be given the logits as grad_out, its cap factor reads them last)
    work = dest if dest.dtype == dtype else torch.empty((n, vocab), dtype=dtype, device=logits.device)
    out = row_loss_grad(logits, target, params, token_weights, grad_scale, grad_out=None if work is logits else work)
    kl_grad.mul_((row_weight * grad_scale.to(dtype)).unsqueeze(1))
    kl_grad = torch.where(valid.unsqueeze(1), kl_grad, zero)  # invalid rows: 0 whatever their entries
    if cap_factor is not None:
        kl_grad.mul_(cap_factor)
    work.add_(kl_grad)
    if work is not dest:
        dest.copy_(work)
    return out._replace(loss=out.loss + (kl * row_weight).to(out.loss.dtype))


def row_distill_loss_grad(logits: Tensor, ref_logits: Tensor, target: Tensor, params,
                          token_weights: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                          grad_out: Optional[Tensor] = None) -> RowOutputs:
    """The contract's ``row_distill_loss_grad``: per valid row the generalized Jensen-Shannon divergence of
    the student ``s = log_softmax(logits / T)`` to the teacher ``t = log_softmax(ref_logits / T)``
    (``params``: :class:`~dft_kernels.options.DistillParams`)::

        beta = 0:  KL(t || s),  gradient (pi_s - pi_t) / T
        beta = 1:  KL(s || t),  gradient pi_s (s - t - KL) / T
        else:      beta KL(t || m) + (1 - beta) KL(s || m),  log m = logaddexp(s + log(1 - beta), t + log beta),
                   gradient (1 - beta) pi_s (s - log m - KL(s || m)) / T

    times the token weight and ``grad_scale``, written once into ``grad_out`` (or over ``logits``);
    ``nll``/``prob`` are the student's at the target (0 at invalid rows)."""
    n, vocab = logits.shape
    dtype, valid, grad_out = pair_prologue(logits, target, params, grad_scale, grad_out)
    temp, beta = params.temperature, params.beta
    s = torch.log_softmax(logits.to(dtype, copy=True).div_(temp), dim=1)
    t = torch.log_softmax(ref_logits.to(dtype, copy=True).div_(temp), dim=1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    with_grad = grad_scale is not None
    if beta == 0.0:
        loss, grad = _kl_rows(s, t, "forward", with_grad)
    elif beta == 1.0:
        loss, grad = _kl_rows(s, t, "reverse", with_grad)
    else:
        log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        pi_t = t.exp()
        kl_t = torch.where(pi_t > 0, pi_t * (t - log_m), zero).sum(dim=1)
        del pi_t
        pi_s = s.exp()
        d = torch.where(pi_s > 0, s - log_m, zero)
        del log_m
        kl_s = (pi_s * d).sum(dim=1)
        loss = beta * kl_t + (1.0 - beta) * kl_s
        grad = d.sub_(kl_s.unsqueeze(1)).mul_(pi_s).mul_(1.0 - beta) if with_grad else None
    safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    logp = torch.where(valid, s.gather(1, safe_target).squeeze(1), zero)
    return distill_outputs(loss, grad, logp, valid, token_weights, grad_scale, temp,
                           logits if grad_out is None else grad_out)


def distill_outputs(loss: Tensor, grad: Optional[Tensor], logp: Tensor, valid: Tensor,
                    token_weights: Optional[Tensor], grad_scale: Optional[Tensor], temperature: float,
                    dest: Tensor) -> RowOutputs:
    """The end of a distillation row call (here and on a vocab-parallel slice): the per-row divergence
    ``loss`` times the token weight, and its logits gradient ``grad`` (None without one) times the token
    weight, ``grad_scale`` and ``1 / temperature``, zero at invalid rows, written into ``dest``."""
    dtype = loss.dtype
    zero = torch.zeros((), dtype=dtype, device=loss.device)
    row_weight = valid.to(dtype) if token_weights is None else torch.where(valid, token_weights.to(dtype), zero)
    if grad is not None:
        grad.mul_((row_weight * grad_scale.to(dtype) / temperature).unsqueeze(1))
        dest.copy_(torch.where(valid.unsqueeze(1), grad, zero))
    return RowOutputs(loss=torch.where(valid, loss * row_weight, zero), nll=-logp,
                      prob=torch.where(valid, logp.exp(), zero), entropy=None, correct=None)
