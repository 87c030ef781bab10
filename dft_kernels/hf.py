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

from __future__ import annotations

import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import cross_entropy, linear_cross_entropy
from .objectives import Objective, ObjectiveLike, get_objective
from .options import LINEAR_ONLY_OPTIONS, OPTION_NAMES, LossOptions

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
]

# Options that come from the model or from each call, with the reason given when passed to patch().
_NOT_PATCH_KWARGS = {
    "softcap": "it is read from the model config (final_logit_softcapping)",
    "bias": "it is the head's own bias",
    "shift": "labels are shifted as Hugging Face shifts them (pass shift_labels= to the forward to give "
             "pre-shifted targets)",
    "num_items_in_batch": "it is a per-batch value; Trainer passes it to the forward",
    "token_weights": "they are per-batch; pass token_weights= (shaped like labels) to the forward",
    "return_stats": "the model output has no field for them; call dk.linear_cross_entropy yourself for stats",
    "input": "the patched forward supplies it", "weight": "the patched forward supplies it",
    "target": "the patched forward supplies it",
}
# Options of dk.linear_cross_entropy that dk.patch accepts once for every call: all but the above.
PATCH_LOSS_KWARGS = tuple(n for n in OPTION_NAMES if n != "objective" and n not in _NOT_PATCH_KWARGS)
# compute_loss_func works on the model's logits (no weight) and must return the Trainer's scalar loss.
COMPUTE_LOSS_KWARGS = tuple(n for n in PATCH_LOSS_KWARGS if n not in LINEAR_ONLY_OPTIONS and n != "reduction")
# Per-call keyword arguments the patched forward consumes (never passed to the backbone).
_CALL_LOSS_KEYS = ("num_items_in_batch", "ignore_index", "shift_labels", "token_weights")

_STATE_ATTR = "_dft_kernels_state"
_MISSING = object()
# Model types whose ForCausalLM forward is known to add terms to the loss we would drop.
_REFUSED_CONFIG_FLAGS = {
    "output_router_logits": "the MoE router auxiliary loss (output_router_logits=True) is added by the model's "
                            "own forward and the patched loss would drop it; set "
                            "model.config.output_router_logits = False (or use the unpatched model)",
}


class PatchError(ValueError):
    """Raised when ``dk.patch`` cannot honour what the model's own forward does."""


# --------------------------------------------------------------------------------------------
# model inspection
# --------------------------------------------------------------------------------------------

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


def check_loss_kwargs(loss_kwargs: dict, objective: ObjectiveLike = "dft", *, allowed=PATCH_LOSS_KWARGS,
                      caller: str = "dk.patch()") -> dict:
    """Check ``loss_kwargs`` as ``dk.patch(model, objective, **loss_kwargs)`` would (names, then values
    with :class:`~dft_kernels.options.LossOptions`); returns them as a new dict.  ``TypeError`` for
    a name ``caller`` does not take, ``TypeError``/``ValueError`` naming the option for a bad value."""
    if not isinstance(loss_kwargs, dict):
        raise TypeError(f"loss_kwargs must be a mapping of option name to value, got {type(loss_kwargs).__name__}")
    for key in loss_kwargs:
        if key in _NOT_PATCH_KWARGS and key not in allowed:
            raise TypeError(f"{caller} does not take {key!r}: {_NOT_PATCH_KWARGS[key]}")
        if key not in allowed:
            raise TypeError(f"{caller} got an unexpected keyword argument {key!r}; loss options are "
                            f"{', '.join(allowed)}")
    LossOptions(objective=objective, **loss_kwargs)
    return dict(loss_kwargs)


# --------------------------------------------------------------------------------------------
# state, guard, patched forward
# --------------------------------------------------------------------------------------------

@dataclass
class _PatchState:
    objective: Objective
    loss_kwargs: dict
    spec: HeadSpec
    instance_forward: Any            # model.__dict__["forward"] before patching, or None
    guard_handle: Any = None
    liger: bool = False
    depth: int = 0                   # > 0 while the patched forward runs
    warned_no_labels: bool = False
    signature: Any = field(default=None, repr=False)

    def call_original(self, model, *args, **kwargs):
        if self.instance_forward is not None:
            return self.instance_forward(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)


class _BackboneGuard:
    """Forward pre-hook on the backbone: raises when it runs with gradients in training mode
    outside the patched forward, i.e. when the patched loss has been bypassed."""

    def __init__(self, model: nn.Module):
        self.model_desc = _describe(model)
        self.model_ref = model  # a plain reference: copy.deepcopy maps it to the copy

    def __call__(self, module, args):
        model = self.model_ref
        state = model.__dict__.get(_STATE_ATTR)
        if state is None or state.depth > 0 or not module.training or not torch.is_grad_enabled():
            return None
        raise RuntimeError(
            f"{self.model_desc} is patched by dft_kernels (objective={state.objective!r}), but its backbone ran "
            "in training mode with gradients outside the patched forward: something replaced or bypassed "
            "model.forward after dk.patch (TRL >= 1.0's SFTTrainer, for one, installs its own fused LM head "
            "and computes its own loss), so the dft_kernels loss would silently not be used. Either make the "
            "trainer take the loss from the model (class MyTrainer(dft_kernels.hf.ModelLossMixin, SFTTrainer)), "
            "or pass compute_loss_func=dft_kernels.hf.compute_loss_func(...), or call dk.unpatch(model) to use "
            "the other loss deliberately. See docs/integrations.md.")


def _bind(state: _PatchState, args: tuple, kwargs: dict) -> Optional[dict]:
    """Map the call's arguments to names (positional ones included); None when they do not bind."""
    sig = state.signature
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    flat = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif sig.parameters[name].kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            flat[name] = value
    return flat


def _want_tuple(model, flat: dict) -> bool:
    rd = flat.get("return_dict")
    if rd is None:
        rd = getattr(model.config, "return_dict", True)
    return rd is False


def _slice_to_keep(hidden: Tensor, logits_to_keep) -> Tensor:
    """Hugging Face's logits_to_keep semantics (int: last k, 0 = all; 1-D / 2-D int tensor: positions)."""
    if logits_to_keep is None:
        return hidden
    if isinstance(logits_to_keep, Tensor):
        if logits_to_keep.dtype == torch.bool:
            raise ValueError("logits_to_keep: a boolean mask flattens the positions, which cannot be aligned with "
                             "labels; the patched loss supports an int or integer positions")
        if logits_to_keep.dim() == 2:
            return torch.take_along_dim(hidden, logits_to_keep.to(hidden.device)[..., None], dim=1)
        return hidden[:, logits_to_keep.to(hidden.device), :]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        raise TypeError(f"logits_to_keep must be an int or a tensor, got {type(logits_to_keep).__name__}")
    if logits_to_keep == 0:
        return hidden
    return hidden[:, -logits_to_keep:, :]


def _run_in_head(head: nn.Module, hidden: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Run ``fn(hidden)`` as the head module's forward, so its hooks (FSDP unshard, DeepSpeed
    gather, accelerate device placement) run around it."""
    attr = "_old_forward" if hasattr(head, "_hf_hook") and "_old_forward" in head.__dict__ else "forward"
    saved = head.__dict__.get(attr, _MISSING)
    head.__dict__[attr] = fn
    try:
        return head(hidden)
    finally:
        if saved is _MISSING:
            del head.__dict__[attr]
        else:
            head.__dict__[attr] = saved


def _head_operands(head: nn.Linear, x: Tensor, spec: HeadSpec):
    """Weight, bias and input as the head would use them (autocast, FSDP2 DTensor), with the
    logit scale folded in: scale * (x W^T + b) = (scale x) W^T + scale b."""
    w, b = head.weight, head.bias
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - torch built without distributed
        DTensor = ()
    if DTensor and isinstance(w, DTensor):
        w = w.full_tensor()
        b = b.full_tensor() if isinstance(b, DTensor) else b
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
        b = None if b is None else b.to(dt)
    elif x.dtype != w.dtype:
        x = x.to(w.dtype)
    scale = spec.scale
    if not (isinstance(scale, float) and scale == 1.0):
        if isinstance(scale, Tensor):
            scale = scale.to(device=x.device, dtype=x.dtype)
        x = x * scale
        b = None if b is None else b * scale
    return x, w, b


def _loss_options(state: _PatchState, extra: dict) -> dict:
    opts = dict(state.loss_kwargs)
    if extra.get("ignore_index") is not None:
        opts["ignore_index"] = extra["ignore_index"]
    return opts


def _patched_forward(self, *args, **kwargs):
    state: _PatchState = self.__dict__[_STATE_ATTR]
    extra = {k: kwargs.pop(k) for k in _CALL_LOSS_KEYS if k in kwargs}
    flat = _bind(state, args, kwargs)
    labels = kwargs.get("labels") if flat is None else flat.get("labels")
    shift_labels = extra.get("shift_labels")
    if flat is None and (labels is not None or shift_labels is not None):
        raise TypeError(f"{_describe(self)} (patched by dft_kernels): could not map the positional arguments of "
                        "this call to forward()'s parameters; pass them by keyword (input_ids=..., labels=...)")
    state.depth += 1
    try:
        if labels is None and shift_labels is None:
            # No labels (generate, inference): exactly the unpatched model.
            if self.training and torch.is_grad_enabled() and not state.warned_no_labels:
                state.warned_no_labels = True
                warnings.warn(
                    f"{_describe(self)} is patched by dft_kernels (objective={state.objective!r}) but ran in training "
                    "mode with gradients and without labels, so the original forward ran and whatever the caller "
                    "computes from the logits is the loss (Trainer's label_smoothing_factor or compute_loss_func, "
                    "LLaMA-Factory's use_dft_loss, ... pop the labels). Pass labels to the model to use the patched "
                    "loss. (Warned once per model.)", stacklevel=2)
            return state.call_original(self, *args, **kwargs, **extra)
        if not self.training:
            return _eval_forward(self, state, flat, labels, extra)
        return _fused_forward(self, state, flat, labels, extra)
    finally:
        state.depth -= 1


def _forward_for(model, instance_forward) -> Callable:
    """The patched forward as a function carrying the class forward's name, docs and signature
    (``inspect.signature`` follows ``__wrapped__``): Trainer picks dataset columns and loss
    kwargs from it, and ``generate`` validates its model kwargs against it.

    After ``unpatch``, a wrapper installed on top of it (TRL's fused head) may still call it:
    it then forwards to what the model had before the patch."""

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if _STATE_ATTR not in self.__dict__:
            if instance_forward is not None:
                return instance_forward(*args, **kwargs)
            return type(self).forward(self, *args, **kwargs)
        return _patched_forward(self, *args, **kwargs)

    forward.__dft_kernels_patched__ = True
    return forward


def _targets(labels, extra, hidden_shape, device):
    """(target, shift) as Hugging Face's ForCausalLMLoss aligns them with the kept positions."""
    shift_labels = extra.get("shift_labels")
    if shift_labels is not None:
        target, shift, name = shift_labels, False, "shift_labels"
    else:
        target, shift, name = labels, True, "labels"
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if tuple(target.shape) != tuple(hidden_shape):
        raise ValueError(f"{name} has shape {tuple(target.shape)} but the kept positions are {tuple(hidden_shape)} "
                         "(batch, positions); with logits_to_keep, labels must cover the kept positions")
    tw = extra.get("token_weights")
    if tw is not None:
        if not isinstance(tw, Tensor) or tuple(tw.shape) != tuple(target.shape):
            raise ValueError(f"token_weights must be a tensor shaped like {name} {tuple(target.shape)}, got "
                             f"{tuple(tw.shape) if isinstance(tw, Tensor) else type(tw).__name__}")
        tw = tw.to(device)
    return target.to(device), shift, tw


def _fused_forward(model, state: _PatchState, flat: dict, labels, extra: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    for flag, why in _REFUSED_CONFIG_FLAGS.items():
        if flat.get(flag):
            raise PatchError(f"{_describe(model)}: {why}")
    head = _check_head(model)  # PEFT or quantisation may have replaced it after patching
    backbone = _backbone(model)
    want_tuple = _want_tuple(model, flat)
    logits_to_keep = flat.get("logits_to_keep", 0)
    call = {k: v for k, v in flat.items() if k not in ("labels", "logits_to_keep", "return_dict")}
    outputs = backbone(**call)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = _slice_to_keep(hidden, logits_to_keep)
    target, shift, token_weights = _targets(labels, extra, hidden.shape[:-1], head.weight.device)
    opts = _loss_options(state, extra)
    spec = state.spec

    def fused_head(h: Tensor) -> Tensor:
        x, w, b = _head_operands(head, h, spec)
        with torch.autocast(x.device.type, enabled=False):
            return linear_cross_entropy(
                x, w, target.to(x.device), bias=b, objective=state.objective, softcap=spec.softcap,
                num_items_in_batch=extra.get("num_items_in_batch"), token_weights=token_weights, shift=shift,
                **opts)

    loss = _run_in_head(head, hidden, fused_head)
    if not torch.compiler.is_compiling():
        model.__dict__["dft_kernels_fused_calls"] = model.__dict__.get("dft_kernels_fused_calls", 0) + 1
    out = CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None))
    return out.to_tuple() if want_tuple else out


def _eval_forward(model, state: _PatchState, flat: dict, labels, extra: dict):
    """Labels in eval mode: the original forward builds the logits; the loss is the patched objective."""
    want_tuple = _want_tuple(model, flat)
    call = {k: v for k, v in flat.items() if k != "labels"}
    call["return_dict"] = True
    out = state.call_original(model, **call)
    logits = out.logits
    target, shift, token_weights = _targets(labels, extra, logits.shape[:-1], logits.device)
    opts = _loss_options(state, extra)
    opts.pop("accum_dtype", None)  # no weight gradient on this path
    out.loss = cross_entropy(logits, target, objective=state.objective, shift=shift,
                             num_items_in_batch=extra.get("num_items_in_batch"), token_weights=token_weights,
                             **opts)
    return out.to_tuple() if want_tuple else out


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------

def _params_materialised(model) -> Optional[str]:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            return f"parameter {name} is on the meta device"
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            return f"parameter {name} is partitioned by DeepSpeed ZeRO-3"
        try:
            from torch.distributed.tensor import DTensor
            if isinstance(p, DTensor):
                return f"parameter {name} is a sharded DTensor"
        except Exception:  # noqa: BLE001
            pass
    return None


def _verification_ids(model, head: nn.Linear, seq_len: int = 8) -> Tensor:
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = head.weight.shape[0]
    if isinstance(emb, nn.Embedding):
        vocab = min(vocab, emb.num_embeddings)
    device = emb.weight.device if isinstance(emb, nn.Embedding) else head.weight.device
    g = torch.Generator(device="cpu").manual_seed(1234)  # never touches the global RNG
    return torch.randint(0, vocab, (1, seq_len), generator=g).to(device)


def _compare(model, state: _PatchState, head: nn.Linear, ids: Tensor) -> float:
    ref = state.call_original(model, input_ids=ids, use_cache=False, return_dict=True).logits
    hidden = _backbone(model)(input_ids=ids, use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]

    def logits_of(h: Tensor) -> Tensor:
        x, w, b = _head_operands(head, h, state.spec)
        z = F.linear(x, w, b)
        return z if state.spec.softcap is None else state.spec.softcap * torch.tanh(z / state.spec.softcap)

    ours = _run_in_head(head, hidden, logits_of)
    if ours.shape != ref.shape:
        return float("inf")
    ref64, ours64 = ref.double(), ours.to(ref.device).double()
    denom = ref64.norm()
    return float((ours64 - ref64).norm() / denom) if denom > 0 else float(ours64.norm())


def verify_patch(model, *, amplify: bool = True) -> None:
    """Check numerically that the patched loss sees the same logits as ``model``'s own forward.

    Runs the original forward and the backbone + head transform on a short random sequence in
    eval mode without gradients (the global RNG and the training flags are left as they were),
    once as is and, when ``amplify``, once with the head weight multiplied by 2**6 in place
    (exactly undone afterwards), so that logits are large enough for a softcap or any other
    nonlinearity to show.  Raises :class:`PatchError` naming the model type on a mismatch.
    """
    model = _unwrap(model)
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _PatchState(get_objective("dft"), {}, head_spec(model), model.__dict__.get("forward"),
                            signature=_signature(model))
    head = _check_head(model)
    modes = {m: m.training for m in model.modules()}
    dtype = head.weight.dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    factor = 2.0 ** 6
    try:
        model.eval()
        with torch.no_grad():
            ids = _verification_ids(model, head)
            errors = [_compare(model, state, head, ids)]
            w = head.weight
            if amplify and type(w) is nn.Parameter and w.device.type != "meta":
                w.mul_(factor)
                try:
                    errors.append(_compare(model, state, head, ids))
                finally:
                    w.div_(factor)
    finally:
        for m, mode in modes.items():
            m.training = mode
    worst = max(errors)
    if not worst <= tol:
        raise PatchError(
            f"{_describe(model)}: the logits the patch would use (backbone -> head weight/bias, {state.spec.note}) "
            f"differ from the model's own forward (relative error {worst:.2e} > {tol:g}); the model's forward "
            "transforms its logits in a way dk.patch does not know, so the patched loss would be wrong. "
            "Not patching. (verify=False skips this check at your own risk.)")


# --------------------------------------------------------------------------------------------
# Liger-Kernel co-use
# --------------------------------------------------------------------------------------------

def _apply_liger(model) -> None:
    try:
        import liger_kernel.transformers as lt
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ImportError("dk.patch(model, liger=True) needs Liger-Kernel (pip install liger-kernel); it is "
                          f"not importable here: {e}") from e
    device = _check_head(model).weight.device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"dk.patch(model, liger=True): Liger-Kernel's RMSNorm/RoPE/SwiGLU kernels need CUDA, but "
                         f"{_describe(model)} is on {device}; move the model to a CUDA device or drop liger=True")
    mtype = getattr(model.config, "model_type", None)
    if mtype not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"dk.patch(model, liger=True): Liger-Kernel has no kernels for {_describe(model)}; "
                         f"supported model types: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)}")
    # The loss stays ours: Liger's fused linear cross-entropy and cross-entropy are off.
    lt._apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def _signature(model) -> inspect.Signature:
    sig = inspect.signature(type(model).forward)
    params = list(sig.parameters.values())[1:]  # drop self
    return sig.replace(parameters=params)


def is_patched(model) -> bool:
    """Whether ``dk.patch`` is in effect on ``model`` (PEFT models are unwrapped)."""
    try:
        model = _unwrap(model)
    except TypeError:
        return False
    return _STATE_ATTR in model.__dict__


def patch(model, objective: ObjectiveLike = "dft", *, liger: bool = False,
          verify: Union[bool, str] = "auto", **loss_kwargs):
    """Make ``model(…, labels=…)`` in training mode compute ``objective`` with the fused, chunked loss.

    ``model``: a Hugging Face causal LM (``*ForCausalLM`` or a model with the same structure;
    a PEFT model is unwrapped to its base model).  ``objective``: as in
    :func:`dft_kernels.linear_cross_entropy`.  ``loss_kwargs``: ``ignore_index``, ``reduction``,
    ``label_smoothing``, ``z_loss``, ``backend``, ``chunk_size``, ``accum_dtype``, ``validate``.
    ``liger``: also apply Liger-Kernel's RMSNorm/RoPE/SwiGLU kernels (CUDA only; its losses stay
    off).  ``verify``: ``"auto"`` (default) checks the decomposition numerically when the
    parameters are materialised and warns when they are not; ``True`` requires the check;
    ``False`` skips it.

    Patching an already patched model with the same options is a no-op; with different options
    it raises (``dk.unpatch`` first).  Returns the model.
    """
    model = _unwrap(model)
    obj = get_objective(objective)
    loss_kwargs = check_loss_kwargs(loss_kwargs, obj)
    if verify not in (True, False, "auto"):
        raise ValueError(f"verify must be True, False or 'auto', got {verify!r}")
    if not isinstance(liger, bool):
        raise TypeError(f"liger must be a bool, got {type(liger).__name__}")

    old = model.__dict__.get(_STATE_ATTR)
    if old is not None:
        if old.objective == obj and old.loss_kwargs == loss_kwargs and (old.liger or not liger):
            return model
        raise ValueError(
            f"{_describe(model)} is already patched with objective={old.objective!r}, "
            f"options={old.loss_kwargs}, liger={old.liger}; call dk.unpatch(model) before patching it differently")

    _check_model(model)
    _check_head(model)
    backbone = _backbone(model)
    spec = head_spec(model)
    state = _PatchState(obj, loss_kwargs, spec, model.__dict__.get("forward"), liger=liger,
                        signature=_signature(model))

    if verify is not False:
        why_not = _params_materialised(model)
        if why_not is None:
            model.__dict__[_STATE_ATTR] = state  # verify_patch reads the state (original forward)
            try:
                verify_patch(model)
            finally:
                del model.__dict__[_STATE_ATTR]
        elif verify is True:
            raise PatchError(f"{_describe(model)}: cannot verify the patch ({why_not}); patch before sharding or "
                             "offloading, or pass verify=False")
        else:
            warnings.warn(f"dk.patch: {_describe(model)} not verified numerically ({why_not}); the head transform "
                          f"used is: {spec.note}", stacklevel=2)

    if liger:
        _apply_liger(model)

    state.guard_handle = backbone.register_forward_pre_hook(_BackboneGuard(model))
    model.__dict__[_STATE_ATTR] = state
    model.__dict__["forward"] = types.MethodType(_forward_for(model, state.instance_forward), model)
    model.__dict__["dft_kernels_objective"] = obj
    model.__dict__["dft_kernels_loss_kwargs"] = dict(loss_kwargs)
    model.__dict__["dft_kernels_fused_calls"] = 0
    return model


def unpatch(model):
    """Restore the forward ``model`` had before ``dk.patch`` (a no-op on an unpatched model).

    Liger-Kernel's module kernels applied with ``liger=True`` stay in place (they compute the
    same functions); only the loss patch is removed.  Returns the model.
    """
    model = _unwrap(model)
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    if state.guard_handle is not None:
        state.guard_handle.remove()
    current = model.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), "__dft_kernels_patched__", False):
        if state.instance_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = state.instance_forward
    # else: something wrapped the patched forward after dk.patch (e.g. TRL's fused LM head); that
    # wrapper stays, and the patched function it calls now forwards to the pre-patch forward.
    for attr in ("dft_kernels_objective", "dft_kernels_loss_kwargs", "dft_kernels_fused_calls"):
        model.__dict__.pop(attr, None)
    return model


# --------------------------------------------------------------------------------------------
# Trainer helpers
# --------------------------------------------------------------------------------------------

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
                             "with labels); either use the patched model's own loss or keep logits")
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
    TRL's entropy / token-accuracy metrics are not logged (they need TRL's own head).
    """

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

