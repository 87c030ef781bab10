"""TRL's ``SFTTrainer`` with the loss taken from the ``dk.patch``-ed model, and TRL's ``GRPOTrainer``
with its per-token log-probs and entropy taken from ``dk.linear_logprobs``.

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

TRL >= 1.15's ``GRPOTrainer`` (and its RLOO, DPO and KTO trainers) get their per-token log-probs
from a fused LM head TRL installs on the model (``add_fused_lm_head``: the forward called with
``fused_lm_head=True``).  :func:`add_logprob_head` installs ours in its place, computing the
log-probs and the entropy with ``dk.linear_logprobs`` at the trainer's temperature;
``DFTGRPOTrainer`` is ``GRPOTrainer`` with it, and TRL's loss math unchanged::

    from dft_kernels.integrations.trl import DFTGRPOTrainer

    trainer = DFTGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=prompts)

TRL's GKD (``trl.experimental.gkd.GKDTrainer``) computes its generalized Jensen-Shannon loss on the
student's and the teacher's full logits.  ``DFTGKDTrainer`` is ``GKDTrainer`` with that loss from
``dk.linear_distill`` on the two models' final hidden states and head weights (:func:`add_distill_head`);
TRL's on-policy / sequence-level generation, data and everything else are unchanged::

    from dft_kernels.integrations.trl import DFTGKDTrainer      # imports trl.experimental.gkd

    trainer = DFTGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), train_dataset=ds)
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Mapping, Optional

import torch
import trl
from trl import GRPOTrainer, SFTTrainer

try:  # TRL >= 1.15 (which needs Python >= 3.11): the fused LM head contract of its RL trainers
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError:
    FusedCausalLMOutput = None

import dft_kernels as dk
from dft_kernels.hf import ModelLossMixin
from dft_kernels.options import is_dtensor

from .common import FusedLossCheck, LossOptions, frozen_head, plain_head, refuse_trainer_loss, unwrap_module

__all__ = ["DFTSFTTrainer", "DFTGRPOTrainer", "add_logprob_head", "add_distill_head"]  # and DFTGKDTrainer (lazy)

# Config attributes that scale a model's logits before its softcap (TRL's fused head applies them;
# this head refuses them rather than guess their convention).
_LOGIT_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


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


def _require_fused_head(who: str) -> None:
    if FusedCausalLMOutput is None:
        raise ImportError(f"{who} needs TRL >= 1.15, whose RL trainers take their log-probs from a fused LM head "
                          f"(trl.trainer.utils.FusedCausalLMOutput); TRL {trl.__version__} is installed (on Python "
                          "3.10 pip resolves TRL 1.14, the last release for it). DFTSFTTrainer works with it")


def add_logprob_head(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                     return_entropy: bool = True, logprob_kwargs: Optional[Mapping[str, Any]] = None) -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` return TRL's ``FusedCausalLMOutput``
    with ``log_probs`` (and ``entropy``) from :func:`dk.linear_logprobs`, at ``temperature``.

    The contract of TRL's ``add_fused_lm_head``: per-token outputs of the next-token labels
    (``labels[:, 1:]``, or ``shift_labels`` as given), 0 where the label is -100, ``label_mask``,
    and ``loss`` the mean negative log-prob (over ``num_items_in_batch`` when given).  Without
    ``fused_lm_head`` the forward is the one the model had (generation is unchanged).  The model's
    ``final_logit_softcapping`` is applied; ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``
    are None.  ``logprob_kwargs``: ``backend``, ``chunk_size``, ``validate`` of ``dk.linear_logprobs``.
    ``model.dft_kernels_logprob_calls`` counts the calls.
    """
    _require_fused_head("add_logprob_head")
    kwargs = dict(logprob_kwargs or {})
    unknown = sorted(set(kwargs) - {"backend", "chunk_size", "validate"})
    if unknown:
        raise ValueError(f"logprob_kwargs: {unknown} not among backend, chunk_size, validate (the temperature is "
                         "the trainer's; the softcap is the model config's final_logit_softcapping)")
    text_config = model.config.get_text_config()
    for attr in _LOGIT_SCALE_ATTRS:
        value = getattr(text_config, attr, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(f"add_logprob_head: the model config sets {attr}={value}, a logit scale this head does "
                             "not apply; use TRL's own fused LM head for this model")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    previous_forward = model.forward
    model.dft_kernels_logprob_calls = 0

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **fwd_kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **{k: v for k, v in passed.items() if v is not None}, **fwd_kwargs)
        if fwd_kwargs.get("output_router_logits"):
            raise ValueError("add_logprob_head: output_router_logits (the MoE aux loss) is not supported; set "
                             "router_aux_loss_coef=0.0")
        fwd_kwargs["use_cache"] = False
        hidden = self.base_model(*args, **fwd_kwargs).last_hidden_state
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if is_dtensor(weight):   # FSDP2: gather the head, as TRL does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        shift = shift_labels is None
        target = (labels if shift else shift_labels).to(weight.device)
        hidden = hidden.to(weight.device)
        autocast_off = contextlib.nullcontext()
        if cast_lm_head_to_fp32:   # TRL's option: the head in float32, outside autocast
            autocast_off = torch.autocast(hidden.device.type, enabled=False)
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        with autocast_off:
            out = dk.linear_logprobs(hidden, weight, target, bias=bias, temperature=temperature, softcap=softcap,
                                     shift=shift, return_entropy=return_entropy, **kwargs)
        self.dft_kernels_logprob_calls += 1
        log_probs, entropy = out if return_entropy else (out, None)
        mask = (target[:, 1:] if shift else target) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)


class DFTGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with its per-token log-probs and entropy (policy, old policy and reference
    model) from ``dk.linear_logprobs`` at ``args.temperature``; the loss math is TRL's, unchanged.

    ``dft_logprob_kwargs``: ``backend``, ``chunk_size``, ``validate`` of ``dk.linear_logprobs``.
    Refused: DeepSpeed ZeRO-3 (the head's backward reads the full weight outside the module's
    gather), ``use_liger_kernel`` (Liger's GRPO loss bypasses the head) and the MoE router aux loss.
    """

    def __init__(self, *args, dft_logprob_kwargs: Optional[Mapping[str, Any]] = None, **kwargs):
        _require_fused_head("DFTGRPOTrainer")
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("DFTGRPOTrainer: DeepSpeed ZeRO-3 is not supported (the head is read outside its "
                             "module's parameter gather); use ZeRO-2 or FSDP2")
        if getattr(self.args, "use_liger_kernel", False):
            raise ValueError("DFTGRPOTrainer: use_liger_kernel=True computes the GRPO loss in Liger's own head, "
                             "bypassing dk.linear_logprobs; set use_liger_kernel=False")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("DFTGRPOTrainer: the MoE router auxiliary loss is enabled (router_aux_loss_coef); set "
                             "GRPOConfig(router_aux_loss_coef=0.0)")
        cast = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_logprob_head(policy, temperature=self.temperature, cast_lm_head_to_fp32=cast,
                         logprob_kwargs=dft_logprob_kwargs)
        if self.ref_model is not None:
            add_logprob_head(self.ref_model, temperature=self.temperature, cast_lm_head_to_fp32=cast,
                             return_entropy=False, logprob_kwargs=dft_logprob_kwargs)


# ------------------------------------------------------------------ GKD: the generalized JSD from two heads

_DISTILL_KWARG = "dft_kernels_distill"
_DISTILL_OPTIONS = ("temperature", "backend", "chunk_size", "validate")


def add_distill_head(model, **distill_kwargs) -> None:
    """Make ``model(input_ids=, attention_mask=, dft_kernels_distill=(teacher, labels, beta,
    num_items_in_batch))`` (``teacher`` a :class:`~dft_kernels.integrations.common.FrozenHead` of the
    teacher at the same positions) return ``CausalLMOutputWithPast(loss=..., logits=None)`` with the
    loss from ``dk.linear_distill`` on the model's final hidden states and head weight, next-token
    aligned (position ``t`` counts where ``labels[:, t + 1] != -100``), computed inside the head
    module's call (FSDP / DeepSpeed hooks run around it); ``model.dft_kernels_distill_calls`` counts
    the calls.  Other calls (generation, inference) run the forward the model had.
    ``distill_kwargs``: ``temperature`` (default 1.0: TRL's GKD loss), ``backend``, ``chunk_size``,
    ``validate`` of ``dk.linear_distill``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from dft_kernels.hf.forward import _run_in_head
    from dft_kernels.hf.inspection import _backbone, _check_head

    unknown = sorted(set(distill_kwargs) - set(_DISTILL_OPTIONS))
    if unknown:
        raise ValueError(f"dft_distill_kwargs: {unknown} not among {list(_DISTILL_OPTIONS)} (beta is the trainer's; "
                         "the reduction is TRL's: the mean over valid tokens, or / num_items_in_batch)")
    plain_head(model, "add_distill_head", "student")
    previous_forward = model.forward
    model.dft_kernels_distill_calls = 0

    @functools.wraps(getattr(previous_forward, "__func__", previous_forward))
    def forward(self, *args, **kwargs):
        request = kwargs.pop(_DISTILL_KWARG, None)
        if request is None:
            return previous_forward(*args, **kwargs)
        if args:
            raise TypeError("add_distill_head: pass the inputs by keyword (input_ids=..., attention_mask=...)")
        if kwargs.get("output_router_logits"):
            raise ValueError("add_distill_head: output_router_logits (the MoE aux loss) is not supported")
        teacher, labels, beta, num_items_in_batch = request
        kwargs["use_cache"] = False
        hidden = _backbone(self)(**kwargs).last_hidden_state
        head = _check_head(self)

        def distill(h):
            w, b = head.weight, head.bias
            if is_dtensor(w):   # FSDP2: gather the head, as TRL does
                w = w.full_tensor()
                b = None if b is None else b.full_tensor()
            autocast_off = contextlib.nullcontext()
            if torch.is_autocast_enabled(h.device.type):   # the head GEMM in the autocast dtype, as nn.Linear
                dt = torch.get_autocast_dtype(h.device.type)
                h, w, b = h.to(dt), w.to(dt), None if b is None else b.to(dt)
                autocast_off = torch.autocast(h.device.type, enabled=False)
            elif h.dtype != w.dtype:
                h = h.to(w.dtype)
            tb = None if teacher.bias is None else teacher.bias.to(device=h.device, dtype=h.dtype)
            with autocast_off:
                return dk.linear_distill(h, w, teacher.hidden.to(device=h.device, dtype=h.dtype),
                                         teacher.weight.to(device=h.device, dtype=h.dtype), labels.to(h.device),
                                         bias=b, teacher_bias=tb, beta=beta, shift=True,
                                         num_items_in_batch=num_items_in_batch, **distill_kwargs)

        loss = _run_in_head(head, hidden, distill)
        self.dft_kernels_distill_calls += 1
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)


def _gkd_trainer_class():
    from trl.experimental.gkd import GKDTrainer

    class DFTGKDTrainer(GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` with its generalized JSD loss from ``dk.linear_distill``
        on the student's and the teacher's final hidden states and head weights: neither model's
        ``[tokens, vocab]`` logits are built.  The loss is TRL's: ``beta`` from ``args.beta``, the
        divergence at temperature 1 (TRL's ``compute_loss`` does not pass ``args.temperature``, its
        sampling temperature, to the loss), masked where the next-token label is -100, the sum over
        valid tokens / ``num_items_in_batch`` (the mean over the micro-batch's valid tokens without it).

        ``dft_distill_kwargs``: ``temperature`` (of the divergence; default 1.0 as TRL's loss),
        ``backend``, ``chunk_size``, ``validate`` of ``dk.linear_distill``.  Refused: DeepSpeed ZeRO-3
        (the heads are read outside their modules' parameter gather), ``use_liger_kernel``, the MoE
        router aux loss, and models whose config scales or softcaps the logits.
        """

        def __init__(self, *args, dft_distill_kwargs: Optional[Mapping[str, Any]] = None, **kwargs):
            super().__init__(*args, **kwargs)
            from accelerate.utils import is_peft_model
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ValueError("DFTGKDTrainer: DeepSpeed ZeRO-3 is not supported (the heads are read outside "
                                 "their modules' parameter gather); use ZeRO-2 or FSDP2")
            if getattr(self.args, "use_liger_kernel", False):
                raise ValueError("DFTGKDTrainer: use_liger_kernel=True; the loss is dk.linear_distill, set "
                                 "use_liger_kernel=False")
            if getattr(self, "aux_loss_enabled", False):
                raise ValueError("DFTGKDTrainer: the MoE router auxiliary loss is enabled (router_aux_loss_coef); "
                                 "TRL's GKD loss does not add it either. Set GKDConfig(router_aux_loss_coef=0.0)")
            refuse_trainer_loss(self, "DFTGKDTrainer")
            student = self.model.get_base_model() if is_peft_model(self.model) else self.model
            add_distill_head(student, **dict(dft_distill_kwargs or {}))
            plain_head(unwrap_module(self.teacher_model), "DFTGKDTrainer", "teacher")
            self.dft_kernels_student = student

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher = frozen_head(self.teacher_model, inputs["input_ids"], inputs["attention_mask"],
                                  who="DFTGKDTrainer", role="teacher")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            **{_DISTILL_KWARG: (teacher, inputs["labels"], self.beta, num_items_in_batch)})
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return DFTGKDTrainer


_LAZY = {}


def __getattr__(name):  # DFTGKDTrainer imports trl.experimental (which warns) only when asked for
    if name == "DFTGKDTrainer":
        if name not in _LAZY:
            _LAZY[name] = _gkd_trainer_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
