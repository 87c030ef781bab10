"""The RL primitive at the head: per-token log-probs and a differentiable entropy, with temperature,
in one pass (docs/rl.md).

``linear_logprobs`` computes them from hidden states and the head weight, chunk by chunk, never
holding the ``[tokens, vocab]`` logits; ``logprobs`` on logits you already have.  Forward keeps
``O(tokens)`` numbers per call (three per row); backward recomputes each chunk's logits and writes
the gradient of both outputs, under any upstream per-token gradients, in one pass over each row
(:mod:`dft_kernels.chunked`, ``logprobs_*``).  The options are :class:`~dft_kernels.options.LogprobOptions`;
the argument checks are those of :mod:`dft_kernels.functional`, shared with the oracle
(:func:`dft_kernels.reference.linear_logprobs`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .backends import valid_rows
from .functional import _autocast_cast, _contiguous, check_linear_args, check_logits, prepare
from .options import (
    LogprobOptions,
    LossOptions,
    document_options,
    is_dtensor,
    plan_logprobs_linear,
    plan_logprobs_logits,
)
from .stats import LogprobStats

__all__ = ["linear_logprobs", "logprobs", "logprob_options", "prepare_logprobs", "PreparedLogprobs"]

Temperature = Union[float, int, Tensor]
_document = functools.partial(document_options, options=LogprobOptions)


@_document
def linear_logprobs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Temperature = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    shift: bool = False,
    return_entropy: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
    validate: bool = True,
):
    """Per-token ``log softmax(z / temperature)[target]`` of the logits ``z = input @ weight.T (+ bias)``
    (after the softcap, when given), never materialising them.

    ``input (..., H)``, ``weight (V, H)``, ``target (...)`` int64, ``bias (V,)`` or None.  Returns
    ``logp`` shaped like ``target`` (``target[..., 1:]`` with ``shift``), float32 (float64 for float64
    inputs), 0 at ignored positions; with ``return_entropy`` also the per-token entropy ``H`` of
    ``softmax(z / temperature)``, and with ``return_stats`` a :class:`dk.LogprobStats` last:
    ``logp``, ``(logp, entropy)``, ``(logp, stats)`` or ``(logp, entropy, stats)``.  Both ``logp``
    and ``entropy`` are differentiable w.r.t. ``input``, ``weight`` and ``bias``.
    """
    temp, opts = logprob_options(temperature, softcap=softcap, ignore_index=ignore_index, shift=shift,
                                 return_entropy=return_entropy, return_stats=return_stats, backend=backend,
                                 chunk_size=chunk_size, process_group=process_group, validate=validate)
    if opts.process_group is not None or is_dtensor(input) or is_dtensor(weight):
        return _vocab_parallel_linear(input, weight, target, bias, temp, opts)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    vocab_size, hidden = weight.shape
    prep = prepare_logprobs(input, "input", target, vocab_size, opts, temp)
    x = _contiguous(input.reshape(-1, hidden))
    grad_on = torch.is_grad_enabled()
    plan = plan_logprobs_linear(opts, x, weight, bias, grad_on and x.requires_grad, grad_on and weight.requires_grad,
                                grad_on and bias is not None and bias.requires_grad)
    outs = ops.linear_logprobs_forward(x, _contiguous(weight), bias, prep.target, prep.temperature, plan.encode())
    return _finish(outs, prep, opts)


@_document
def logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: Temperature = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    shift: bool = False,
    return_entropy: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
    validate: bool = True,
):
    """:func:`linear_logprobs` on logits you already hold: ``logits (..., V)``, ``target (...)``; the
    gradient goes to ``logits`` (which are not modified)."""
    temp, opts = logprob_options(temperature, softcap=softcap, ignore_index=ignore_index, shift=shift,
                                 return_entropy=return_entropy, return_stats=return_stats, backend=backend,
                                 chunk_size=chunk_size, process_group=process_group, validate=validate)
    if opts.process_group is not None or is_dtensor(logits):
        return _vocab_parallel_logits(logits, target, temp, opts)
    logits = check_logits(logits)
    vocab_size = logits.shape[-1]
    prep = prepare_logprobs(logits, "logits", target, vocab_size, opts, temp)
    flat = _contiguous(logits.reshape(-1, vocab_size))
    plan = plan_logprobs_logits(opts, flat, torch.is_grad_enabled() and flat.requires_grad)
    outs = ops.logprobs_forward(flat, prep.target, prep.temperature, plan.encode())
    return _finish(outs, prep, opts)


def logprob_options(temperature: Temperature, **options) -> tuple[Optional[Tensor], LogprobOptions]:
    """``(temperature tensor or None, the checked options)``: a tensor temperature is per-token data
    (the options then hold 1.0), a number is an option."""
    if isinstance(temperature, Tensor):
        return temperature, LogprobOptions(**options)
    return None, LogprobOptions(temperature=temperature, **options)


def _vocab_parallel_linear(input, weight, target, bias, temp: Optional[Tensor], opts: LogprobOptions):
    """The vocab-parallel branch of :func:`linear_logprobs` (:mod:`dft_kernels.vocab_parallel.logprobs`):
    unwrap DTensors, learn the slice layout, check the arguments against the *global* vocabulary; with
    no group (or a group of one rank) the local tensors go back to the single-process path."""
    from .functional import _sharded
    from .vocab_parallel.logprobs import linear_logprobs_parallel
    from .vocab_parallel.shard import gather_layout, unwrap_head, unwrap_replicated

    weight, bias, group = unwrap_head(weight, bias, opts.process_group)
    input = unwrap_replicated("input", input)
    if not _sharded(group):
        return linear_logprobs(input, weight, target, bias=bias, **_single_process_options(opts, temp))
    _torch_only(opts)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    local_vocab, hidden = weight.shape
    x = _contiguous(input.reshape(-1, hidden))
    shard = gather_layout(group, local_vocab, x.shape[0], opts.chunk_size, input.device)
    prep = prepare_logprobs(input, "input", target, shard.vocab_size, opts, temp)
    outs = linear_logprobs_parallel(x, _contiguous(weight), bias, prep.target, _row_temperature(prep, opts, x),
                                    opts.softcap, shard, opts.ignore_index, opts.chunk_size, opts.return_stats)
    return _finish_parallel(outs, prep, opts)


def _vocab_parallel_logits(logits, target, temp: Optional[Tensor], opts: LogprobOptions):
    """The vocab-parallel branch of :func:`logprobs`: this rank's slice ``logits (..., V_r)`` (or a DTensor
    sharded over its last dimension); no group (or one rank) goes back to the single-process path."""
    from .functional import _sharded
    from .vocab_parallel.logprobs import logprobs_parallel
    from .vocab_parallel.shard import gather_layout, unwrap_logits

    logits, group = unwrap_logits(logits, opts.process_group)
    if not _sharded(group):
        return logprobs(logits, target, **_single_process_options(opts, temp))
    _torch_only(opts)
    logits = check_logits(logits)
    local_vocab = logits.shape[-1]
    flat = _contiguous(logits.reshape(-1, local_vocab))
    shard = gather_layout(group, local_vocab, flat.shape[0], opts.chunk_size, logits.device)
    prep = prepare_logprobs(logits, "logits", target, shard.vocab_size, opts, temp)
    outs = logprobs_parallel(flat, prep.target, _row_temperature(prep, opts, flat), opts.softcap, shard,
                             opts.ignore_index, opts.chunk_size, opts.return_stats)
    return _finish_parallel(outs, prep, opts)


def _single_process_options(opts: LogprobOptions, temp: Optional[Tensor]) -> dict:
    single = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "process_group"}
    if temp is not None:
        single["temperature"] = temp
    return single


def _torch_only(opts: LogprobOptions) -> None:
    if opts.backend not in ("auto", "torch"):
        raise ValueError(f"backend: the vocab-parallel log-probs run on the torch backend only, got "
                         f"backend={opts.backend!r}; pass 'auto' or 'torch'")


def _row_temperature(prep: "PreparedLogprobs", opts: LogprobOptions, pred: Tensor) -> Optional[Tensor]:
    """The per-row temperature in the compute dtype, a scalar option folded in; None for 1."""
    wide = torch.promote_types(pred.dtype, torch.float32)
    if prep.temperature is not None:
        return prep.temperature.to(wide)
    if float(opts.temperature) != 1.0:
        return torch.full((pred.shape[0],), float(opts.temperature), dtype=wide, device=pred.device)
    return None


def _finish_parallel(outs, prep: "PreparedLogprobs", opts: LogprobOptions):
    logp, entropy, sum_sq, is_top1 = outs
    return _finish((logp, entropy, None, sum_sq, is_top1), prep, opts)


class PreparedLogprobs(NamedTuple):
    """Flattened, checked per-token arguments of a log-prob call."""

    target: Tensor                 # [N] int64 (shifted and padded with ignore_index when shift=True)
    temperature: Optional[Tensor]  # [N] float32 (float64 for float64 inputs), 1 at the padding; or None
    out_shape: tuple               # per-token shape before the shift slice


def prepare_logprobs(pred: Tensor, pred_name: str, target, vocab_size: int, opts: LogprobOptions,
                     temperature: Optional[Tensor]) -> PreparedLogprobs:
    """Check ``target`` (as the loss does) and a tensor ``temperature`` against ``pred``, shift and
    flatten them; with ``validate``, one host sync rejects out-of-range targets and temperatures of
    valid tokens that are not finite and > 0 (errors name the argument)."""
    loss_opts = LossOptions(objective="ce", ignore_index=opts.ignore_index, reduction="none", shift=opts.shift,
                            validate=False)
    target_in = target
    target = prepare(pred, pred_name, target, vocab_size, loss_opts, None, None).target
    wide = torch.promote_types(pred.dtype, torch.float32)
    if temperature is not None:
        temperature = _check_temperature(temperature, target_in, pred)
        if opts.shift:
            temperature = F.pad(temperature[..., 1:], (0, 1), value=1.0)
        temperature = temperature.reshape(-1).to(wide).contiguous()
    out_shape = tuple(target_in.shape)
    if opts.validate:
        _validate(target, temperature, opts.ignore_index, vocab_size)
    return PreparedLogprobs(target, temperature, out_shape)


def _check_temperature(temperature: Tensor, target: Tensor, pred: Tensor) -> Tensor:
    """``temperature`` broadcast to ``target``'s shape (ValueError/TypeError naming it otherwise)."""
    if temperature.is_complex() or temperature.dtype == torch.bool:
        raise TypeError(f"temperature must be a real number or a real tensor, got dtype {temperature.dtype}")
    if temperature.device != pred.device:
        raise ValueError(f"temperature is on {temperature.device} but the logits' operands are on {pred.device}; "
                         "move it to one device")
    if temperature.requires_grad:
        raise ValueError("temperature must not require grad (no gradient flows to it); pass temperature.detach()")
    try:
        shape = torch.broadcast_shapes(temperature.shape, target.shape)
    except RuntimeError:
        shape = None
    if shape != target.shape:
        raise ValueError(f"temperature has shape {tuple(temperature.shape)}, which does not broadcast to the shape "
                         f"of target {tuple(target.shape)} (per-token: that shape; per-sequence: (..., 1))")
    return temperature.broadcast_to(target.shape)


def _validate(target: Tensor, temperature: Optional[Tensor], ignore_index: int, vocab_size: int) -> None:
    """The one host sync of ``validate=True``."""
    bad_target = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    checks = [bad_target.any()]
    if temperature is not None:
        valid = valid_rows(target, ignore_index, vocab_size)
        checks.append((valid & ~(torch.isfinite(temperature) & (temperature > 0))).any())
    bad = torch.stack(checks).tolist()
    if bad[0]:
        raise ValueError(
            f"target holds class indices outside [0, {vocab_size}) that are not ignore_index={ignore_index} "
            f"(e.g. {target[bad_target][:5].tolist()}); pass validate=False to mask such rows instead")
    if len(bad) > 1 and bad[1]:
        valid = valid_rows(target, ignore_index, vocab_size)
        wrong = temperature[valid & ~(torch.isfinite(temperature) & (temperature > 0))]
        raise ValueError(f"temperature must be finite and > 0 at every valid token, got e.g. {wrong[:5].tolist()}")


def _finish(outs, prep: PreparedLogprobs, opts: LogprobOptions):
    """The per-token outputs shaped like the target (``target[..., 1:]`` with ``shift``)."""
    logp, entropy, _row_stats, sum_sq, top1 = outs

    def shaped(t):
        t = t.view(prep.out_shape)
        return t[..., :-1] if opts.shift else t

    result = [shaped(logp)]
    if opts.return_entropy:
        result.append(shaped(entropy))
    if opts.return_stats:
        result.append(LogprobStats(sum_sq_probs=shaped(sum_sq), is_top1=shaped(top1)))
    return result[0] if len(result) == 1 else tuple(result)
