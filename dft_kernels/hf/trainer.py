"""Trainer helpers: a ``compute_loss_func`` on kept logits, and a mixin that takes the patched loss."""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from ..functional import cross_entropy
from ..objectives import ObjectiveLike, get_objective
from .loss_kwargs import COMPUTE_LOSS_KWARGS, check_loss_kwargs
from .patching import is_patched

_log = logging.getLogger("dft_kernels")


def compute_loss_func(objective: ObjectiveLike = "dft", **loss_kwargs) -> Callable:
    """A ``compute_loss_func`` for ``transformers.Trainer`` / TRL's ``SFTTrainer`` when you keep logits.

    ``Trainer(..., compute_loss_func=dk.hf.compute_loss_func("dft"))`` computes ``objective`` with
    :func:`dft_kernels.cross_entropy` on ``outputs.logits`` (the model's final, softcapped and
    scaled logits), labels shifted as HF shifts them, normalised by ``num_items_in_batch`` when
    the Trainer passes it (gradient accumulation) and by the number of valid tokens otherwise.
    ``loss_kwargs``: ``ignore_index``, ``label_smoothing``, ``z_loss``, ``backend``,
    ``chunk_size``, ``validate``.  Use it on an *unpatched* model (a patched model in training
    mode returns no logits when it gets labels; the Trainer pops the labels first, so it works
    either way).
    """
    obj = get_objective(objective)
    opts = check_loss_kwargs(loss_kwargs, obj, allowed=COMPUTE_LOSS_KWARGS, caller="compute_loss_func()")

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if logits is None:
            raise ValueError("compute_loss_func: the model returned no logits (a dk.patch-ed model in training mode "
                             "with labels, or TRL's SFTConfig(loss_type='chunked_nll'), TRL 1.14's default, whose "
                             "head returns none); either use the patched model's own loss or keep logits "
                             "(SFTConfig(loss_type='nll'))")
        if labels is None:
            raise ValueError("compute_loss_func: labels is None; the batch must have labels")
        return cross_entropy(logits, labels.to(logits.device), objective=obj, shift=True,
                             num_items_in_batch=num_items_in_batch, **opts)

    loss_func.objective = obj
    return loss_func


class ModelLossMixin:
    """Trainer mixin: take the loss from the model's own forward (the ``dk.patch`` fused loss).

    ``transformers.Trainer`` already does this.  TRL >= 1.0's ``SFTTrainer`` (and its other
    trainers) compute their own loss from a fused LM head they install, which would bypass the
    patch; put this mixin first to restore ``Trainer.compute_loss``::

        class DFTSFTTrainer(dft_kernels.hf.ModelLossMixin, trl.SFTTrainer):
            pass

    The model then receives ``labels`` and ``num_items_in_batch`` and returns the patched loss;
    TRL's entropy / token-accuracy metrics are not logged (they need TRL's own head).  TRL 1.14's
    ``SFTConfig`` defaults to ``loss_type="chunked_nll"``, whose head replaces ``model.forward`` (and with
    it the patch): the mixin sets the trainer's ``args.loss_type`` to ``"nll"`` before TRL sees it, with
    a warning.
    """

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "loss_type", None) == "chunked_nll":
            _log.warning("dft_kernels.hf.ModelLossMixin: TRL's loss_type='chunked_nll' (TRL 1.14's default) would "
                         "replace model.forward, and with it the dk.patch loss; using loss_type='nll', whose loss "
                         "the mixin takes from the patched model")
            training_args.loss_type = "nll"
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from transformers import Trainer

        unwrapped = model
        while hasattr(unwrapped, "module") and isinstance(unwrapped.module, nn.Module):
            unwrapped = unwrapped.module
        if not is_patched(unwrapped) and not is_patched(getattr(self, "model", None)):
            raise RuntimeError("ModelLossMixin: the model is not patched with dk.patch, so the trainer would train "
                               "with the model's own (cross-entropy) loss; call dk.patch(model, ...) first")
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
