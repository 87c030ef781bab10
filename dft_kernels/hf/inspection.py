"""Model inspection: what ``dk.patch`` reads from a Hugging Face model, and what it refuses."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

# Model types whose ForCausalLM forward is known to add terms to the loss we would drop.
_REFUSED_CONFIG_FLAGS = {
    "output_router_logits": "the MoE router auxiliary loss (output_router_logits=True) is added by the model's "
                            "own forward and the patched loss would drop it; set "
                            "model.config.output_router_logits = False (or use the unpatched model)",
}


class PatchError(ValueError):
    """Raised when ``dk.patch`` cannot honour what the model's own forward does."""


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None) or "?"
    return f"model type {mtype!r} ({type(model).__name__})"


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except Exception:  # noqa: BLE001 - older configs
            return cfg
    return cfg


def _unwrap(model):
    """Return the Hugging Face model to patch (PEFT models are unwrapped to their base model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        model = get_base()
    if getattr(model, "config", None) is None:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and getattr(inner, "config", None) is not None:
            raise TypeError(
                f"model is a {type(model).__name__} wrapping {type(inner).__name__}; call dk.patch on the Hugging "
                "Face model before wrapping it (DDP / FSDP / DeepSpeed / torch.compile)")
        raise TypeError(f"model must be a Hugging Face causal LM with a .config, got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class HeadSpec:
    """How a model turns the head output into its logits: ``softcap(scale * (h W^T + b))``.

    ``scale`` is a float, or a one-element tensor (a learnable scale then gets its gradient).
    """

    scale: Union[float, Tensor] = 1.0
    softcap: Optional[float] = None
    note: str = "plain head"

    def apply(self, logits: Tensor) -> Tensor:
        """The transform on given logits (used by the verification)."""
        if not (isinstance(self.scale, float) and self.scale == 1.0):
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def head_spec(model) -> HeadSpec:
    """Read the head's logit transform from the model and its (text) config."""
    cfg = _text_config(model)
    notes = []
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = float(softcap)
        notes.append(f"final_logit_softcapping={softcap}")
    scale: Union[float, Tensor] = 1.0
    logit_scale = getattr(model, "logit_scale", None)  # Cohere keeps config.logit_scale on the model
    if logit_scale is None:
        logit_scale = getattr(cfg, "logit_scale", None)
    if logit_scale is not None:
        if isinstance(logit_scale, Tensor):
            if logit_scale.numel() != 1:
                raise PatchError(f"{_describe(model)}: logit_scale has shape {tuple(logit_scale.shape)}; "
                                 "dk.patch supports a scalar logit scale only")
            scale = logit_scale.reshape(())
        else:
            scale = float(logit_scale)
        notes.append("logit_scale")
    logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides the logits by it
    if logits_scaling is not None:
        scale = scale / float(logits_scaling)
        notes.append(f"1/logits_scaling={1.0 / float(logits_scaling):g}")
    return HeadSpec(scale=scale, softcap=softcap, note=", ".join(notes) or "plain head")


def _check_head(model) -> nn.Linear:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None:
        raise PatchError(f"{_describe(model)} has no output embeddings (get_output_embeddings() is None); "
                         "dk.patch supports causal language models with a linear LM head")
    # FSDP2 subclasses the module's class dynamically but keeps nn.Linear.forward; LoRA, quantised
    # and other custom heads compute something other than x W^T + b from .weight.
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise PatchError(
            f"{_describe(model)}: the LM head is a {type(head).__name__}, not a plain torch.nn.Linear "
            "(LoRA on lm_head, quantised heads and custom heads are not supported: the fused loss reads "
            "head.weight and head.bias directly)")
    return head


def _backbone(model) -> nn.Module:
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise PatchError(f"{_describe(model)} has no separate backbone (model.base_model is the model itself); "
                         "dk.patch supports *ForCausalLM-style models whose forward runs model.base_model "
                         "then the LM head")
    return base


def _check_model(model) -> None:
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise PatchError(f"{_describe(model)} is an encoder-decoder; dk.patch supports decoder-only causal LMs")
    _check_head(model)
    sig = inspect.signature(type(model).forward)
    takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if "labels" not in sig.parameters and not takes_kwargs:
        raise PatchError(f"{_describe(model)}: forward() takes no labels, so it is not a causal LM head model")
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise PatchError(f"{_describe(model)} uses loss_type={loss_type!r}; dk.patch replaces the causal-LM "
                         "(ForCausalLM) loss only")
    for flag, why in _REFUSED_CONFIG_FLAGS.items():
        if getattr(_text_config(model), flag, False) or getattr(cfg, flag, False):
            raise PatchError(f"{_describe(model)}: {why}")
