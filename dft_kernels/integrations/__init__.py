"""dft_kernels as the loss backend of other trainers.

One module per trainer, each importing only that trainer (import the one you use):

* :mod:`dft_kernels.integrations.llamafactory` — a launcher for LLaMA-Factory's ``run_exp``
  (``python -m dft_kernels.integrations.llamafactory my_sft.yaml``); its ``use_eaft_loss`` and
  ``use_asft_loss`` (the reference model's hidden states, not its logits) run on ours;
* :mod:`dft_kernels.integrations.axolotl` — an axolotl plugin
  (``plugins: [dft_kernels.integrations.axolotl.DFTKernelsPlugin]``);
* :mod:`dft_kernels.integrations.trl` — ``DFTSFTTrainer``, TRL's ``SFTTrainer`` with the loss
  taken from the ``dk.patch``-ed model; ``DFTGRPOTrainer``, TRL's ``GRPOTrainer`` with its
  per-token log-probs and entropy from ``dk.linear_logprobs``; ``DFTGKDTrainer``, TRL's GKD with its
  generalized JSD from ``dk.linear_distill`` on the student's and teacher's hidden states;
* :mod:`dft_kernels.integrations.verl` — ``linear_cross_entropy``, a drop-in for verl's fused
  head kernel (``(logprobs, entropy)``, verl's conventions).

What they share (:mod:`dft_kernels.integrations.common`): the options as one dataclass
(:class:`LossOptions`, read from the trainer's config), and a ``TrainerCallback``
(:class:`FusedLossCheck`) that stops training before the optimizer step when a micro-batch did
not run through the fused loss, so a trainer that bypasses the patch never trains silently with
its own loss.  See docs/integrations.md.
"""

from .common import FusedLossCheck, LossOptions

__all__ = ["LossOptions", "FusedLossCheck"]
