"""Per-batch statistics that come for free from pass 1 of the row kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["LossStats", "LogprobStats"]


@dataclass
class LossStats:
    """0-d float32 tensors (float64 for float64 inputs; ``num_tokens`` always float32) over the valid
    (non-ignored) tokens; no host sync.

    ``num_tokens``: number of valid tokens; ``nll``: mean ``-logp``; ``mean_prob``:
    mean target probability; ``accuracy``: fraction with ``argmax == target``;
    ``entropy``: mean row entropy, or None when the objective did not compute it.
    """

    num_tokens: Tensor
    nll: Tensor
    mean_prob: Tensor
    accuracy: Tensor
    entropy: Optional[Tensor] = None

    @classmethod
    def from_sums(cls, num_tokens: Tensor, nll_sum: Tensor, prob_sum: Tensor,
                  correct_sum: Tensor, entropy_sum: Optional[Tensor]) -> "LossStats":
        denom = num_tokens.clamp_min(1.0)
        return cls(
            num_tokens=num_tokens,
            nll=nll_sum / denom,
            mean_prob=prob_sum / denom,
            accuracy=correct_sum / denom,
            entropy=None if entropy_sum is None else entropy_sum / denom,
        )

    def as_dict(self) -> dict:
        """Python floats (one host sync per field), for logging."""
        return {k: (None if v is None else float(v)) for k, v in vars(self).items()}


class LogprobStats(NamedTuple):
    """Per-token statistics of :func:`dft_kernels.linear_logprobs` / :func:`dft_kernels.logprobs`
    (``return_stats=True``), from the same pass, shaped like the log-probs, without gradient; 0
    (False) at ignored positions.

    ``sum_sq_probs``: ``sum_j pi_j^2`` of ``pi = softmax(z / temperature)`` (the collision
    probability; ``1 / sum_sq_probs`` is the effective number of choices), float32 (float64 for
    float64 inputs); ``is_top1``: bool, whether the target is the (first) argmax of the logits."""

    sum_sq_probs: Tensor
    is_top1: Tensor
