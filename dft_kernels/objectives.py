"""The objective family: per-token losses of the target log-probability.

Every objective is a per-token loss ``L(p[, H])`` of the target probability
``p = exp(logp)`` (and, for ``entropy``, of the row entropy ``H``).  A row kernel
needs only two things from an objective, both computed from pass-1 statistics:

* ``loss(logp, entropy)``: the per-token loss value;
* ``coefficient(logp, entropy)``: ``g = dL/dlogp``, so that the logits
  gradient is ``dL/dz = g * (onehot - softmax)`` for every objective.

Objectives that are a stop-gradient weight times the NLL (``ce``, ``dft``,
``power``, ``chord``, ``entropy``) also support label smoothing and z-loss
(docs/design.md, Math); ``focal`` and ``prob`` do not.

Each class carries an integer ``kernel_id`` and up to two float ``kernel_params``
so that compiled kernels can select the epilogue with a constexpr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "Objective",
    "CE",
    "DFT",
    "Power",
    "Focal",
    "Chord",
    "Prob",
    "Entropy",
    "OBJECTIVES",
    "get_objective",
]


def _check_param(cls_name: str, name: str, value, *, low: float = 0.0, high: float = math.inf,
                 low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{cls_name}: '{name}' must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{cls_name}: '{name}' must be finite, got {value}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        lo = "[" if low_inclusive else "("
        raise ValueError(f"{cls_name}: '{name}' must be in {lo}{low}, {high}], got {value}")
    return value


def _one_minus_p(logp: Tensor) -> Tensor:
    # 1 - exp(logp) without cancellation when p is close to 1.
    return -torch.expm1(logp)


@dataclass(frozen=True)
class Objective:
    """Base class.  Subclasses are frozen dataclasses of their float parameters."""

    name: ClassVar[str] = ""
    kernel_id: ClassVar[int] = -1
    needs_entropy: ClassVar[bool] = False
    # True for the objectives of the form -sg(w) * logp (plus ce): they accept
    # label smoothing and z-loss.
    is_weighted_nll: ClassVar[bool] = True

    @property
    def kernel_params(self) -> tuple[float, float]:
        vals = [float(getattr(self, f.name)) for f in fields(self)]
        return tuple((vals + [0.0, 0.0])[:2])  # type: ignore[return-value]

    def loss(self, logp: Tensor, entropy: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def coefficient(self, logp: Tensor, entropy: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def _need_entropy(self, entropy: Optional[Tensor]) -> Tensor:
        if entropy is None:
            raise ValueError(f"objective '{self.name}' needs the row entropy")
        return entropy


@dataclass(frozen=True)
class CE(Objective):
    """Cross-entropy (standard SFT): ``L = -logp``, ``g = -1``."""

    name: ClassVar[str] = "ce"
    kernel_id: ClassVar[int] = 0

    def loss(self, logp, entropy=None):
        return -logp

    def coefficient(self, logp, entropy=None):
        return torch.full_like(logp, -1.0)


@dataclass(frozen=True)
class DFT(Objective):
    """Dynamic Fine-Tuning: ``L = -sg(max(p, min_weight)) * logp``, ``g = -max(p, min_weight)``."""

    min_weight: float = 0.0
    name: ClassVar[str] = "dft"
    kernel_id: ClassVar[int] = 1

    def __post_init__(self):
        object.__setattr__(self, "min_weight", _check_param("DFT", "min_weight", self.min_weight, high=1.0))

    def _w(self, logp):
        return torch.exp(logp).clamp_min(self.min_weight)

    def loss(self, logp, entropy=None):
        return -self._w(logp) * logp

    def coefficient(self, logp, entropy=None):
        return -self._w(logp)


@dataclass(frozen=True)
class Power(Objective):
    """``L = -sg(p^alpha) * logp``, ``g = -p^alpha`` (alpha=0: ce, alpha=1: dft)."""

    alpha: float = 1.0
    name: ClassVar[str] = "power"
    kernel_id: ClassVar[int] = 2

    def __post_init__(self):
        object.__setattr__(self, "alpha", _check_param("Power", "alpha", self.alpha))

    def _w(self, logp):
        return torch.exp(self.alpha * logp)

    def loss(self, logp, entropy=None):
        return -self._w(logp) * logp

    def coefficient(self, logp, entropy=None):
        return -self._w(logp)


@dataclass(frozen=True)
class Focal(Objective):
    """Focal loss ``L = -(1-p)^gamma * logp`` with the weight differentiated:
    ``g = -(1-p)^gamma + gamma * (1-p)^(gamma-1) * p * logp``."""

    gamma: float = 2.0
    name: ClassVar[str] = "focal"
    kernel_id: ClassVar[int] = 3
    is_weighted_nll: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "gamma", _check_param("Focal", "gamma", self.gamma))

    def loss(self, logp, entropy=None):
        return -torch.pow(_one_minus_p(logp), self.gamma) * logp

    def coefficient(self, logp, entropy=None):
        q = _one_minus_p(logp)
        first = -torch.pow(q, self.gamma)
        if self.gamma == 0.0:
            return first
        # At q == 0 exactly (p == 1, logp == 0) the term is inf * 0 for gamma < 1; its
        # limit is 0 because logp ~ -q there.
        second = self.gamma * torch.pow(q, self.gamma - 1.0) * torch.exp(logp) * logp
        return first + torch.where(q > 0, second, torch.zeros_like(second))


@dataclass(frozen=True)
class Chord(Objective):
    """CHORD-phi: ``L = -sg(p(1-p)) * logp``, ``g = -p(1-p)``."""

    name: ClassVar[str] = "chord"
    kernel_id: ClassVar[int] = 4

    def _w(self, logp):
        return torch.exp(logp) * _one_minus_p(logp)

    def loss(self, logp, entropy=None):
        return -self._w(logp) * logp

    def coefficient(self, logp, entropy=None):
        return -self._w(logp)


@dataclass(frozen=True)
class Prob(Objective):
    """Probability objective: ``L = -p^k``, ``g = -k p^k``."""

    k: float = 1.0
    name: ClassVar[str] = "prob"
    kernel_id: ClassVar[int] = 5
    is_weighted_nll: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "k", _check_param("Prob", "k", self.k, low_inclusive=False))

    def loss(self, logp, entropy=None):
        return -torch.exp(self.k * logp)

    def coefficient(self, logp, entropy=None):
        return -self.k * torch.exp(self.k * logp)


@dataclass(frozen=True)
class Entropy(Objective):
    """Entropy-weighted NLL (SRFT): ``L = -scale * sg(exp(-H)) * logp``, ``g = -scale exp(-H)``."""

    scale: float = 1.0
    name: ClassVar[str] = "entropy"
    kernel_id: ClassVar[int] = 6
    needs_entropy: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "scale", _check_param("Entropy", "scale", self.scale))

    def _w(self, entropy):
        return self.scale * torch.exp(-entropy)

    def loss(self, logp, entropy=None):
        return -self._w(self._need_entropy(entropy)) * logp

    def coefficient(self, logp, entropy=None):
        return -self._w(self._need_entropy(entropy)).expand_as(logp)


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CE, DFT, Power, Focal, Chord, Prob, Entropy)
}

ObjectiveLike = Union[str, Objective]


def get_objective(objective: ObjectiveLike) -> Objective:
    """Resolve ``"dft"`` or ``DFT(min_weight=0.1)`` to an ``Objective`` instance."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, type) and issubclass(objective, Objective) and objective is not Objective:
        return objective()
    if isinstance(objective, str):
        cls = OBJECTIVES.get(objective.lower())
        if cls is None:
            raise ValueError(
                f"objective: unknown objective {objective!r}; expected one of {sorted(OBJECTIVES)} "
                "or an Objective instance such as dk.DFT(min_weight=0.1)"
            )
        return cls()
    raise TypeError(f"objective: expected a string or an Objective, got {type(objective).__name__}")
