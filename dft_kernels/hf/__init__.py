"""Hugging Face integration: patch any causal LM's loss, Trainer / TRL helpers.

``dk.patch(model, objective="dft", **loss_kwargs)`` replaces ``model.forward`` (on the
instance, never the class) by a forward that, called **with labels in training mode**,

1. runs the model's own backbone (``model.base_model``, what every ``*ForCausalLM``
   forward calls) with the caller's arguments,
2. takes the final hidden states (sliced by ``logits_to_keep`` as HF does), and
3. computes the loss with :func:`dft_kernels.linear_cross_entropy` from the hidden states and
   the head weight (and bias), with the labels shifted as HF shifts them, honouring
   ``ignore_index``, ``num_items_in_batch``, ``shift_labels``, the Gemma-2/3
   ``final_logit_softcapping`` and the head scaling of Cohere (``logit_scale``) and Granite
   (``logits_scaling``).  The loss runs *inside* the head module's call, so hooks that
   FSDP, DeepSpeed or accelerate put on the head still gather and place its parameters.

It returns ``CausalLMOutputWithPast(loss=..., logits=None, ...)``: the ``[tokens, vocab]``
logits are never built.  Without labels (generation, plain inference) the original forward
runs unchanged.  With labels in eval mode the original forward builds the logits (so
``compute_metrics`` still gets them) and the loss is the patched objective computed on them
with :func:`dft_kernels.cross_entropy`.

Never a silent no-op:

* ``patch`` refuses, naming the model type, what it cannot honour (no causal LM head, a head
  that is not a plain ``nn.Linear`` such as LoRA or quantised heads, encoder-decoders, MoE
  router aux losses, a custom loss type, ...);
* by default it *verifies* the decomposition numerically: on a short random sequence it
  compares the original forward's logits with ``transform(hidden @ W^T + b)`` as the patch
  computes them, once as is and once with the head weight temporarily amplified (so a
  softcap or other nonlinearity that the config does not announce shows up); a mismatch
  raises.  This is what catches a transformers upgrade that changes a model's head;
* the patch records itself on the model (``model.dft_kernels_objective``,
  ``model.dft_kernels_loss_kwargs``, ``model.dft_kernels_fused_calls``);
* if something bypasses the patched forward and runs the backbone with gradients in training
  mode (TRL >= 1.0's ``SFTTrainer`` installs its own fused LM head and computes its own loss),
  the forward pre-hook this patch puts on the backbone raises, pointing to
  :class:`ModelLossMixin` / :func:`compute_loss_func`.

``transformers`` is imported lazily, so ``import dft_kernels`` works without it.
"""

from .inspection import HeadSpec, PatchError, head_spec
from .loss_kwargs import COMPUTE_LOSS_KWARGS, PATCH_LOSS_KWARGS, check_loss_kwargs
from .patching import is_patched, patch, unpatch
from .trainer import ModelLossMixin, compute_loss_func
from .verify import verify_patch

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "verify_patch",
    "compute_loss_func",
    "ModelLossMixin",
    "HeadSpec",
    "head_spec",
    "PatchError",
    "PATCH_LOSS_KWARGS",
    "COMPUTE_LOSS_KWARGS",
    "check_loss_kwargs",
]
