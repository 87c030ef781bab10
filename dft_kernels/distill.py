"""Distillation at the head: the generalized Jensen-Shannon divergence of a student head to a frozen
teacher head (TRL GKD's ``generalized_jsd_loss``), from both models' hidden states, never holding either
``[tokens, vocab]`` logits (docs/objectives.md, Anchored objectives (ASFT) and distillation).

Per chunk of token rows both heads' logits are made into two chunk buffers of the call and one row
step reads the pair (:class:`dft_kernels.chunked.TwoHeadChunks`, the backends' ``row_distill_loss_grad``);
the loss, its reductions and its gradients follow the loss's chunk loop (for ``mean``/``sum`` the
gradients are complete after forward; ``none`` recomputes in backward).  The options are
:class:`~dft_kernels.options.DistillOptions`; the argument checks are those of
:mod:`dft_kernels.functional`, shared with the oracle (:func:`dft_kernels.reference.linear_distill`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .functional import (
    NumItems,
    _autocast_cast,
    _contiguous,
    check_linear_args,
    check_second_head,
    finish,
    prepare,
    vocab_parallel_linear,
)
from .options import DISTILL_OPTION_NAMES, DistillOptions, LossOptions, document_options, is_dtensor, plan_distill

__all__ = ["linear_distill", "distill_options"]

_document = functools.partial(document_options, options=DistillOptions)


@_document
def linear_distill(
    input: Tensor,
    weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    shift: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
    validate: bool = True,
):
    """Generalized JSD of the student ``softmax((input @ weight.T (+ bias)) / temperature)`` to the teacher
    ``softmax((teacher_input @ teacher_weight.T (+ teacher_bias)) / temperature)`` per token, over the whole
    vocabulary, never materialising either logits.

    ``input (..., H)``, ``weight (V, H)``; ``teacher_input (..., H_t)`` at the same positions (its hidden size
    may differ), ``teacher_weight (V, H_t)``; ``target (...)`` int64: only which tokens count (those not equal
    to ``ignore_index``; with ``shift``, position ``t`` counts where ``target[..., t + 1]`` does).
    ``num_items_in_batch``: divide the summed divergence by it instead (TRL's gradient-accumulation
    convention).  Returns a 0-d loss (``mean``/``sum``) or per-token values shaped like ``target``
    (``target[..., 1:]`` with ``shift``; ``none``), float32 (float64 for float64 inputs), differentiable
    w.r.t. ``input``, ``weight`` and ``bias``; the teacher's tensors are detached (no gradient, never
    modified).
    """
    opts = DistillOptions(beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                          shift=shift, backend=backend, chunk_size=chunk_size, process_group=process_group,
                          validate=validate)
    loss_opts = _loss_options(opts)
    if opts.process_group is not None or any(is_dtensor(t) for t in (input, weight, teacher_input, teacher_weight)):

        def single_process(input, weight, bias, teacher):
            return linear_distill(input, weight, *teacher[:2], target, bias=bias, teacher_bias=teacher[2],
                                  num_items_in_batch=num_items_in_batch,
                                  **{n: getattr(opts, n) for n in DISTILL_OPTION_NAMES if n != "process_group"})

        second = ((teacher_input, teacher_weight, teacher_bias), ("teacher_input", "teacher_weight", "teacher_bias"))
        return vocab_parallel_linear(input, weight, bias, target, opts, loss_opts, num_items_in_batch, None, second,
                                     single_process)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    vocab_size, hidden = weight.shape
    prep = prepare(input, "input", target, vocab_size, loss_opts, num_items_in_batch, None)
    t_x, t_w, t_b = check_second_head(input, weight, teacher_input, teacher_weight, teacher_bias, "teacher_input",
                                      "teacher_weight", "teacher_bias")
    x = _contiguous(input.reshape(-1, hidden))
    grad_on = torch.is_grad_enabled()
    plan = plan_distill(opts, x, weight, bias, grad_on and x.requires_grad, grad_on and weight.requires_grad,
                        grad_on and bias is not None and bias.requires_grad)
    loss, _dx, _dw, _db, *_stats = ops.lce_forward(x, _contiguous(weight), bias, prep.target, None, prep.divisor,
                                                   plan.encode(), t_x, t_w, t_b)
    return finish(loss, None, prep, loss_opts, vocab_size)


def distill_options(**options) -> DistillOptions:
    """The checked options of a :func:`linear_distill` call (errors name the option)."""
    return DistillOptions(**options)


def _loss_options(opts: DistillOptions) -> LossOptions:
    """The loss options whose argument checks, shift and reduction distillation shares (``prepare``,
    ``finish``)."""
    return LossOptions(objective="ce", ignore_index=opts.ignore_index, reduction=opts.reduction, shift=opts.shift,
                       validate=opts.validate)
