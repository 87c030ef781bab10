"""TRL's ``SFTTrainer`` with the loss taken from the ``dk.patch``-ed model.

::

    from dft_kernels.integrations.trl import DFTSFTTrainer

    trainer = DFTSFTTrainer(model="Qwen/Qwen2.5-0.5B", args=SFTConfig(...), train_dataset=ds,
                            dft_objective="dft", dft_loss_kwargs={"chunk_size": 4096})
    trainer.train()

TRL >= 1.0's ``SFTTrainer.compute_loss`` runs its own fused LM head (``loss_type="nll"`` or
``"dft"``) and never asks the model for a loss.  ``DFTSFTTrainer`` patches the model once TRL has
loaded it (and wrapped it in PEFT, if asked), computes the loss as ``transformers.Trainer`` does
(the model gets ``labels`` and ``num_items_in_batch``), and refuses the options that would make
the loss something else.  :class:`~dft_kernels.integrations.common.FusedLossCheck` stops
training before the optimizer step if a micro-batch did not run through the fused loss.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from trl import SFTTrainer

from dft_kernels.hf import ModelLossMixin

from .common import FusedLossCheck, LossOptions, refuse_trainer_loss

__all__ = ["DFTSFTTrainer"]


class DFTSFTTrainer(ModelLossMixin, SFTTrainer):
    """``trl.SFTTrainer`` training ``dft_objective`` with the fused, chunked dft_kernels loss.

    ``dft_objective``: a name (``"dft"``, ``"ce"``, ...) or an objective (``dk.DFT(min_weight=0.1)``);
    ``dft_loss_kwargs``: ``dk.patch`` options (``chunk_size``, ``z_loss``, ``label_smoothing``,
    ``backend``, ...).  Everything else is ``SFTTrainer``'s.  ``args.loss_type`` is not used:
    the objective is ``dft_objective`` (default DFT).  TRL's ``entropy`` and
    ``mean_token_accuracy`` metrics are not logged (they come from TRL's own LM head).
    """

    def __init__(self, *args, dft_objective: Any = "dft", dft_loss_kwargs: Optional[Mapping[str, Any]] = None,
                 **kwargs):
        self.dft_options = LossOptions.from_config({"objective": dft_objective, **dict(dft_loss_kwargs or {})},
                                                   where="dft_loss_kwargs")
        self.fused_loss_check = FusedLossCheck()
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.fused_loss_check]
        super().__init__(*args, **kwargs)
        refuse_trainer_loss(self, "DFTSFTTrainer")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("DFTSFTTrainer: the MoE router auxiliary loss is enabled (router_aux_loss_coef); the "
                             "patched model does not add it. Set SFTConfig(router_aux_loss_coef=0.0)")
        self.dft_options.patch(self.model)
