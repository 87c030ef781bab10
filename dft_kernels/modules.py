"""``nn.Module`` wrapper around :func:`dft_kernels.linear_cross_entropy`."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import linear_cross_entropy
from .objectives import ObjectiveLike
from .options import LossOptions, document_options

__all__ = ["LinearCrossEntropyLoss"]


@document_options
class LinearCrossEntropyLoss(nn.Module):
    """Fused LM-head loss module: ``loss_fn(input, weight, target, bias=None)``.

    Holds the options of :func:`dft_kernels.linear_cross_entropy` (checked at construction,
    not at the first batch); per-call ``token_weights`` and ``num_items_in_batch`` go to ``forward``, and
    with ``kl_coef > 0`` the reference head (``ref_input``, ``ref_weight``, ``ref_bias``).
    """

    def __init__(self, objective: ObjectiveLike = "dft", *, ignore_index: int = -100, reduction: str = "mean",
                 softcap: Optional[float] = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 kl_coef: float = 0.0, kl: str = "forward", shift: bool = False, return_stats: bool = False,
                 backend: str = "auto",
                 chunk_size: Optional[int] = None, chunk_bytes: Optional[int] = None, autotune: bool = False,
                 accum_dtype: Optional[torch.dtype] = torch.float32, logits_dtype: Optional[torch.dtype] = None,
                 factored: Optional[bool] = None, fused_head: bool = False,
                 process_group=None, allreduce_dgrad: bool = True, validate: bool = True):
        super().__init__()
        self.loss_options = LossOptions.from_arguments(locals())
        self.objective = self.loss_options.objective
        self.options = {f.name: getattr(self.loss_options, f.name) for f in fields(LossOptions)
                        if f.name != "objective"}

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                token_weights: Optional[Tensor] = None, num_items_in_batch=None, ref_input: Optional[Tensor] = None,
                ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None):
        return linear_cross_entropy(input, weight, target, bias=bias, objective=self.objective,
                                    token_weights=token_weights, num_items_in_batch=num_items_in_batch,
                                    ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"objective={self.objective!r}, {opts}"
