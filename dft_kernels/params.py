"""What the row kernel needs per row: a small hashable dataclass every backend receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .objectives import Objective, ObjectiveLike

__all__ = ["LossParams", "make_loss_params"]


@dataclass(frozen=True)
class LossParams:
    """Per-row loss options every backend receives (the subset of
    :class:`~dft_kernels.options.LossOptions` a row kernel reads, already checked there).

    ``objective``: a resolved :class:`Objective`; ``ignore_index``: targets equal to it
    (and, when unvalidated, any target outside ``[0, V)``) contribute nothing;
    ``softcap``: ``z = softcap * tanh(z0 / softcap)`` when set; ``label_smoothing`` and
    ``z_loss``: see docs/design.md, Math; ``with_stats``: also compute the argmax flag for accuracy.
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


def make_loss_params(objective: ObjectiveLike, *, ignore_index: int = -100, softcap=None,
                     label_smoothing: float = 0.0, z_loss: float = 0.0,
                     with_stats: bool = False) -> LossParams:
    """Checked row-kernel options (for calling a backend directly); errors name the argument."""
    from .options import LossOptions

    return LossOptions(objective=objective, ignore_index=ignore_index, softcap=softcap,
                       label_smoothing=label_smoothing, z_loss=z_loss, return_stats=with_stats).row_params
