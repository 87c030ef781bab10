"""What every trainer integration shares: the loss options read from a trainer's config, and
the check that each training micro-batch ran through the fused loss."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import torch
from transformers import TrainerCallback

import dft_kernels as dk
from dft_kernels.objectives import OBJECTIVES, Objective, get_objective

__all__ = ["LossOptions", "FusedLossCheck", "patched_model", "refuse_trainer_loss", "FrozenHead", "frozen_head",
           "unwrap_module", "plain_head", "Anchor"]

# Values of accum_dtype and logits_dtype a YAML config can give (dk.patch takes a torch.dtype or None).
_ACCUM_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "none": None}


@dataclass(frozen=True)
class Anchor:
    """The anchor of an anchored objective (ASFT): ``kl_coef * KL`` to a frozen reference model, ``kl``
    ``"forward"`` (``KL(pi_ref || pi_theta)``) or ``"reverse"``; ``normalization`` how the trainer's
    micro-batch loss is normalised (the integration that sets it documents the values)."""

    kl_coef: float = 0.1
    kl: str = "forward"
    normalization: str = "tokens"

    def __post_init__(self):
        if isinstance(self.kl_coef, bool) or not isinstance(self.kl_coef, (int, float)) or not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be a number >= 0, got {self.kl_coef!r}")
        if self.kl not in ("forward", "reverse"):
            raise ValueError(f"kl must be 'forward' or 'reverse', got {self.kl!r}")


@dataclass(frozen=True)
class LossOptions:
    """The objective and the ``dk.patch`` loss options an integration patches the model with.

    From a trainer's config (a YAML mapping) with :meth:`from_config`::

        dft_kernels:
          objective: dft          # any dk objective name: ce, dft, power, focal, chord, prob, entropy
          min_weight: 0.1         # the objective's own parameters (DFT: min_weight, Power: alpha, ...)
          chunk_size: 4096        # dk.patch options: ignore_index, label_smoothing, z_loss, backend,
                                  # chunk_size, accum_dtype, logits_dtype (the fast mode), validate
    """

    objective: Objective = field(default_factory=dk.DFT)
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)
    anchor: Optional["Anchor"] = None   # set by an integration that trains against a reference model (ASFT)

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]], *, where: str = "dft_kernels") -> "LossOptions":
        """Build the options from a mapping; ``where`` names it in error messages."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise TypeError(f"{where} must be a mapping (objective: ..., chunk_size: ...), got {type(config).__name__}")
        config = dict(config)
        name = config.pop("objective", "dft")
        if isinstance(name, Objective):
            objective = name
        else:
            if not isinstance(name, str):
                raise TypeError(f"{where}.objective must be an objective name, got {type(name).__name__}")
            obj_cls = type(get_objective(name))  # unknown names raise here, listing the known ones
            params = {f.name: config.pop(f.name) for f in fields(obj_cls) if f.name in config}
            try:
                objective = obj_cls(**params)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from e
        if "reduction" in config and config["reduction"] != "mean":
            raise ValueError(f"{where}.reduction: a trainer needs a scalar loss normalised as its own (mean with "
                             f"num_items_in_batch); got {config['reduction']!r}")
        for key_name in ("accum_dtype", "logits_dtype"):  # dtypes as YAML strings
            if key_name in config and config[key_name] is not None and not isinstance(config[key_name], torch.dtype):
                key = str(config[key_name]).lower()
                if key not in _ACCUM_DTYPES:
                    raise ValueError(f"{where}.{key_name}: expected one of {sorted(_ACCUM_DTYPES)}, "
                                     f"got {config[key_name]!r}")
                config[key_name] = _ACCUM_DTYPES[key]
        misplaced = sorted(set(config) & {f.name for c in OBJECTIVES.values() for f in fields(c)})
        if misplaced:
            raise ValueError(f"{where}: {', '.join(misplaced)} not a parameter of objective {objective!r}")
        return cls(objective=objective, loss_kwargs=config)

    def patch(self, model):
        """``dk.patch(model, objective, **loss_kwargs)``; unknown options raise a TypeError naming them."""
        return dk.patch(model, self.objective, **dict(self.loss_kwargs))


def patched_model(model):
    """The model ``dk.patch`` recorded itself on (PEFT and DDP-style wrappers unwrapped), or None."""
    seen = 0
    while model is not None and seen < 8:
        if dk.hf.is_patched(model):
            get_base = getattr(model, "get_base_model", None)
            return get_base() if callable(get_base) and type(model).__name__.startswith("Peft") else model
        model = getattr(model, "module", None)
        seen += 1
    return None


def refuse_trainer_loss(trainer, where: str) -> None:
    """Raise when ``trainer`` is set up to compute its own loss on the logits (it would pop the labels,
    so the patched model would run its original forward and the dft_kernels loss would not be used)."""
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(f"{where}: the trainer has a compute_loss_func ({trainer.compute_loss_func!r}), which "
                         "computes the loss on the logits instead of the dft_kernels loss; remove the option that "
                         "sets it")
    if getattr(trainer, "label_smoother", None) is not None:
        raise ValueError(f"{where}: label_smoothing_factor makes the trainer compute a label-smoothed loss on the "
                         "logits instead of the dft_kernels loss; use the dft_kernels label_smoothing option")


class FusedLossCheck(TrainerCallback):
    """Stops training, before the optimizer step, when a training micro-batch did not run through
    the ``dk.patch`` fused loss (``model.dft_kernels_fused_calls`` did not grow).

    This is what catches a trainer that computes its loss some other way: a ``compute_loss_func``
    or label smoother (they pop the labels, so the model runs its original forward), a fused LM
    head of its own (TRL >= 1.0), a model that was not patched at all.  ``micro_batches`` counts
    the micro-batches checked.
    """

    def __init__(self):
        self.micro_batches = 0
        self._last: Optional[int] = None

    def _calls(self, model) -> int:
        target = patched_model(model)
        if target is None:
            raise RuntimeError(
                f"dft_kernels: the model being trained ({type(model).__name__}) is not patched with dk.patch, so "
                "the trainer would train with its own loss; see docs/integrations.md for the supported entry points")
        return int(target.__dict__.get("dft_kernels_fused_calls", 0))

    def _check(self, state, model, what: str) -> None:
        calls = self._calls(model)
        if self._last is None or calls <= self._last:
            raise RuntimeError(
                f"dft_kernels: {what} of optimizer step {state.global_step + 1} did not run through the dft_kernels "
                "fused loss (model.dft_kernels_fused_calls did not grow): the trainer computed its loss without "
                "passing labels to the patched model (a compute_loss_func, label smoothing, its own DFT or fused "
                "LM head). Stopping before the optimizer step; see docs/integrations.md.")
        self.micro_batches += 1
        self._last = calls

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._last = self._calls(model)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._check(state, model, "a micro-batch")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._check(state, model, "the last micro-batch")


# ------------------------------------------------------------------ a frozen second model (reference, teacher)


def unwrap_module(model):
    """The module inside DDP / DeepSpeed-engine / accelerate wrappers (``.module`` chains)."""
    seen = 0
    while isinstance(getattr(model, "module", None), torch.nn.Module) and seen < 8:
        model = model.module
        seen += 1
    return model


def plain_head(model, who: str, role: str):
    """Refuse a causal LM whose logits are not ``hidden @ lm_head.weight.T (+ bias)`` (a final logit
    softcap or a logit scale in its config): the heads here take no such transform."""
    from dft_kernels.hf.inspection import head_spec

    spec = head_spec(model)
    if spec.softcap is not None or not (isinstance(spec.scale, float) and spec.scale == 1.0):
        raise ValueError(f"{who}: the {role} model's config scales or softcaps its logits (scale {spec.scale!r}, "
                         f"final_logit_softcapping {spec.softcap!r}), which this integration does not apply; "
                         "use the trainer's own loss for this model")
    return spec


@dataclass(frozen=True)
class FrozenHead:
    """A frozen model's final hidden states at a batch's positions and its LM head, detached."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float] = None   # the model's final logit softcap (only with plain=False)


def frozen_head(model, input_ids, attention_mask=None, *, who: str, role: str, plain: bool = True) -> FrozenHead:
    """Run a frozen causal LM's backbone (no gradient, eval mode) on ``input_ids`` / ``attention_mask``
    and return its final hidden states with its head weight and bias; its ``[tokens, vocab]`` logits
    are never built.  DDP / DeepSpeed / accelerate wrappers are unwrapped; a DTensor head is gathered.
    ``plain``: refuse a model whose config scales or softcaps its logits; otherwise its logit scale is
    folded into the hidden states and the bias (``scale (h W^T + b) = (scale h) W^T + scale b``) and its
    softcap returned in ``softcap``."""
    from dft_kernels.hf.inspection import _backbone, _check_head, head_spec

    inner = unwrap_module(model)
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base) and type(inner).__name__.startswith("Peft"):
        head_owner = get_base()
    else:
        head_owner = inner
    spec = plain_head(head_owner, who, role) if plain else head_spec(head_owner)
    head = _check_head(head_owner)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            out = _backbone(head_owner)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        inner.train(was_training)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    w, b = head.weight, head.bias
    full = getattr(w, "full_tensor", None)
    if callable(full):  # FSDP2 DTensor
        w = full()
        b = b.full_tensor() if b is not None and callable(getattr(b, "full_tensor", None)) else b
    hidden, w, b = hidden.detach(), w.detach(), None if b is None else b.detach()
    scale = spec.scale
    if not (isinstance(scale, float) and scale == 1.0):
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().to(device=hidden.device, dtype=hidden.dtype)
        hidden = hidden * scale
        b = None if b is None else b * scale
    return FrozenHead(hidden=hidden, weight=w, bias=b, softcap=spec.softcap)
