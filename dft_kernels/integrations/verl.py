"""A drop-in for verl's fused head kernel, ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``,
computed by :func:`dk.linear_logprobs` (no verl import; docs/rl.md, verl).

verl's actor calls it as ``log_probs, entropy = linear_cross_entropy(hidden_states, lm_head.weight,
rolled_labels, temperature, "none")`` (``rolled_labels``: the input ids rolled by one, already
aligned with the positions).  Its conventions, which this function keeps:

- ``hidden`` ``(..., H)`` (verl passes ``(B, T, H)`` or ``(N, H)``), ``weight`` ``(V, H)``,
  ``labels`` with the leading shape of ``hidden``; every label is scored (no ignore index: a label
  outside ``[0, V)`` is an error here);
- ``logprobs`` is ``+log softmax(z / temperature)[label]`` (the log-probability, not the loss),
  float32, **flattened** to ``(N,)`` with ``reduction="none"``, or its sum (``"sum"``) or mean over
  the ``N`` tokens (``"mean"``) as a 0-d tensor;
- ``entropy`` is always per token, ``(N,)`` float32, of the temperature-scaled distribution;
- both are differentiable w.r.t. ``hidden`` and ``weight``; ``temperature`` is a Python float.

``dist_process_group`` (verl's tensor-parallel head: ``weight`` is this rank's contiguous slice of
the vocabulary, ``labels`` global ids, the same ``hidden`` on every rank) runs the vocab-parallel
``dk.linear_logprobs``; every rank gets the global outputs.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

import dft_kernels as dk

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None, *, backend: str = "auto",
                         chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)`` as verl's ``linear_cross_entropy`` returns them (module docstring).

    ``backend`` and ``chunk_size`` (keyword-only, not verl's) go to :func:`dk.linear_logprobs`.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (float, int)):
        raise TypeError(f"temperature must be a Python float (verl's convention), got {type(temperature).__name__}")
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, Tensor) or hidden.dim() < 2:
        raise ValueError(f"hidden must be a tensor of shape (..., H), got {getattr(hidden, 'shape', hidden)!r}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have the leading shape of hidden {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    # verl scores every position: no label is ignored (a negative one, -100 included, is an error; the
    # upper bound is checked against the whole vocabulary by dk.linear_logprobs under a process group)
    upper = None if dist_process_group is not None else weight.shape[0]
    bad = labels < 0 if upper is None else (labels < 0) | (labels >= upper)
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"labels must all be token ids in [0, {upper if upper else 'V'}) (verl scores every "
                         "position; mask the result instead of the labels)")
    logprobs, entropy = dk.linear_logprobs(hidden, weight, labels, temperature=float(temperature),
                                           return_entropy=True, backend=backend, chunk_size=chunk_size,
                                           process_group=dist_process_group, validate=upper is None)
    reduction = reduction.lower()
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()   # over all N tokens, as verl divides by num_tokens
    return logprobs, entropy

