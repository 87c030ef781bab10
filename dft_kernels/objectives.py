"""The objective family: per-token losses of the target log-probability.

Every objective is a per-token loss ``L(p[, H])`` of the target probability
``p = exp(logp)`` (and, for ``entropy`` and ``eaft``, of the row entropy ``H``).  A row kernel
needs only two things from an objective, both computed from pass-1 statistics:

* ``loss(logp, entropy)``: the per-token loss value;
* ``coefficient(logp, entropy)``: ``g = dL/dlogp``, so that the logits
  gradient is ``dL/dz = g * (onehot - softmax)`` for every objective.

Objectives that are a stop-gradient weight times the NLL (``ce``, ``dft``,
``power``, ``chord``, ``entropy``, ``eaft``) derive from :class:`WeightedNLL`, state only their
weight, and also support label smoothing and z-loss (docs/design.md, Math);
``focal`` and ``prob`` do not.

Each class carries an integer ``kernel_id`` and up to two float ``kernel_params``
so that compiled kernels can select the epilogue with a constexpr.  A parameter whose
default depends on the vocabulary size (``EAFT``'s ``normalizer``) is fixed by
:meth:`Objective.resolve` where ``V`` is known (the eager epilogue, the kernels' launchers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "CE",
    "DFT",
    "EAFT",
    "OBJECTIVES",
    "Chord",
    "Entropy",
    "Focal",
    "Objective",
    "Power",
    "Prob",
    "WeightedNLL",
    "RowEpilogue",
    "epilogue",
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


def _param(default: float, *, low: float = 0.0, high: float = math.inf, low_inclusive: bool = True):
    """A float parameter of an objective, with its allowed range (checked on construction)."""
    return field(default=default, metadata={"range": (low, high, low_inclusive)})


def _one_minus_p(logp: Tensor) -> Tensor:
    # 1 - exp(logp) without cancellation when p is close to 1.
    return -torch.expm1(logp)


@dataclass(frozen=True)
class Objective:
    """Base class.  Subclasses are frozen dataclasses of their float parameters (:func:`_param`)."""

    name: ClassVar[str] = ""
    kernel_id: ClassVar[int] = -1
    needs_entropy: ClassVar[bool] = False
    # True for WeightedNLL objectives (-sg(w) * logp): they accept label smoothing and z-loss.
    is_weighted_nll: ClassVar[bool] = False

    def __post_init__(self):
        for f in fields(self):
            low, high, low_inclusive = f.metadata["range"]
            value = _check_param(type(self).__name__, f.name, getattr(self, f.name), low=low, high=high,
                                 low_inclusive=low_inclusive)
            object.__setattr__(self, f.name, value)

    @property
    def kernel_params(self) -> tuple[float, float]:
        vals = [float(getattr(self, f.name)) for f in fields(self)]
        return tuple((vals + [0.0, 0.0])[:2])  # type: ignore[return-value]

    @property
    def entropy_top_k(self) -> Optional[int]:
        """``k`` where the ``H`` this objective reads is the entropy of the row's ``k`` largest logits
        renormalised (``EAFT(top_k=k)``); None where it is the row's exact entropy (or unused)."""
        return None

    def resolve(self, vocab_size: int) -> "Objective":
        """This objective for rows of ``vocab_size`` logits: itself, unless a parameter's default
        depends on ``V`` (``EAFT``'s ``normalizer``), which the copy returned then fixes."""
        return self

    def loss(self, logp: Tensor, entropy: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def coefficient(self, logp: Tensor, entropy: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def _need_entropy(self, entropy: Optional[Tensor]) -> Tensor:
        if entropy is None:
            raise ValueError(f"objective '{self.name}' needs the row entropy")
        return entropy


@dataclass(frozen=True)
class WeightedNLL(Objective):
    """A stop-gradient weight times the NLL: ``L = -sg(w) * logp``, ``g = -w``.

    Subclasses state only the weight ``w(logp, H) >= 0`` (a tensor shaped like ``logp``).
    These objectives also accept label smoothing and z-loss (docs/design.md, Math).
    """

    is_weighted_nll: ClassVar[bool] = True

    def weight(self, logp: Tensor, entropy: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def loss(self, logp, entropy=None):
        return -self.weight(logp, entropy) * logp

    def coefficient(self, logp, entropy=None):
        return -self.weight(logp, entropy)


@dataclass(frozen=True)
class CE(WeightedNLL):
    """Cross-entropy (standard SFT): ``w = 1``, so ``L = -logp``, ``g = -1``."""

    name: ClassVar[str] = "ce"
    kernel_id: ClassVar[int] = 0

    def weight(self, logp, entropy=None):
        return torch.ones_like(logp)


@dataclass(frozen=True)
class DFT(WeightedNLL):
    """Dynamic Fine-Tuning: ``w = max(p, min_weight)``, so ``L = -sg(max(p, min_weight)) * logp``."""

    min_weight: float = _param(0.0, high=1.0)
    name: ClassVar[str] = "dft"
    kernel_id: ClassVar[int] = 1

    def weight(self, logp, entropy=None):
        return torch.exp(logp).clamp_min(self.min_weight)


@dataclass(frozen=True)
class Power(WeightedNLL):
    """``w = p^alpha``, so ``L = -sg(p^alpha) * logp`` (alpha=0: ce, alpha=1: dft)."""

    alpha: float = _param(1.0)
    name: ClassVar[str] = "power"
    kernel_id: ClassVar[int] = 2

    def weight(self, logp, entropy=None):
        return torch.exp(self.alpha * logp)


@dataclass(frozen=True)
class Focal(Objective):
    """Focal loss ``L = -(1-p)^gamma * logp`` with the weight differentiated:
    ``g = -(1-p)^gamma + gamma * (1-p)^(gamma-1) * p * logp``."""

    gamma: float = _param(2.0)
    name: ClassVar[str] = "focal"
    kernel_id: ClassVar[int] = 3

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
class Chord(WeightedNLL):
    """CHORD-phi: ``w = p(1-p)``, so ``L = -sg(p(1-p)) * logp``."""

    name: ClassVar[str] = "chord"
    kernel_id: ClassVar[int] = 4

    def weight(self, logp, entropy=None):
        return torch.exp(logp) * _one_minus_p(logp)


@dataclass(frozen=True)
class Prob(Objective):
    """Probability objective: ``L = -p^k``, ``g = -k p^k``."""

    k: float = _param(1.0, low_inclusive=False)
    name: ClassVar[str] = "prob"
    kernel_id: ClassVar[int] = 5

    def loss(self, logp, entropy=None):
        return -torch.exp(self.k * logp)

    def coefficient(self, logp, entropy=None):
        return -self.k * torch.exp(self.k * logp)


@dataclass(frozen=True)
class Entropy(WeightedNLL):
    """Entropy-weighted NLL (SRFT): ``w = scale * exp(-H)``, so ``L = -scale * sg(exp(-H)) * logp``."""

    scale: float = _param(1.0)
    name: ClassVar[str] = "entropy"
    kernel_id: ClassVar[int] = 6
    needs_entropy: ClassVar[bool] = True

    def weight(self, logp, entropy=None):
        return (self.scale * torch.exp(-self._need_entropy(entropy))).expand_as(logp)


@dataclass(frozen=True)
class EAFT(WeightedNLL):
    """Entropy-Adaptive Fine-Tuning (EAFT, arXiv 2601.02151): the NLL weighted by the row's normalised entropy,
    ``w = (H / normalizer)^alpha``, so ``L = -sg((H / normalizer)^alpha) * logp``.

    ``top_k=None``: ``H = -sum_j softmax_j log softmax_j``, the exact entropy of the row.
    ``top_k=k``: ``H`` is the entropy of the softmax of the row's ``k`` largest logits alone,
    renormalised over them (all ``V`` of them when ``k >= V``), LLaMA-Factory's approximation:
    its ``use_eaft_loss`` is ``EAFT(top_k=20, normalizer=3.0)``.
    ``normalizer=None``: the largest value ``H`` can take, ``log(V)`` (``log(min(k, V))`` with
    ``top_k``), so that ``w`` lies in ``[0, 1]``; fixed by :meth:`resolve` once ``V`` is known (1
    where that maximum is 0: a single logit, whose ``H`` is 0).  ``alpha >= 0`` (``0^0 = 1``).
    """

    alpha: float = _param(1.0)
    top_k: Optional[int] = None
    normalizer: Optional[float] = None
    name: ClassVar[str] = "eaft"
    kernel_id: ClassVar[int] = 7
    needs_entropy: ClassVar[bool] = True

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        put("alpha", _check_param("EAFT", "alpha", self.alpha))
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
                raise TypeError(f"EAFT: 'top_k' must be an int or None, got {type(self.top_k).__name__}")
            if self.top_k < 1:
                raise ValueError(f"EAFT: 'top_k' must be >= 1 (or None for the exact entropy), got {self.top_k}")
            put("top_k", int(self.top_k))
        if self.normalizer is not None:
            put("normalizer", _check_param("EAFT", "normalizer", self.normalizer, low_inclusive=False))

    @property
    def entropy_top_k(self) -> Optional[int]:
        return self.top_k

    def resolve(self, vocab_size: int) -> "EAFT":
        if self.normalizer is not None:
            return self
        largest = vocab_size if self.top_k is None else min(self.top_k, vocab_size)
        return dataclasses.replace(self, normalizer=math.log(largest) if largest > 1 else 1.0)

    def _normalizer(self) -> float:
        if self.normalizer is None:
            raise ValueError("EAFT: normalizer=None stands for the largest entropy, log(V), which needs the "
                             "vocabulary size: use resolve(vocab_size)")
        return self.normalizer

    @property
    def kernel_params(self) -> tuple[float, float]:
        return self.alpha, self._normalizer()

    def weight(self, logp, entropy=None):
        ratio = self._need_entropy(entropy) / self._normalizer()
        return torch.pow(ratio, self.alpha).expand_as(logp)


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CE, DFT, Power, Focal, Chord, Prob, Entropy, EAFT)
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


class RowEpilogue(NamedTuple):
    """Per-row results of :func:`epilogue` (tensors shaped like ``logp``)."""

    loss: Tensor                  # the row's loss, before token weights
    w: Tensor                     # -g, the objective's weight (the stop-gradient weight of WeightedNLL)
    a: Tensor                     # the softmax coefficient of the gradient: w + 2 z_loss lse
    c: Optional[Tensor]           # the uniform term w eps / V (label smoothing), else None
    target_grad: Tensor           # the target entry a p - w (1 - eps) - c, in a form that does not cancel


def epilogue(objective: Objective, logp: Tensor, entropy: Optional[Tensor], lse: Tensor, z_mean: Optional[Tensor],
             label_smoothing: float, z_loss: float, vocab_size: int) -> RowEpilogue:
    """The loss and gradient coefficients of a row from its statistics (docs/design.md, Math)::

        L = (1 - eps) L_obj(logp, H) + eps w (lse - mean_j z_j) + lam lse^2,   w = -g
        dL/dz_j = a softmax_j - w (1 - eps) [j == y] - c,   a = w + 2 lam lse,   c = w eps / V

    with the target entry ``a p - w (1 - eps) - c`` written as ``a expm1(logp) + 2 lam lse +
    w eps (1 - 1/V)``, which does not cancel when ``p ~ 1`` (nor when ``V = 1`` with smoothing).
    ``entropy`` is the ``H`` the objective reads: for ``EAFT(top_k=k)``, the top-``k`` entropy.
    The eager backends (torch, the vocab-parallel combine) share it; the Triton kernels have the
    same arithmetic as a device function."""
    eps, lam = label_smoothing, z_loss
    objective = objective.resolve(vocab_size)
    w = -objective.coefficient(logp, entropy)
    loss = objective.loss(logp, entropy)
    if eps != 0.0:
        loss = (1.0 - eps) * loss + eps * w * (lse - z_mean)
    if lam != 0.0:
        loss = loss + lam * lse * lse
    a = w + 2.0 * lam * lse if lam != 0.0 else w
    target_grad = a * torch.expm1(logp)
    if lam != 0.0:
        target_grad = target_grad + 2.0 * lam * lse
    c = None
    if eps != 0.0:
        c = w * (eps / vocab_size)
        target_grad = target_grad + w * (eps * (1.0 - 1.0 / vocab_size))
    return RowEpilogue(loss, w, a, c, target_grad)
