"""Loss options shared by every layer, as one small hashable dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .objectives import Objective, ObjectiveLike, get_objective

__all__ = ["LossParams", "make_loss_params"]


@dataclass(frozen=True)
class LossParams:
    """Per-row loss options every backend receives.

    ``objective``: a resolved :class:`Objective`; ``ignore_index``: targets equal to it
    (and, when unvalidated, any target outside ``[0, V)``) contribute nothing;
    ``softcap``: ``z = softcap * tanh(z0 / softcap)`` when set; ``label_smoothing`` and
    ``z_loss``: docs/design.md, Math; ``with_stats``: also compute the argmax flag for accuracy.
    """

    objective: Objective
    ignore_index: int = -100
    softcap: Optional[float] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    with_stats: bool = False

    @property
    def needs_entropy(self) -> bool:
        return self.objective.needs_entropy


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def make_loss_params(objective: ObjectiveLike, *, ignore_index: int = -100, softcap=None,
                     label_smoothing: float = 0.0, z_loss: float = 0.0,
                     with_stats: bool = False) -> LossParams:
    """Check and normalise the loss options; errors name the argument."""
    obj = get_objective(objective)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if softcap is not None:
        softcap = _real("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 (or None to disable), got {softcap}")
    label_smoothing = _real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = _real("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if not obj.is_weighted_nll and (label_smoothing != 0.0 or z_loss != 0.0):
        raise ValueError(
            f"label_smoothing and z_loss are not defined for objective '{obj.name}'; "
            "they work with ce, dft, power, chord and entropy"
        )
    return LossParams(obj, ignore_index, softcap, label_smoothing, z_loss, bool(with_stats))
