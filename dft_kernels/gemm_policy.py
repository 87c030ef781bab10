"""The GEMM precision policy of the chunk loop (docs/design.md, Precision policy).

:class:`HeadGemms` runs the three GEMMs of one chunk (logits, ``dX``, ``dW``) in the dtypes the
policy fixes; :func:`_add_product` accumulates ``dW`` in place in a possibly wider dtype; :data:`MM_OUT_DTYPE`
holds the device's ``mm`` that writes float32 from 16-bit operands (probed; injectable for tests).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["HeadGemms"]


def _cuda_mm_out_dtype(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    return torch.mm(a, b, out_dtype=out_dtype)


# device type -> ``mm(a, b, out_dtype)``: the product of 16-bit ``a``, ``b`` written in
# ``out_dtype`` (float32) from a float32 accumulator, or None where the device has none.
# Probed once per device type; tests put an exact emulation of cuBLAS here for "cpu", to run
# the CUDA policy on CPU.
MM_OUT_DTYPE: dict[str, Optional[Callable[[Tensor, Tensor, torch.dtype], Tensor]]] = {}


def _mm_out_dtype(device: torch.device) -> Optional[Callable[[Tensor, Tensor, torch.dtype], Tensor]]:
    """The device's ``mm`` with ``out_dtype=float32`` for 16-bit operands (cuBLAS: yes on recent
    torch; CPU: no), or None."""
    dev = device.type
    if dev not in MM_OUT_DTYPE:
        mm = None
        if dev == "cuda":
            try:
                if all(_cuda_mm_out_dtype(a, a, torch.float32).dtype == torch.float32
                       for a in (torch.ones(2, 2, dtype=dt, device=device) for dt in (torch.bfloat16, torch.float16))):
                    mm = _cuda_mm_out_dtype
            except (RuntimeError, TypeError, NotImplementedError):
                mm = None
        MM_OUT_DTYPE[dev] = mm
    return MM_OUT_DTYPE[dev]


class HeadGemms:
    """The three GEMMs of a chunk, with the precision policy of ``docs/api.md``:

    * logits are computed in float32 (float64 for float64 inputs) even for 16-bit
      inputs: rounding logits to bfloat16 alone costs ~1% relative error on DFT-type
      losses, which a fused kernel must not add;
    * where the device has an ``mm`` that writes float32 from 16-bit operands
      (:data:`MM_OUT_DTYPE`; CUDA), the 16-bit GEMMs use it and the gradient is cast back
      to the input dtype for the ``dX``/``dW`` GEMMs (float16 with a power-of-two scale,
      see :meth:`backward_16bit`); elsewhere the weight is upcast once per call and every
      GEMM runs in float32;
    * ``dW``/``db`` accumulate in ``accum_dtype``.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        self.x_dtype = x.dtype
        self.logits_dtype = torch.promote_types(x.dtype, torch.float32)
        self.weight, self.bias = weight, bias
        self.native = x.dtype == self.logits_dtype
        self.mm = None if self.native else _mm_out_dtype(x.device)
        up = not self.native and self.mm is None
        self.w_up = weight.to(self.logits_dtype) if up else None
        self.b_up = None if bias is None or bias.dtype == self.logits_dtype else bias.to(self.logits_dtype)

    def logits(self, x_c: Tensor) -> Tensor:
        bias = self.bias if self.b_up is None else self.b_up
        if self.native:
            w = self.weight
        elif self.mm is not None:
            out = self.mm(x_c, self.weight.t(), self.logits_dtype)
            return out if bias is None else out.add_(bias)
        else:
            x_c, w = x_c.to(self.logits_dtype), self.w_up
        return x_c @ w.t() if bias is None else torch.addmm(bias, x_c, w.t())

    def backward(self, dlogits: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                 db: Optional[Tensor]) -> None:
        """``dx_c = dlogits @ W``; ``dw += dlogits^T x_c``; ``db += sum(dlogits)``.  ``dlogits``
        (the chunk's float32 logits buffer) may be overwritten."""
        if db is not None:
            db += dlogits.sum(dim=0, dtype=db.dtype)
        if self.mm is not None:
            self.backward_16bit(dlogits, x_c, dx_c, dw)
            return
        if self.native:
            g, w, xc = dlogits, self.weight, x_c
        else:
            g, w, xc = dlogits, self.w_up, x_c.to(self.logits_dtype)
        if dx_c is not None:
            if g.dtype == dx_c.dtype:
                torch.mm(g, w, out=dx_c)
            else:
                dx_c.copy_(g @ w)
        if dw is not None:
            _add_product(dw, g.t(), xc, None, None)

    def backward_16bit(self, dlogits: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor]) -> None:
        """The ``dX``/``dW`` GEMMs on 16-bit operands with float32 products (``self.mm``).

        float16 has too little range for the float32 gradient: scaled by the reduction's
        ``1/N`` (and a DFT weight ``p``) its entries are often below float16's smallest
        subnormal (6e-8) and flush to zero, while a loss scale in ``grad_output`` (``none``)
        can push them past its largest value (65504).  So float16 gradients are multiplied by
        ``2^k`` (exact, computed on the device: no host sync) bringing the largest entry to
        ``[2^13, 2^14)`` before the cast, and the float32 products by ``2^-k`` after.
        """
        unscale = None
        if self.x_dtype == torch.float16:
            _, exponent = torch.frexp(dlogits.abs().amax())
            shift = (_FP16_TOP_EXPONENT - exponent).clamp(-_MAX_SHIFT, _MAX_SHIFT)
            scale = torch.ldexp(torch.ones((), dtype=dlogits.dtype, device=dlogits.device), shift)
            dlogits.mul_(scale)
            unscale = scale.reciprocal()  # a power of two: exact
        g = dlogits.to(self.x_dtype)
        if dx_c is not None:
            if unscale is None and g.dtype == dx_c.dtype:
                torch.mm(g, self.weight, out=dx_c)  # float32 accumulation, one rounding to 16 bits
            else:
                prod = self.mm(g, self.weight, torch.float32)
                dx_c.copy_(prod if unscale is None else prod.mul_(unscale))
        if dw is not None:
            _add_product(dw, g.t(), x_c, self.mm, unscale)


_FP16_TOP_EXPONENT = 14  # float16 gradients are scaled to a largest entry in [2^13, 2^14)
_MAX_SHIFT = 100  # 2^+-100 stays finite in float32 (all-zero or subnormal gradients)


def _add_product(acc: Tensor, a: Tensor, b: Tensor, mm, unscale: Optional[Tensor]) -> None:
    """``acc += (a @ b) * unscale``; ``acc`` may be wider than ``a``/``b`` (fp32 accumulation of
    16-bit operands through ``mm``, the device's ``mm`` with ``out_dtype``)."""
    if unscale is None and a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif mm is not None:
        prod = mm(a, b, torch.float32)
        acc.add_(prod if unscale is None else prod.mul_(unscale))
    else:
        acc.add_(a.to(acc.dtype) @ b.to(acc.dtype))
