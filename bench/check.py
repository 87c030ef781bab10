"""The loss check: every provider's loss and gradients against the reference provider's,
on the same inputs, before it is timed (so nothing is timed computing something else)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Relative error ||out - ref|| / ||ref|| allowed between two implementations: twice the
# per-implementation bound against float64 (docs/design.md, Tests) for 16-bit, a float32 margin otherwise.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass
class Result:
    """Loss and gradients of one fwd+bwd (detached copies)."""

    loss: float
    dx: Tensor
    dw: Tensor

    @property
    def grad_checksum(self) -> float:
        """``||dx|| + ||dW||`` in float64 (a sum would be ~0: softmax gradients sum to zero)."""
        return float(self.dx.double().norm() + self.dw.double().norm())


@dataclass
class Verdict:
    ok: bool
    loss_rel_err: float
    grad_rel_err: float
    detail: str


def rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = float(ref.norm())
    diff = float((out - ref).norm())
    if denom == 0.0:
        return diff
    return diff / denom


def capture(loss: Tensor, x: Tensor, w: Tensor) -> Result:
    if x.grad is None or w.grad is None:
        raise RuntimeError("provider returned no gradient for " + ("x" if x.grad is None else "w"))
    return Result(float(loss.detach().float()), x.grad.detach().clone(), w.grad.detach().clone())


def compare(got: Result, ref: Result, dtype: torch.dtype, tol: Optional[float] = None) -> Verdict:
    tol = TOLERANCE[dtype] if tol is None else tol
    if not all(map(lambda v: bool(torch.isfinite(torch.as_tensor(v)).all()), (got.loss, got.dx, got.dw))):
        return Verdict(False, float("nan"), float("nan"), "non-finite loss or gradient")
    le = abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-30)
    ge = max(rel_err(got.dx, ref.dx), rel_err(got.dw, ref.dw))
    ok = le <= tol and ge <= tol
    detail = "ok" if ok else f"mismatch: loss rel err {le:.2e}, grad rel err {ge:.2e} > tol {tol:.0e}"
    return Verdict(ok, le, ge, detail)
