"""Liger-Kernel co-use: its RMSNorm/RoPE/SwiGLU kernels with our loss (``dk.patch(model, liger=True)``)."""

from __future__ import annotations

import torch

from .inspection import _check_head, _describe


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
