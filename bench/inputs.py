"""The one set of inputs every provider of a shape is measured on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .shapes import Shape

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05   # a few prompt-like ignored positions, so ignore_index handling is checked
LOGIT_STD = 2.0


@dataclass
class Inputs:
    """Hidden states ``x [N, H]`` and head weight ``w [V, H]`` (leaves that require grad),
    targets ``t [N]`` int64 with ``IGNORE_INDEX`` at ~5% of positions."""

    x: Tensor
    w: Tensor
    t: Tensor
    softcap: float | None

    def clear_grads(self) -> None:
        self.x.grad = None
        self.w.grad = None

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients every provider must return (dx, dW in the input dtype)."""
        return self.x.numel() * self.x.element_size() + self.w.numel() * self.w.element_size()


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    """Deterministic in ``seed`` on a given device: logits ``x w^T`` have std ~``LOGIT_STD``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    dt = shape.torch_dtype
    x = torch.randn(shape.n, shape.h, generator=g, device=device, dtype=torch.float32)
    w = torch.randn(shape.v, shape.h, generator=g, device=device, dtype=torch.float32)
    w.mul_(LOGIT_STD / shape.h ** 0.5)
    t = torch.randint(0, shape.v, (shape.n,), generator=g, device=device)
    ignored = torch.rand(shape.n, generator=g, device=device) < IGNORED_FRACTION
    t[ignored] = IGNORE_INDEX
    x = x.to(dt).requires_grad_(True)
    w = w.to(dt).requires_grad_(True)
    return Inputs(x, w, t, shape.softcap)
