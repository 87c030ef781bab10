"""The patched forward: state kept on the model, the backbone guard, and the fused / eval loss paths."""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..functional import cross_entropy, linear_cross_entropy
from ..objectives import Objective
from ..options import LINEAR_ONLY_OPTIONS
from ..vocab_parallel.shard import is_vocab_sharded
from .inspection import _REFUSED_CONFIG_FLAGS, HeadSpec, PatchError, _backbone, _check_head, _describe

# Per-call keyword arguments the patched forward consumes (never passed to the backbone).
# ref_hidden_states / ref_lm_head: the frozen reference model's final hidden states on the same batch and
# its LM head, for the anchor (dk.patch(..., kl_coef=, kl=); docs/integrations.md, "What dk.patch does").
_CALL_LOSS_KEYS = ("num_items_in_batch", "ignore_index", "shift_labels", "token_weights", "ref_hidden_states",
                   "ref_lm_head")

_STATE_ATTR = "_dft_kernels_state"
_MISSING = object()


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


def _vocab_parallel_head(head: nn.Module) -> bool:
    """A tensor-parallel head sharded over the vocabulary (DTensor ``Shard(0)`` on a 1-D mesh:
    ``tp_plan="auto"``, ``ColwiseParallel``), which the loss takes as is."""
    return is_vocab_sharded(head.weight)


def _run_in_head(head: nn.Module, hidden: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Run ``fn(hidden)`` as the head module's forward, so its hooks (FSDP unshard, DeepSpeed
    gather, accelerate device placement) run around it.  A vocab-parallel head's parameters are
    already this rank's shard: ``fn`` runs without its tensor-parallel input/output transforms,
    which would gather the ``[tokens, V]`` logits."""
    if _vocab_parallel_head(head):
        return fn(hidden)
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
    logit scale folded in: scale * (x W^T + b) = (scale x) W^T + scale b.  A vocab-parallel
    head stays sharded (the loss takes the DTensor); other DTensor layouts are gathered."""
    w, b = head.weight, head.bias
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - torch built without distributed
        DTensor = ()
    if DTensor and isinstance(w, DTensor) and not _vocab_parallel_head(head):
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
    if labels is None and shift_labels is None:
        for key in ("ref_hidden_states", "ref_lm_head"):  # the anchor is a loss term: nothing to do without labels
            extra.pop(key, None)
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
    ref = _reference(model, state, extra, hidden.shape[:-1], logits_to_keep)

    def fused_head(h: Tensor) -> Tensor:
        x, w, b = _head_operands(head, h, spec)
        anchor = {}
        if ref is not None:
            rx, rw, rb = _head_operands(ref[1], ref[0].to(x.device), spec)
            anchor = dict(ref_input=rx.to(x.dtype), ref_weight=rw.to(x.dtype),
                          ref_bias=None if rb is None else rb.to(x.dtype))
        with torch.autocast(x.device.type, enabled=False):
            return linear_cross_entropy(
                x, w, target.to(x.device), bias=b, objective=state.objective, softcap=spec.softcap,
                num_items_in_batch=extra.get("num_items_in_batch"), token_weights=token_weights, shift=shift,
                **anchor, **opts)

    loss = _run_in_head(head, hidden, fused_head)
    if not torch.compiler.is_compiling():
        model.__dict__["dft_kernels_fused_calls"] = model.__dict__.get("dft_kernels_fused_calls", 0) + 1
    out = CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None))
    return out.to_tuple() if want_tuple else out


def _reference(model, state: _PatchState, extra: dict, kept_shape, logits_to_keep):
    """``(ref_hidden, ref_head)`` for the anchor, aligned with the kept positions, or None when the call
    carries no reference.  ``kl_coef > 0`` needs both; given without it they are checked by the loss and
    unused."""
    ref_h, ref_head = extra.get("ref_hidden_states"), extra.get("ref_lm_head")
    kl_coef = state.loss_kwargs.get("kl_coef", 0.0)
    if ref_h is None and ref_head is None:
        if kl_coef > 0:
            raise ValueError(
                f"{_describe(model)} is patched with kl_coef={kl_coef} (the anchor), so every training call needs "
                "the frozen reference model's final hidden states on the same batch and its LM head: pass "
                "ref_hidden_states=ref_model.get_decoder()(...).last_hidden_state (under torch.no_grad) and "
                "ref_lm_head=ref_model.get_output_embeddings() to the forward")
        return None
    if ref_h is None or ref_head is None:
        missing = "ref_hidden_states" if ref_h is None else "ref_lm_head"
        raise ValueError(f"{missing} is missing: ref_hidden_states and ref_lm_head come together (the reference "
                         "model's final hidden states and its LM head)")
    if not isinstance(ref_h, Tensor):
        raise TypeError(f"ref_hidden_states must be a torch.Tensor, got {type(ref_h).__name__}")
    if not isinstance(ref_head, nn.Module) or not isinstance(getattr(ref_head, "weight", None), Tensor):
        raise TypeError(f"ref_lm_head must be the reference model's LM head (an nn.Linear), got "
                        f"{type(ref_head).__name__}")
    if ref_h.dim() != 3:
        raise ValueError(f"ref_hidden_states must be (batch, positions, hidden), got shape {tuple(ref_h.shape)}")
    ref_h = _slice_to_keep(ref_h, logits_to_keep)
    if tuple(ref_h.shape[:-1]) != tuple(kept_shape):
        raise ValueError(f"ref_hidden_states covers (batch, positions) {tuple(ref_h.shape[:-1])} but the model's "
                         f"kept positions are {tuple(kept_shape)}: run the reference on the same batch")
    return ref_h.detach(), ref_head


def _eval_forward(model, state: _PatchState, flat: dict, labels, extra: dict):
    """Labels in eval mode: the original forward builds the logits; the loss is the patched objective."""
    want_tuple = _want_tuple(model, flat)
    call = {k: v for k, v in flat.items() if k != "labels"}
    call["return_dict"] = True
    out = state.call_original(model, **call)
    logits = out.logits
    target, shift, token_weights = _targets(labels, extra, logits.shape[:-1], logits.device)
    opts = _loss_options(state, extra)
    for name in LINEAR_ONLY_OPTIONS:  # accum_dtype, allreduce_dgrad: no weight or input gradient here
        opts.pop(name, None)
    out.loss = cross_entropy(logits, target, objective=state.objective, shift=shift,
                             num_items_in_batch=extra.get("num_items_in_batch"), token_weights=token_weights,
                             **opts)
    return out.to_tuple() if want_tuple else out


def _signature(model) -> inspect.Signature:
    sig = inspect.signature(type(model).forward)
    params = list(sig.parameters.values())[1:]  # drop self
    return sig.replace(parameters=params)
