"""The oracle: materialises the full logits and lets autograd take the gradients.

Same signature as :func:`dft_kernels.linear_cross_entropy`; works in any dtype
(the tests run it in float64).  It shares only the options and the argument checks
(:mod:`dft_kernels.options`, the checks of :mod:`dft_kernels.functional`) with the fast path: shift, the
per-token losses (written here straight from docs/design.md, Math and Objectives, with
``detach`` as the stop-gradient), reductions and stats are computed independently.
``backend``, ``chunk_size``, ``accum_dtype``, ``logits_dtype``, ``allreduce_dgrad`` are checked and otherwise
ignored (the oracle is exact whatever dtype the fast path rounds its logits to);
``process_group`` must be None (the oracle of the vocab-parallel path is this one on the whole head).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import NumItems, _check_anchor, check_linear_args, check_logits, check_second_head, prepare
from .objectives import ObjectiveLike
from .options import LossOptions, document_options
from .rl import logprob_options, prepare_logprobs
from .stats import LogprobStats, LossStats

__all__ = ["linear_cross_entropy", "cross_entropy", "token_loss", "eaft_entropy", "eaft_normalizer",
           "linear_logprobs", "logprobs", "linear_distill"]


def eaft_entropy(logits: Tensor, top_k) -> Tensor:
    """The ``H`` of EAFT's weight, with no gradient: ``-sum p log p`` of the softmax of the whole row
    (``top_k=None``) or of its ``min(k, V)`` largest logits alone, renormalised over them."""
    z = logits.detach()
    if top_k is not None:
        z = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values
    return torch.special.entr(torch.softmax(z, dim=-1)).sum(-1)


def eaft_normalizer(obj, vocab: int) -> float:
    """EAFT's ``normalizer``; None is the largest entropy, ``log`` of the number of logits entering ``H``
    (1 when that number is 1: ``H`` is then 0)."""
    if obj.normalizer is not None:
        return obj.normalizer
    count = vocab if obj.top_k is None else min(obj.top_k, vocab)
    return math.log(count) if count > 1 else 1.0


def token_loss(name: str, obj, logp: Tensor, logits: Tensor, label_smoothing: float, z_loss: float):
    """Per-token loss with autograd-visible stop-gradients.  ``logits``: ``[n, V]`` after softcap.
    Returns it and the row entropy (entropy objectives; else None): for ``eaft`` the exact one, also
    with ``top_k`` (what :class:`LossStats` reports; the weight reads its own ``H``)."""
    lse = torch.logsumexp(logits, dim=-1)
    p = logp.exp()
    entropy = None
    if name in ("entropy", "eaft"):
        # -sum p log p with 0 log 0 = 0: masked (-inf) logits contribute nothing, not 0 * inf
        entropy = torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)
    weight = {
        "ce": lambda: torch.ones_like(p),
        "dft": lambda: p.detach().clamp_min(obj.min_weight),
        "power": lambda: p.detach() ** obj.alpha,
        "chord": lambda: (p * (1 - p)).detach(),
        "entropy": lambda: obj.scale * torch.exp(-entropy).detach(),
        "eaft": lambda: (eaft_entropy(logits, obj.top_k) / eaft_normalizer(obj, logits.shape[-1])) ** obj.alpha,
    }
    if name == "focal":
        # (1-p)^gamma for gamma < 1 has an infinite slope at p == 1 (logp == 0), where autograd
        # would give inf * 0 = NaN; the loss's true gradient there is 0 (logp ~ -(1-p)), so the
        # weight is taken as a constant at that point.
        q = 1 - p
        q_pos = torch.where(q > 0, q, torch.ones_like(q))
        weight = torch.where(q > 0, q_pos ** obj.gamma, torch.zeros_like(q) ** obj.gamma)
        loss = -weight * logp
    elif name == "prob":
        loss = -(p ** obj.k)
    else:
        w = weight[name]()
        loss = w * -logp
        if label_smoothing != 0.0:
            # infinite with masked (-inf) logits, as F.cross_entropy; never 0 * inf without smoothing
            smooth = -(torch.log_softmax(logits, dim=-1)).mean(-1)
            loss = w * ((1 - label_smoothing) * (-logp) + label_smoothing * smooth)
        loss = loss + z_loss * lse ** 2
    return loss, entropy


def _loss_from_logits(logits: Tensor, target: Tensor, opts: LossOptions, num_items_in_batch, token_weights,
                      ref_logits: Optional[Tensor] = None):
    vocab = logits.shape[-1]
    # Checks only: the shifted/flattened tensors are rebuilt below by plain slicing.
    prepare(logits, "logits", target, vocab, opts, num_items_in_batch, token_weights)
    obj, ignore_index, reduction = opts.objective, opts.ignore_index, opts.reduction
    if opts.shift:
        logits = logits[..., :-1, :]
        target = target[..., 1:]
        token_weights = None if token_weights is None else token_weights[..., 1:]
    tshape = target.shape
    z = logits.reshape(-1, vocab)
    t = target.reshape(-1)
    cap = opts.softcap
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    valid = (t != ignore_index) & (t >= 0) & (t < vocab)
    safe_t = torch.where(valid, t, 0)
    logp = torch.log_softmax(z, dim=-1).gather(1, safe_t[:, None]).squeeze(1)
    # ignored rows stand in column 0, which may be masked (-inf): a finite logp keeps inf * 0 out
    # of their (discarded) loss and its gradient
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    loss, entropy = token_loss(obj.name, obj, logp, z, opts.label_smoothing, opts.z_loss)
    if ref_logits is not None:
        loss = loss + opts.kl_coef * anchor_kl(z, ref_logits, opts)
    if token_weights is not None:
        loss = loss * token_weights.reshape(-1).to(loss.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    n_valid = valid.sum()
    if reduction == "none":
        out = loss.reshape(tshape)
    elif num_items_in_batch is not None:
        out = loss.sum() / torch.as_tensor(num_items_in_batch, dtype=loss.dtype, device=loss.device)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / n_valid.clamp_min(1)
    if not opts.return_stats:
        return out
    with torch.no_grad():
        denom = n_valid.clamp_min(1).to(torch.float32)
        vf = valid.to(torch.float64)
        stats_dtype = torch.promote_types(z.dtype, torch.float32)  # float32; float64 for float64 inputs
        mean = lambda v: ((v.double() * vf).sum() / denom.double()).to(stats_dtype)  # noqa: E731
        stats = LossStats(
            num_tokens=n_valid.to(torch.float32),
            nll=mean(-logp),
            mean_prob=mean(logp.exp()),
            accuracy=mean((z.argmax(-1) == t).double()),
            entropy=None if not obj.needs_entropy else mean(entropy),
        )
    return out, stats


def anchor_kl(z: Tensor, ref_logits: Tensor, opts: LossOptions) -> Tensor:
    """Per row of the (capped) policy logits ``z`` ``[n, V]``: the anchor's ``KL(q || pi)`` (``forward``) or
    ``KL(pi || q)`` (``reverse``), ``pi = softmax(z)``, ``q = softmax(cap(ref_logits))`` (the reference
    logits, any leading shape, unshifted, flattened here like ``z``), with ``0 log 0 = 0``."""
    if opts.shift:
        ref_logits = ref_logits[..., :-1, :]
    zr = ref_logits.reshape(z.shape).detach()
    if opts.softcap is not None:
        zr = opts.softcap * torch.tanh(zr / opts.softcap)
    log_pi, log_q = torch.log_softmax(z, dim=-1), torch.log_softmax(zr, dim=-1)
    first, second = (log_q, log_pi) if opts.kl == "forward" else (log_pi, log_q)
    p = first.exp()
    # terms of no mass are 0, and their log difference (-inf - -inf) is kept out of autograd too
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return (p * torch.where(p > 0, first - second, zero)).sum(-1)


def _one_process(opts: LossOptions) -> LossOptions:
    if opts.process_group is not None:
        raise ValueError("process_group: the reference computes on the whole head in one process; pass the whole "
                         "head (or logits) and process_group=None")
    return opts


@document_options
def cross_entropy(logits: Tensor, target: Tensor, *, objective: ObjectiveLike = "dft", ignore_index: int = -100,
                  reduction: str = "mean", num_items_in_batch: NumItems = None, softcap: Optional[float] = None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, token_weights: Optional[Tensor] = None,
                  shift: bool = False, return_stats: bool = False, backend: str = "auto",
                  chunk_size: Optional[int] = None, chunk_bytes: Optional[int] = None, autotune: bool = False,
                  process_group=None, validate: bool = True):
    """Reference for :func:`dft_kernels.cross_entropy` (on given logits)."""
    opts = _one_process(LossOptions.from_arguments(locals()))
    return _loss_from_logits(check_logits(logits), target, opts, num_items_in_batch, token_weights)


@document_options
def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                         ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                         ref_bias: Optional[Tensor] = None,
                         objective: ObjectiveLike = "dft", ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: NumItems = None, softcap: Optional[float] = None,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, kl_coef: float = 0.0,
                         kl: str = "forward", token_weights: Optional[Tensor] = None, shift: bool = False,
                         return_stats: bool = False, backend: str = "auto", chunk_size: Optional[int] = None,
                         chunk_bytes: Optional[int] = None, autotune: bool = False,
                         accum_dtype: Optional[torch.dtype] = torch.float32,
                         logits_dtype: Optional[torch.dtype] = None, factored: Optional[bool] = None,
                         fused_head: bool = False, process_group=None,
                         allreduce_dgrad: bool = True, validate: bool = True):
    """Materialising reference for :func:`dft_kernels.linear_cross_entropy` (with the anchor: both heads'
    logits, the reference's detached)."""
    opts = _one_process(LossOptions.from_arguments(locals()))
    input, weight, bias = check_linear_args(input, weight, bias)
    ref_logits = None
    anchored = _check_anchor(opts, ref_input, ref_weight, ref_bias)
    if ref_input is not None:  # checked also when kl_coef=0 leaves it unused
        ref_x, ref_w, ref_b = check_second_head(input, weight, ref_input, ref_weight, ref_bias, "ref_input",
                                                "ref_weight", "ref_bias")
        if anchored:
            ref_logits = F.linear(ref_x, ref_w, ref_b).reshape(*input.shape[:-1], weight.shape[0])
    return _loss_from_logits(F.linear(input, weight, bias), target, opts, num_items_in_batch, token_weights,
                             ref_logits)


# ---------------------------------------------------------------- the log-prob family (docs/rl.md)


def _logprobs_from_logits(logits: Tensor, target: Tensor, temperature, opts) -> tuple:
    """Per-token log-probs (and entropy, stats) of ``softmax(cap(logits) / T)`` on materialised logits,
    with plain autograd; shares only the argument checks with the fast path."""
    prepare_logprobs(logits, "logits", target, logits.shape[-1], opts, temperature)  # checks only
    vocab = logits.shape[-1]
    temp = None if temperature is None else temperature.broadcast_to(target.shape)
    if opts.shift:
        logits, target = logits[..., :-1, :], target[..., 1:]
        temp = None if temp is None else temp[..., 1:]
    valid = (target != opts.ignore_index) & (target >= 0) & (target < vocab)
    z = logits
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    if temp is None:
        z = z / opts.temperature
    else:  # an ignored token's temperature may be anything (0 at padding): 1 there
        t = torch.where(valid, temp.to(z.dtype), torch.ones((), dtype=z.dtype, device=z.device))
        z = z / t.unsqueeze(-1)
    log_pi = torch.log_softmax(z, dim=-1)
    safe = torch.where(valid, target, 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    result = [torch.where(valid, log_pi.gather(-1, safe).squeeze(-1), zero)]
    pi = log_pi.exp()
    if opts.return_entropy:
        # -sum pi log pi with 0 log 0 = 0: masked (-inf) logits contribute nothing, and no 0 * inf
        # reaches the gradient (log pi is taken as 0 where pi is)
        safe_log_pi = torch.where(pi > 0, log_pi, zero)
        result.append(torch.where(valid, -(pi * safe_log_pi).sum(-1), zero))
    if opts.return_stats:
        with torch.no_grad():
            sum_sq = torch.where(valid, pi.square().sum(-1), zero)
            result.append(LogprobStats(sum_sq_probs=sum_sq, is_top1=(z.argmax(-1) == target) & valid))
    return result[0] if len(result) == 1 else tuple(result)


def logprobs(logits: Tensor, target: Tensor, *, temperature=1.0, softcap: Optional[float] = None,
             ignore_index: int = -100, shift: bool = False, return_entropy: bool = False, return_stats: bool = False,
             backend: str = "auto", chunk_size: Optional[int] = None, process_group=None, validate: bool = True):
    """Reference for :func:`dft_kernels.logprobs`: ``log_softmax`` and ``softmax`` of the whole logits
    (in their dtype; the tests run it in float64), autograd for every gradient."""
    temp, opts = logprob_options(temperature, softcap=softcap, ignore_index=ignore_index, shift=shift,
                                 return_entropy=return_entropy, return_stats=return_stats, backend=backend,
                                 chunk_size=chunk_size, process_group=process_group, validate=validate)
    if opts.process_group is not None:
        raise ValueError("process_group: the reference computes on the whole head in one process")
    return _logprobs_from_logits(check_logits(logits), target, temp, opts)


def linear_logprobs(input: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                    temperature=1.0, softcap: Optional[float] = None, ignore_index: int = -100, shift: bool = False,
                    return_entropy: bool = False, return_stats: bool = False, backend: str = "auto",
                    chunk_size: Optional[int] = None, process_group=None, validate: bool = True):
    """Materialising reference for :func:`dft_kernels.linear_logprobs` (same signature)."""
    temp, opts = logprob_options(temperature, softcap=softcap, ignore_index=ignore_index, shift=shift,
                                 return_entropy=return_entropy, return_stats=return_stats, backend=backend,
                                 chunk_size=chunk_size, process_group=process_group, validate=validate)
    if opts.process_group is not None:
        raise ValueError("process_group: the reference computes on the whole head in one process")
    input, weight, bias = check_linear_args(input, weight, bias)
    return _logprobs_from_logits(F.linear(input, weight, bias), target, temp, opts)


# ---------------------------------------------------------------- distillation (dft_kernels/distill.py)


def linear_distill(input: Tensor, weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor, target: Tensor, *,
                   bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None, beta: float = 0.5,
                   temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                   num_items_in_batch: NumItems = None, shift: bool = False, backend: str = "auto",
                   chunk_size: Optional[int] = None, process_group=None, validate: bool = True):
    """Materialising reference for :func:`dft_kernels.linear_distill` (same signature): both heads' whole
    logits, ``log_softmax`` of each over the temperature, the generalized JSD per token with ``0 log 0 = 0``,
    autograd for every gradient (the teacher detached)."""
    from .distill import _loss_options, distill_options

    opts = distill_options(beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                           shift=shift, backend=backend, chunk_size=chunk_size, process_group=process_group,
                           validate=validate)
    if opts.process_group is not None:
        raise ValueError("process_group: the reference computes on the whole head in one process")
    input, weight, bias = check_linear_args(input, weight, bias)
    vocab = weight.shape[0]
    prepare(input, "input", target, vocab, _loss_options(opts), num_items_in_batch, None)  # checks only
    t_x, t_w, t_b = check_second_head(input, weight, teacher_input, teacher_weight, teacher_bias, "teacher_input",
                                      "teacher_weight", "teacher_bias")
    z = F.linear(input, weight, bias)
    zt = F.linear(t_x, t_w, t_b).reshape(z.shape)
    if opts.shift:
        z, zt, target = z[..., :-1, :], zt[..., :-1, :], target[..., 1:]
    s = torch.log_softmax(z / opts.temperature, dim=-1)
    t = torch.log_softmax(zt / opts.temperature, dim=-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)

    def kl(log_a, log_b):  # KL(a || b) per row; terms of no mass are 0 (kept out of autograd too)
        a = log_a.exp()
        return (a * torch.where(a > 0, log_a - log_b, zero)).sum(-1)

    if opts.beta == 0.0:
        per = kl(t, s)
    elif opts.beta == 1.0:
        per = kl(s, t)
    else:
        # entries where neither head has mass (-inf in both) have none in the mixture either; they are
        # kept out of logsumexp, whose gradient there would be 0/0
        void = (s == float("-inf")) & (t == float("-inf"))
        s_, t_ = torch.where(void, zero, s), torch.where(void, zero, t)
        mix = torch.logsumexp(torch.stack([s_ + torch.log1p(torch.tensor(-opts.beta, dtype=z.dtype)),
                                           t_ + torch.log(torch.tensor(opts.beta, dtype=z.dtype))]), dim=0)
        mix = torch.where(void, float("-inf"), mix)
        per = opts.beta * kl(t, mix) + (1.0 - opts.beta) * kl(s, mix)
    valid = (target != opts.ignore_index) & (target >= 0) & (target < vocab)
    per = torch.where(valid, per, zero)
    if opts.reduction == "none":
        return per
    if num_items_in_batch is not None:
        return per.sum() / torch.as_tensor(num_items_in_batch, dtype=per.dtype, device=per.device)
    if opts.reduction == "sum":
        return per.sum()
    return per.sum() / valid.sum().clamp_min(1)
