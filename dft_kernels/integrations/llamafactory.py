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
trainers take the loss from the model, so nothing else changes.  Options that would make
LLaMA-Factory compute its own loss on the logits (``use_dft_loss``, ``use_eaft_loss``,
``use_asft_loss``, ``label_smoothing_factor``) and stages whose loss is not a token loss
(rm, ppo, dpo, kto) are refused before anything is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .common import FusedLossCheck, LossOptions

__all__ = ["CONFIG_KEY", "PatchModelCallback", "split_config", "run", "main"]

CONFIG_KEY = "dft_kernels"
SUPPORTED_STAGES = ("sft", "pt")
# LLaMA-Factory options that set a compute_loss_func (the trainer then pops the labels and computes
# its own loss on the logits), with what to use instead.
_OWN_LOSS_OPTIONS = {
    "use_dft_loss": "it is LLaMA-Factory's own DFT on the full logits; the dft_kernels section selects the "
                    "objective (objective: dft)",
    "use_eaft_loss": "it computes LLaMA-Factory's EAFT loss on the full logits",
    "use_asft_loss": "it computes LLaMA-Factory's ASFT loss on the full logits",
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


def split_config(config: Mapping[str, Any]) -> tuple[LossOptions, dict]:
    """Split a LLaMA-Factory config into the dft_kernels options and the config for ``run_exp``;
    raise on the options that would bypass the dft_kernels loss."""
    config = dict(config)
    options = LossOptions.from_config(config.pop(CONFIG_KEY, None), where=CONFIG_KEY)
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
    return options, config


class PatchModelCallback(FusedLossCheck):
    """Patches the model when the trainer is built (``on_init_end``: LoRA applied, not yet wrapped
    for distributed training) and checks every micro-batch, as :class:`FusedLossCheck`."""

    def __init__(self, options: LossOptions):
        super().__init__()
        self.options = options
        self.model = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("dft_kernels: the trainer passed no model to its callbacks; cannot patch it")
        self.options.patch(model)
        self.model = model


def run(config: Union[str, Path, Mapping[str, Any]], callbacks: Optional[list] = None,
        overrides: Sequence[str] = ()) -> PatchModelCallback:
    """Run LLaMA-Factory's ``run_exp`` on ``config`` with the model patched; returns the callback
    (``.micro_batches`` checked, ``.model`` patched)."""
    from llamafactory.train.tuner import run_exp

    options, lf_config = split_config(_read(config, overrides))
    patcher = PatchModelCallback(options)
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
