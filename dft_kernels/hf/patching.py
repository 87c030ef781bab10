"""``dk.patch`` / ``dk.unpatch`` / ``is_patched``: install and remove the patched forward."""

from __future__ import annotations

import types
import warnings
from typing import Union

from ..objectives import ObjectiveLike, get_objective
from .forward import _STATE_ATTR, _BackboneGuard, _forward_for, _PatchState, _signature
from .inspection import PatchError, _backbone, _check_head, _check_model, _describe, _unwrap, head_spec
from .liger import _apply_liger
from .loss_kwargs import check_loss_kwargs
from .verify import _params_materialised, verify_patch


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
    ``label_smoothing``, ``z_loss``, ``backend``, ``chunk_size``, ``accum_dtype``, ``logits_dtype``,
    ``validate``; ``kl_coef``/``kl`` add the anchor (ASFT), for which every training call passes
    ``ref_hidden_states=`` (the frozen reference model's final hidden states on the same batch) and
    ``ref_lm_head=`` (its LM head) to the forward.
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
