"""An axolotl plugin: train with the dft_kernels loss.

In the axolotl YAML::

    plugins:
      - dft_kernels.integrations.axolotl.DFTKernelsPlugin
    dft_kernels:
      objective: dft        # see dft_kernels.integrations.common.LossOptions
      chunk_size: 4096

then ``axolotl train my_config.yml`` as usual.  The plugin patches the model once axolotl has
loaded it and applied its adapters (``post_model_load``), refuses the axolotl options that
install another loss (Liger's and Cut Cross-Entropy's fused losses, chunked or flash-attn cross
entropy, EAFT, RL and ORPO trainers), and adds
:class:`~dft_kernels.integrations.common.FusedLossCheck` to the trainer, which stops training
before the optimizer step if a micro-batch did not run through the fused loss.

axolotl logs a plugin that fails to import and goes on without it; check that its log says
``Plugin loaded successfully: dft_kernels.integrations.axolotl.DFTKernelsPlugin``.  (If it does
not, ``FusedLossCheck`` is not installed either, and axolotl trains with its own loss.)
"""

from __future__ import annotations

from typing import Any, Optional

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from .common import FusedLossCheck, LossOptions, refuse_trainer_loss

__all__ = ["DFTKernelsArgs", "DFTKernelsPlugin"]

CONFIG_KEY = "dft_kernels"
# axolotl options that put another loss in place of the model's, with the reason.
_CONFLICTS = {
    "liger_fused_linear_cross_entropy": "Liger's fused linear cross-entropy replaces the model's forward",
    "liger_cross_entropy": "Liger's cross-entropy replaces the model's loss",
    "liger_use_token_scaling": "it is axolotl's own DFT (Liger's fused linear cross-entropy with token scaling)",
    "cut_cross_entropy": "Cut Cross-Entropy replaces the model's forward",
    "chunked_cross_entropy": "axolotl's chunked cross-entropy replaces the model's loss",
    "flash_attn_cross_entropy": "flash-attn's cross-entropy replaces the model's loss",
    "use_eaft": "EAFT computes its own loss on the logits",
    "orpo_alpha": "ORPO computes its own loss",
    "rl": "RL trainers (DPO, KTO, GRPO, ...) compute their own losses",
}


class DFTKernelsArgs(BaseModel):
    """The plugin's config key: ``dft_kernels: {objective: dft, <objective parameters>, <dk.patch options>}``."""

    dft_kernels: Optional[dict[str, Any]] = None


def _get(cfg, key):
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


class DFTKernelsPlugin(BasePlugin):
    """Patches the model axolotl trains with ``dk.patch`` (see the module docs)."""

    def __init__(self):
        super().__init__()
        self.options: Optional[LossOptions] = None
        self.check: Optional[FusedLossCheck] = None

    def get_input_args(self) -> str:
        return f"{__name__}.DFTKernelsArgs"

    def _options(self, cfg) -> LossOptions:
        for key, why in _CONFLICTS.items():
            if _get(cfg, key):
                raise ValueError(f"{key} cannot be combined with {CONFIG_KEY}: {why}. Remove it.")
        for name in _get(cfg, "plugins") or []:
            if "cut_cross_entropy" in name:
                raise ValueError(f"plugin {name} replaces the model's forward and loss; it cannot be combined with "
                                 f"{CONFIG_KEY}. Remove it.")
        return LossOptions.from_config(_get(cfg, CONFIG_KEY), where=CONFIG_KEY)

    def register(self, cfg: dict):
        self.options = self._options(cfg)

    def pre_model_load(self, cfg):
        self.options = self._options(cfg)

    def post_model_load(self, cfg, model):
        if self.options is None:
            self.options = self._options(cfg)
        self.options.patch(model)

    def post_trainer_create(self, cfg, trainer):
        refuse_trainer_loss(trainer, "dft_kernels axolotl plugin")

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        self.check = FusedLossCheck()
        return [self.check]
