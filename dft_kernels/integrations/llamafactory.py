"""LLaMA-Factory training with the dft_kernels loss.

Command line, in place of ``llamafactory-cli train my_sft.yaml [key=value ...]``::

    python -m dft_kernels.integrations.llamafactory my_sft.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m dft_kernels.integrations.llamafactory my_sft.yaml

with a ``dft_kernels:`` section in the YAML (see :class:`~dft_kernels.integrations.common.LossOptions`)::

    dft_kernels:
      objective: dft
      chunk_size: 4096

Python: ``run(config_dict_or_yaml_path, callbacks=None)``.

It runs LLaMA-Factory's own ``run_exp`` with :class:`PatchModelCallback`, which patches the
model at the end of the trainer's ``__init__`` (after LLaMA-Factory has loaded it and applied
LoRA, before the trainer wraps it for DDP/FSDP/DeepSpeed) and checks every micro-batch
(:class:`~dft_kernels.integrations.common.FusedLossCheck`).  LLaMA-Factory's SFT and PT
trainers take the loss from the model, so nothing else changes.

LLaMA-Factory's own losses on the logits map to ours:

* ``use_eaft_loss: true`` (``eaft_alpha``) trains ``dk.EAFT(alpha=eaft_alpha, top_k=20,
  normalizer=3.0)``, LLaMA-Factory's top-20 entropy approximation, through the patched model;
* ``use_asft_loss: true`` (``asft_alpha``, stage sft) keeps LLaMA-Factory's reference model (it
  loads and prepares it as usual: ``ref_model`` or a frozen copy of the model) and trains the
  objective of the ``dft_kernels`` section (default DFT) plus ``asft_alpha * KL(pi_ref || pi_theta)``
  with ``dk.linear_cross_entropy(..., ref_input=, ref_weight=, kl_coef=)``: the reference model's
  final hidden states and head weight, never either model's logits.  ``dft_kernels.kl: reverse``
  takes ``KL(pi_theta || pi_ref)``; ``dft_kernels.asft_normalization``: ``llamafactory`` (default,
  LLaMA-Factory's value: each micro-batch's mean over its valid tokens, not divided by the
  gradient accumulation steps) or ``tokens`` (the sum over the step's valid tokens /
  ``num_items_in_batch``, Hugging Face's convention).

Refused before anything is loaded: ``use_dft_loss`` and ``label_smoothing_factor`` (use the
``dft_kernels`` section), two of LLaMA-Factory's losses at once, ``use_asft_loss`` with LoRA and no
``ref_model`` (LLaMA-Factory creates no reference model then), and stages whose loss is not a token
loss (rm, ppo, dpo, kto).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import types
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

import dft_kernels as dk

from .common import Anchor, FrozenHead, FusedLossCheck, LossOptions, frozen_head, patched_model

__all__ = ["CONFIG_KEY", "PatchModelCallback", "split_config", "run", "main", "install_anchor", "anchored_trainer"]

CONFIG_KEY = "dft_kernels"
SUPPORTED_STAGES = ("sft", "pt")
# LLaMA-Factory options that set a compute_loss_func (the trainer then pops the labels and computes
# its own loss on the logits) or another trainer, with what to use instead.  use_eaft_loss and
# use_asft_loss are not among them: split_config routes them to ours.
_OWN_LOSS_OPTIONS = {
    "use_dft_loss": "it is LLaMA-Factory's own DFT on the full logits; the dft_kernels section selects the "
                    "objective (objective: dft)",
    "use_mca": "Megatron-Core training (mcore_adapter) does not call the Hugging Face model's forward",
    "use_hyper_parallel": "the hyper_parallel trainer is not exercised with dk.patch",
}


def _read(config: Union[str, Path, Mapping[str, Any]], overrides: Sequence[str] = ()) -> dict:
    """A config dict from a mapping, or from a YAML/JSON file plus ``key=value`` overrides as
    ``llamafactory-cli`` reads them."""
    if isinstance(config, Mapping):
        if overrides:
            raise TypeError("overrides are for a config file; merge them into the mapping")
        return dict(config)
    from omegaconf import OmegaConf

    path = Path(config)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config: expected a .yaml, .yml or .json file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    loaded = OmegaConf.load(path.absolute())
    return OmegaConf.to_container(OmegaConf.merge(loaded, OmegaConf.from_cli(list(overrides))))


# LLaMA-Factory's defaults (hparams/finetuning_args.py) and its EAFT's fixed approximation
EAFT_ALPHA, ASFT_ALPHA = 1.0, 0.1
EAFT_TOP_K, EAFT_NORMALIZER = 20, 3.0
ASFT_NORMALIZATIONS = ("llamafactory", "tokens")


def split_config(config: Mapping[str, Any]) -> tuple[LossOptions, dict]:
    """Split a LLaMA-Factory config into the dft_kernels options and the config for ``run_exp``;
    route ``use_eaft_loss`` / ``use_asft_loss`` to the dft_kernels loss; raise on the options that
    would bypass it or that it cannot honour."""
    config = dict(config)
    section = config.pop(CONFIG_KEY, None)
    section = dict(section) if isinstance(section, Mapping) else section
    use_eaft, use_asft = bool(config.get("use_eaft_loss")), bool(config.get("use_asft_loss"))
    anchor_keys = {}
    if isinstance(section, dict):
        for key in ("kl_coef", "kl", "asft_normalization"):
            if key in section:
                if not use_asft:
                    raise ValueError(f"{CONFIG_KEY}.{key}: the anchor to a reference model comes with LLaMA-Factory's "
                                     "use_asft_loss: true (asft_alpha is the KL coefficient); set it, or remove "
                                     f"{CONFIG_KEY}.{key}")
                anchor_keys[key] = section.pop(key)
    if use_eaft and use_asft:
        raise ValueError("use_eaft_loss and use_asft_loss: set one (LLaMA-Factory does not combine them: its ASFT "
                         "step would call its EAFT function with the reference logits in place of num_items_in_batch). "
                         "With dft_kernels, an EAFT objective anchored to the reference is "
                         f"use_asft_loss: true with {CONFIG_KEY}.objective: eaft")
    if use_eaft:
        if isinstance(section, dict) and "objective" in section:
            raise ValueError(f"use_eaft_loss: true selects the objective (LLaMA-Factory's EAFT); remove "
                             f"{CONFIG_KEY}.objective ({section['objective']!r}), or remove use_eaft_loss and set "
                             f"{CONFIG_KEY}.objective: eaft with its alpha, top_k, normalizer")
        alpha = config.get("eaft_alpha", EAFT_ALPHA)
        section = {**(section or {}), "objective": dk.EAFT(alpha=EAFT_ALPHA if alpha is None else alpha,
                                                            top_k=EAFT_TOP_K, normalizer=EAFT_NORMALIZER)}
        config.pop("use_eaft_loss")
    options = LossOptions.from_config(section, where=CONFIG_KEY)
    stage = config.get("stage", "sft")
    if stage not in SUPPORTED_STAGES:
        raise ValueError(f"stage: {stage!r} is not a token-loss stage; dft_kernels supports LLaMA-Factory stages "
                         f"{SUPPORTED_STAGES}")
    for key, why in _OWN_LOSS_OPTIONS.items():
        if config.get(key):
            raise ValueError(f"{key}: true cannot be combined with the dft_kernels loss: {why}. Remove it.")
    if float(config.get("label_smoothing_factor") or 0.0) > 0:
        raise ValueError("label_smoothing_factor: the trainer would compute a label-smoothed loss on the logits "
                         f"instead of the dft_kernels loss; set {CONFIG_KEY}.label_smoothing instead")
    if use_asft:
        if stage != "sft":
            raise ValueError(f"use_asft_loss: LLaMA-Factory builds the reference model in its sft stage only; got "
                             f"stage {stage!r}")
        if config.get("finetuning_type", "lora") == "lora" and not config.get("ref_model"):
            raise ValueError("use_asft_loss: with finetuning_type lora (LLaMA-Factory's default) and no ref_model "
                             "LLaMA-Factory creates no reference model, so there is nothing to anchor to; set "
                             "ref_model (the base model's path) or finetune full / freeze")
        kl_coef = config.get("asft_alpha", ASFT_ALPHA)
        kl_coef = ASFT_ALPHA if kl_coef is None else kl_coef
        if "kl_coef" in anchor_keys and anchor_keys["kl_coef"] != kl_coef:
            raise ValueError(f"{CONFIG_KEY}.kl_coef ({anchor_keys['kl_coef']!r}) differs from asft_alpha "
                             f"({kl_coef!r}); the KL coefficient is asft_alpha, remove {CONFIG_KEY}.kl_coef")
        normalization = anchor_keys.get("asft_normalization", "llamafactory")
        if normalization not in ASFT_NORMALIZATIONS:
            raise ValueError(f"{CONFIG_KEY}.asft_normalization: expected one of {ASFT_NORMALIZATIONS}, got "
                             f"{normalization!r}")
        try:
            anchor = Anchor(kl_coef=float(kl_coef), kl=anchor_keys.get("kl", "forward"), normalization=normalization)
        except ValueError as e:
            raise ValueError(f"asft_alpha / {CONFIG_KEY}.kl: {e}") from e
        options = dataclasses.replace(options, anchor=anchor)
    return options, config


class PatchModelCallback(FusedLossCheck):
    """Patches the model when the trainer is built (``on_init_end``: LoRA applied, not yet wrapped
    for distributed training) and checks every micro-batch, as :class:`FusedLossCheck`.  With an
    anchor (``use_asft_loss``) it also installs :func:`install_anchor`."""

    def __init__(self, options: LossOptions):
        super().__init__()
        self.options = options
        self.model = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("dft_kernels: the trainer passed no model to its callbacks; cannot patch it")
        self.options.patch(model)
        if self.options.anchor is not None:
            install_anchor(model)
        self.model = model


# ------------------------------------------------------------------ ASFT: the anchored loss on two heads

_ANCHOR_KWARG = "dft_kernels_anchor"


def install_anchor(model) -> None:
    """Let the ``dk.patch``-ed ``model`` compute the anchored loss: a call with
    ``dft_kernels_anchor=(reference, anchor, num_items_in_batch)`` (a :class:`FrozenHead` of the reference
    model at the same positions, an :class:`Anchor`) and ``labels`` runs the backbone and
    ``dk.linear_cross_entropy(..., objective=<the patched objective>, ref_input=, ref_weight=, ref_bias=,
    kl_coef=, kl=)`` inside the head module's call (so FSDP / DeepSpeed hooks run around it) and
    returns ``CausalLMOutputWithPast(loss=..., logits=None)``; it counts in
    ``model.dft_kernels_fused_calls`` (so :class:`FusedLossCheck` sees it).  Other calls go to the
    patched forward unchanged.  Called through DDP-style wrappers as the model is."""
    from dft_kernels.hf.forward import _STATE_ATTR

    target = patched_model(model)
    if target is None:
        raise RuntimeError("install_anchor: patch the model with dk.patch first")
    if _STATE_ATTR not in target.__dict__:
        raise RuntimeError("install_anchor: the model's dk.patch state is missing")
    if getattr(target.forward, "__dft_kernels_anchor__", False):
        return
    patched_forward = target.forward

    @functools.wraps(getattr(patched_forward, "__func__", patched_forward))  # the class forward's signature
    def forward(self, *args, **kwargs):
        anchor = kwargs.pop(_ANCHOR_KWARG, None)
        if anchor is None:
            return patched_forward(*args, **kwargs)
        if args:
            raise TypeError(f"{type(self).__name__} (dft_kernels anchor): pass the inputs by keyword")
        return _anchored_forward(self, *anchor, kwargs)

    forward.__dft_kernels_anchor__ = True
    forward.__dft_kernels_patched__ = True   # dk.unpatch restores what the model had
    target.forward = types.MethodType(forward, target)


def _anchored_forward(model, reference: FrozenHead, anchor: Anchor, num_items_in_batch, kwargs: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from dft_kernels.hf.forward import _STATE_ATTR, _head_operands, _run_in_head
    from dft_kernels.hf.inspection import _backbone, _check_head

    state = model.__dict__[_STATE_ATTR]
    if reference.softcap != state.spec.softcap:
        raise ValueError(f"use_asft_loss: the trained model's final logit softcap is {state.spec.softcap!r} but the "
                         f"reference model's is {reference.softcap!r}; the anchored loss applies one softcap to "
                         "both heads")
    labels = kwargs.pop("labels", None)
    if not isinstance(labels, torch.Tensor):
        raise ValueError("labels: the anchored loss needs the labels tensor")
    for key in ("shift_labels", "token_weights", "logits_to_keep"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{key}: not supported by the anchored (use_asft_loss) loss")
        kwargs.pop(key, None)
    kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    kwargs["use_cache"] = False
    state.depth += 1  # the backbone guard: this is the patched loss
    try:
        head = _check_head(model)
        hidden = _backbone(model)(**kwargs).last_hidden_state

        def fused_head(h):
            x, w, b = _head_operands(head, h, state.spec)
            rx = reference.hidden.to(device=x.device, dtype=x.dtype)
            rw = reference.weight.to(device=x.device, dtype=x.dtype)
            rb = None if reference.bias is None else reference.bias.to(device=x.device, dtype=x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return dk.linear_cross_entropy(
                    x, w, labels.to(x.device), bias=b, objective=state.objective, softcap=state.spec.softcap,
                    shift=True, num_items_in_batch=num_items_in_batch, ref_input=rx, ref_weight=rw, ref_bias=rb,
                    kl_coef=anchor.kl_coef, kl=anchor.kl, **state.loss_kwargs)

        loss = _run_in_head(head, hidden, fused_head)
    finally:
        state.depth -= 1
    model.__dict__["dft_kernels_fused_calls"] = model.__dict__.get("dft_kernels_fused_calls", 0) + 1
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _computed_by_compute_loss(*args, **kwargs):
    raise RuntimeError("dft_kernels: the anchored (use_asft_loss) loss is computed by the trainer's compute_loss "
                       "(anchored_trainer); nothing should call compute_loss_func")


def anchored_trainer(base: type, anchor: Anchor) -> type:
    """A subclass of LLaMA-Factory's SFT trainer (``base``, its ``CustomSeq2SeqTrainer``) whose
    ``compute_loss`` is the anchored dft_kernels loss when ``use_asft_loss`` is set: the reference
    model (LLaMA-Factory's ``self.ref_model``, prepared by it) runs its backbone on the batch's
    ``input_ids`` and ``attention_mask`` (what LLaMA-Factory gives it) and the trained model gets the
    batch plus its hidden states and head weight.  LLaMA-Factory's ``compute_loss_func`` (its ASFT on
    the logits) is replaced by one that raises if called, so the Trainer normalises as with theirs."""

    class DFTKernelsASFTTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if getattr(self, "ref_model", None) is None:
                raise ValueError("use_asft_loss: LLaMA-Factory created no reference model (LoRA without "
                                 "ref_model?); nothing to anchor to")
            # LLaMA-Factory's asft_loss_func (on both models' logits) goes.  The slot stays taken, so that the
            # Trainer treats the loss as it treats theirs (counts num_items_in_batch; does not divide the
            # micro-batch loss by the accumulation steps), whatever the model's model_accepts_loss_kwargs.
            self.compute_loss_func = _computed_by_compute_loss
            self.dft_kernels_anchor = anchor

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not getattr(self.finetuning_args, "use_asft_loss", False):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            reference = frozen_head(self.ref_model, inputs["input_ids"], inputs.get("attention_mask"),
                                    who="use_asft_loss", role="reference", plain=False)
            divisor = num_items_in_batch if anchor.normalization == "tokens" else None
            outputs = model(**inputs, **{_ANCHOR_KWARG: (reference, anchor, divisor)})
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    DFTKernelsASFTTrainer.__name__ = DFTKernelsASFTTrainer.__qualname__ = f"DFTKernelsASFT{base.__name__}"
    return DFTKernelsASFTTrainer


@contextlib.contextmanager
def _sft_trainer_class(anchor: Optional[Anchor]):
    """While LLaMA-Factory's sft workflow runs, its trainer class is :func:`anchored_trainer`'s subclass."""
    if anchor is None:
        yield
        return
    from llamafactory.train.sft import workflow

    original = workflow.CustomSeq2SeqTrainer
    workflow.CustomSeq2SeqTrainer = anchored_trainer(original, anchor)
    try:
        yield
    finally:
        workflow.CustomSeq2SeqTrainer = original


def run(config: Union[str, Path, Mapping[str, Any]], callbacks: Optional[list] = None,
        overrides: Sequence[str] = ()) -> PatchModelCallback:
    """Run LLaMA-Factory's ``run_exp`` on ``config`` with the model patched; returns the callback
    (``.micro_batches`` checked, ``.model`` patched)."""
    from llamafactory.train.tuner import run_exp

    options, lf_config = split_config(_read(config, overrides))
    patcher = PatchModelCallback(options)
    with _sft_trainer_class(options.anchor):
        run_exp(lf_config, callbacks=[patcher, *(callbacks or [])])
    return patcher


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # the llamafactory-cli subcommand, accepted for familiarity
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    run(argv[0], overrides=argv[1:])


if __name__ == "__main__":
    main()
