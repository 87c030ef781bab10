"""The GEMM precision policy of the chunk loop (docs/design.md, Precision policy).

:class:`HeadGemms` runs the three GEMMs of one chunk (logits, ``dX``, ``dW``) in the dtypes the
policy fixes, each writing into a buffer the chunk loop owns (``out=``): the chunk's logits
buffer, the ``dX`` rows, and the ``dW`` accumulator, which the first chunk writes and the
others accumulate into in place, so no ``[V, H]`` temporary exists.  :data:`MM_OUT_DTYPE`
holds the device's GEMM that writes (or accumulates into) float32 from 16-bit operands
(probed; injectable for tests).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

__all__ = ["HeadGemms", "MM_OUT_DTYPE", "MmOutDtype"]


class MmOutDtype(Protocol):
    def __call__(self, a: Tensor, b: Tensor, out_dtype: torch.dtype, *, out: Optional[Tensor] = None,
                 accumulate: bool = False) -> Tensor:
        """``a @ b`` of 16-bit ``a``, ``b`` written in ``out_dtype`` (float32) from a float32
        accumulator: into ``out`` when given, and added to ``out`` in place with ``accumulate``."""


def _cuda_mm_out_dtype(a: Tensor, b: Tensor, out_dtype: torch.dtype, *, out: Optional[Tensor] = None,
                       accumulate: bool = False) -> Tensor:
    if accumulate:  # cuBLAS with beta = 1: out += a @ b, in place
        return torch.addmm(out, a, b, out_dtype=out_dtype, out=out)
    if out is None:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a, b, out_dtype=out_dtype, out=out)


# device type -> the device's :class:`MmOutDtype`, or None where it has none.  Probed once per
# device type (CUDA: ``mm``/``addmm`` with ``out_dtype``, torch >= 2.8; CPU: none); tests put an
# exact emulation of cuBLAS here for "cpu", to run the CUDA policy on CPU.
MM_OUT_DTYPE: dict[str, Optional[MmOutDtype]] = {}


def _probe_cuda(device: torch.device) -> bool:
    for dt in (torch.bfloat16, torch.float16):
        a = torch.ones(2, 2, dtype=dt, device=device)
        acc = _cuda_mm_out_dtype(a, a, torch.float32)
        _cuda_mm_out_dtype(a, a, torch.float32, out=acc, accumulate=True)
        if acc.dtype != torch.float32 or not bool((acc == 4.0).all()):
            return False
    return True


def _mm_out_dtype(device: torch.device) -> Optional[MmOutDtype]:
    """The device's :class:`MmOutDtype` for 16-bit operands (cuBLAS: yes on recent torch;
    CPU: no), or None."""
    dev = device.type
    if dev not in MM_OUT_DTYPE:
        mm = None
        if dev == "cuda":
            try:
                mm = _cuda_mm_out_dtype if _probe_cuda(device) else None
            except (RuntimeError, TypeError, NotImplementedError):
                mm = None
        MM_OUT_DTYPE[dev] = mm
    return MM_OUT_DTYPE[dev]


class HeadGemms:
    """The three GEMMs of a chunk, with the precision policy of docs/design.md:

    * logits are computed in float32 (float64 for float64 inputs) even for 16-bit
      inputs: rounding logits to bfloat16 alone costs ~1% relative error on DFT-type
      losses, which a fused kernel must not add.  The fast mode (``logits_dtype`` equal to the
      16-bit input dtype) writes them in 16 bits instead, as the input-dtype GEMM does;
    * where the device has an ``mm`` that writes float32 from 16-bit operands
      (:data:`MM_OUT_DTYPE`; CUDA), the 16-bit GEMMs use it, and the row kernel writes the
      gradient once in :attr:`grad_dtype`, the dtype the ``dX``/``dW`` GEMMs read: the input
      dtype for bfloat16, float32 for float16 (cast with a power-of-two scale, see
      :meth:`_backward_fp16`); elsewhere (CPU) a 16-bit weight is upcast once per call and
      every GEMM but the fast mode's logits runs in float32;
    * ``dW`` accumulates in ``accum_dtype`` in place; ``db`` likewise.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], logits_dtype: Optional[torch.dtype] = None):
        self.x_dtype = x.dtype
        self.compute_dtype = torch.promote_types(x.dtype, torch.float32)
        self.logits_dtype, self.grad_dtype = self.dtypes(x.dtype, logits_dtype, x.device)
        self.weight, self.bias = weight, bias
        self.native = x.dtype == self.compute_dtype
        self.mm = None if self.native else _mm_out_dtype(x.device)
        self.w_up = weight.to(self.compute_dtype) if not self.native and self.mm is None else None
        self._fp16: Optional[Tensor] = None  # float16 copy of the gradient (_backward_fp16), reused
        self._dx32: Optional[Tensor] = None  # float32 dX product of a factored gradient, reused
        self._xs: Optional[Tensor] = None  # x rows times the row factors, in the gradient's dtype, reused
        # bias in the dtype of the logits it is added to
        self.bias_l = None if bias is None or bias.dtype == self.logits_dtype else bias.to(self.logits_dtype)

    @staticmethod
    def dtypes(x_dtype: torch.dtype, logits_dtype: Optional[torch.dtype],
               device: torch.device) -> tuple[torch.dtype, torch.dtype]:
        """``(logits dtype, gradient dtype)`` of the chunk buffers for inputs of ``x_dtype``:
        the gradient in the dtype the ``dX``/``dW`` GEMMs read."""
        compute = torch.promote_types(x_dtype, torch.float32)
        logits = compute if logits_dtype is None else logits_dtype
        if x_dtype == compute or _mm_out_dtype(device) is None:
            return logits, compute
        return logits, x_dtype if x_dtype == torch.bfloat16 else torch.float32

    def logits_into(self, x_c: Tensor, out: Tensor) -> Tensor:
        """``out = x_c @ W^T (+ b)`` in ``out``'s dtype (:attr:`logits_dtype`)."""
        bias = self.bias if self.bias_l is None else self.bias_l
        if self.logits_dtype == self.x_dtype:  # float32/64 inputs, or the 16-bit fast mode
            w = self.weight
        elif self.mm is not None:
            self.mm(x_c, self.weight.t(), self.logits_dtype, out=out)
            return out if bias is None else out.add_(bias)
        else:
            x_c, w = x_c.to(self.logits_dtype), self.w_up
        if bias is None:
            return torch.mm(x_c, w.t(), out=out)
        return torch.addmm(bias, x_c, w.t(), out=out)

    def backward(self, grad: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                 db: Optional[Tensor], first: bool, row_scale: Optional[Tensor] = None) -> None:
        """``dx_c = grad @ W``; ``dw (+)= grad^T x_c`` (written by the ``first`` chunk,
        accumulated after); ``db += sum(grad)``.  ``grad`` (in :attr:`grad_dtype`, the row
        kernel's gradient buffer) may be overwritten.  With ``row_scale`` the gradient is
        ``row_scale[:, None] * grad`` (a factored row kernel; no ``db``, not float16): see
        :meth:`_backward_factored`."""
        if row_scale is not None:
            if db is not None or self.x_dtype == torch.float16:
                raise ValueError("row_scale: a factored gradient is for float32/bfloat16 inputs "
                                 "without a bias gradient")
            self._backward_factored(grad, row_scale, x_c, dx_c, dw, first)
            return
        if db is not None:
            db += grad.sum(dim=0, dtype=db.dtype)
        if self.mm is not None and self.x_dtype == torch.float16:
            self._backward_fp16(grad, x_c, dx_c, dw, first)
            return
        w = self.weight if self.w_up is None else self.w_up
        if dx_c is not None:
            if grad.dtype == dx_c.dtype:
                torch.mm(grad, w, out=dx_c)
            else:
                dx_c.copy_(grad @ w)
        if dw is not None:
            xc = x_c if x_c.dtype == grad.dtype else x_c.to(grad.dtype)
            _product_into(dw, grad.t(), xc, self.mm, first)

    def _backward_factored(self, grad: Tensor, row_scale: Tensor, x_c: Tensor, dx_c: Optional[Tensor],
                           dw: Optional[Tensor], first: bool) -> None:
        """``dx_c = r (grad @ W)`` and ``dw (+)= grad^T (r x_c)`` for the gradient ``r grad``
        (``r = row_scale`` per row).  The factor multiplies the float32 ``dX`` product before
        its one rounding to ``dx_c``'s dtype, and the chunk's ``x`` rows (rounded once to the
        gradient's dtype) before the ``dW`` GEMM: chunk-sized passes instead of a pass over the
        ``[C, V]`` gradient."""
        r = row_scale[:, None]
        w = self.weight if self.w_up is None else self.w_up
        if dx_c is not None:
            if dx_c.dtype == torch.float32 and grad.dtype == torch.float32:
                torch.mm(grad, w, out=dx_c).mul_(r)
            else:
                shape = (grad.shape[0], w.shape[1])
                if self._dx32 is None or self._dx32.shape[0] < shape[0]:
                    self._dx32 = torch.empty(shape, dtype=torch.float32, device=grad.device)
                prod = self._dx32[:shape[0]]
                if grad.dtype == torch.float32:
                    torch.mm(grad, w, out=prod)
                else:
                    self.mm(grad, w, torch.float32, out=prod)
                torch.mul(prod, r, out=dx_c)
        if dw is not None:
            if self._xs is None or self._xs.shape[0] < x_c.shape[0]:
                self._xs = torch.empty((x_c.shape[0], x_c.shape[1]), dtype=grad.dtype, device=grad.device)
            xs = torch.mul(x_c, r, out=self._xs[:x_c.shape[0]])
            _product_into(dw, grad.t(), xs, self.mm, first)

    def release(self) -> None:
        """Drop the reused per-call buffers (after the last chunk)."""
        self._fp16 = self._dx32 = self._xs = None

    def _backward_fp16(self, grad: Tensor, x_c: Tensor, dx_c: Optional[Tensor], dw: Optional[Tensor],
                       first: bool) -> None:
        """The ``dX``/``dW`` GEMMs on float16 operands with float32 products (``self.mm``).

        float16 has too little range for the float32 gradient: scaled by the reduction's
        ``1/N`` (and a DFT weight ``p``) its entries are often below float16's smallest
        subnormal (6e-8) and flush to zero, while a loss scale in ``grad_output`` (``none``)
        can push them past its largest value (65504).  So the gradient is multiplied by
        ``2^k`` (exact, computed on the device: no host sync) bringing the largest entry to
        ``[2^13, 2^14)`` before the cast, and the float32 products by ``2^-k`` after; a float32
        ``dW`` accumulator is scaled by ``2^k`` around the in-place accumulation (exact).
        """
        low, high = torch.aminmax(grad)  # the largest |entry|, without an |grad| temporary
        _, exponent = torch.frexp(torch.maximum(-low, high))
        shift = (_FP16_TOP_EXPONENT - exponent).clamp(-_MAX_SHIFT, _MAX_SHIFT)
        scale = torch.ldexp(torch.ones((), dtype=grad.dtype, device=grad.device), shift)
        unscale = scale.reciprocal()  # a power of two: exact
        if self._fp16 is None or self._fp16.shape[0] < grad.shape[0]:
            self._fp16 = torch.empty(grad.shape, dtype=torch.float16, device=grad.device)  # once per call
        g = self._fp16[:grad.shape[0]].copy_(grad.mul_(scale))
        if dx_c is not None:
            prod = self.mm(g, self.weight, torch.float32)
            dx_c.copy_(prod.mul_(unscale))
        if dw is None:
            return
        if dw.dtype == torch.float32:
            if first:
                self.mm(g.t(), x_c, torch.float32, out=dw)
            else:
                dw.mul_(scale)
                self.mm(g.t(), x_c, torch.float32, out=dw, accumulate=True)
            dw.mul_(unscale)
            return
        # a float16 accumulator (accum_dtype=None): float32 products of row blocks of dW, unscaled
        # and added (or written) block by block, so no [V, H] float32 temporary exists
        gt = g.t()
        for s in range(0, dw.shape[0], _DW_BLOCK_ROWS):
            prod = self.mm(gt[s:s + _DW_BLOCK_ROWS], x_c, torch.float32).mul_(unscale)
            if first:
                dw[s:s + _DW_BLOCK_ROWS].copy_(prod)
            else:
                dw[s:s + _DW_BLOCK_ROWS].add_(prod)


_FP16_TOP_EXPONENT = 14  # float16 gradients are scaled to a largest entry in [2^13, 2^14)
_MAX_SHIFT = 100  # 2^+-100 stays finite in float32 (all-zero or subnormal gradients)
_DW_BLOCK_ROWS = 8192  # rows of dW per float32 product when dW accumulates in float16


def _product_into(acc: Tensor, a: Tensor, b: Tensor, mm: Optional[MmOutDtype], first: bool) -> None:
    """``acc = a @ b`` (``first``) or ``acc += a @ b``, in place; ``acc`` may be wider than
    ``a``/``b``: 16-bit operands through the device's ``mm`` with float32 output, else the
    operands (chunk-sized) are cast to ``acc``'s dtype, never the ``[V, H]`` product."""
    if a.dtype != acc.dtype and mm is not None and acc.dtype == torch.float32:
        mm(a, b, torch.float32, out=acc, accumulate=not first)
        return
    if a.dtype != acc.dtype:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)
