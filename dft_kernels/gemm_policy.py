"""The GEMM precision policy of the chunk loop (docs/design.md, Precision policy).

:class:`HeadGemms` runs the three GEMMs of one chunk (logits, ``dX``, ``dW``) in the dtypes the
policy fixes; :func:`_addmm_acc` accumulates ``dW`` in place in a possibly wider dtype; the
``out_dtype`` probe finds whether the device's ``mm`` can write float32 from 16-bit operands.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["HeadGemms"]


_OUT_DTYPE_MM: dict[str, bool] = {}


def _mm_out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` runs for 16-bit operands on this device
    (cuBLAS: yes on recent torch; CPU: no).  Probed once per device type."""
    dev = device.type
    if dev not in _OUT_DTYPE_MM:
        ok = False
        if dev == "cuda":
            try:
                a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_MM[dev] = ok
    return _OUT_DTYPE_MM[dev]


class HeadGemms:
    """The three GEMMs of a chunk, with the precision policy of ``docs/api.md``:

    * logits are computed in float32 (float64 for float64 inputs) even for 16-bit
      inputs: rounding logits to bfloat16 alone costs ~1% relative error on DFT-type
      losses, which a fused kernel must not add;
    * on CUDA the 16-bit GEMMs write float32 directly (``out_dtype``) and the gradient
      is cast back to the input dtype for the ``dX``/``dW`` GEMMs; elsewhere the weight
      is upcast once per call and every GEMM runs in float32;
    * ``dW``/``db`` accumulate in ``accum_dtype``.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        self.x_dtype = x.dtype
        self.logits_dtype = torch.promote_types(x.dtype, torch.float32)
        self.weight, self.bias = weight, bias
        self.native = x.dtype == self.logits_dtype
        self.out_dtype_mm = not self.native and _mm_out_dtype_supported(x.device)
        up = not self.native and not self.out_dtype_mm
        self.w_up = weight.to(self.logits_dtype) if up else None
        self.b_up = None if bias is None or bias.dtype == self.logits_dtype else bias.to(self.logits_dtype)

    def logits(self, x_c: Tensor) -> Tensor:
        bias = self.bias if self.b_up is None else self.b_up
        if self.native:
            w = self.weight
        elif self.out_dtype_mm:
            out = torch.mm(x_c, self.weight.t(), out_dtype=self.logits_dtype)
            return out if bias is None else out.add_(bias)
        else:
            x_c, w = x_c.to(self.logits_dtype), self.w_up
        return x_c @ w.t() if bias is None else torch.addmm(bias, x_c, w.t())

    def backward(self, dlogits: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                 db: Optional[Tensor]) -> None:
        """``dx_c = dlogits @ W``; ``dw += dlogits^T x_c``; ``db += sum(dlogits)``."""
        if db is not None:
            db += dlogits.sum(dim=0, dtype=db.dtype)
        if self.native:
            g, w, xc = dlogits, self.weight, x_c
        elif self.out_dtype_mm:
            g, w, xc = dlogits.to(self.x_dtype), self.weight, x_c
        else:
            g, w, xc = dlogits, self.w_up, x_c.to(self.logits_dtype)
        if dx_c is not None:
            if g.dtype == dx_c.dtype:
                torch.mm(g, w, out=dx_c)
            else:
                dx_c.copy_(g @ w)
        if dw is not None:
            _addmm_acc(dw, g.t(), xc)


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``; ``acc`` may be wider than ``a``/``b`` (fp32 accumulation of bf16)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _mm_out_dtype_supported(acc.device):
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.add_(a.to(acc.dtype) @ b.to(acc.dtype))
