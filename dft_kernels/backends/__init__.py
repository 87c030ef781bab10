"""Row-kernel backends and the one contract they all implement.

The contract (every backend module exposes ``row_loss_grad`` with exactly this behaviour)::

    row_loss_grad(logits, target, params, token_weights=None, grad_scale=None, grad_out=None) -> RowOutputs

Inputs
    ``logits``: ``[n, V]`` contiguous float tensor (float32, bfloat16, float16; the torch
    backend also float64), the *raw* logits ``x W^T (+ b)`` before any softcap.
    ``target``: ``[n]`` int64.  A row is *valid* when ``0 <= target < V`` and
    ``target != params.ignore_index``; every other row (ignored or out of range) gives
    zero loss and a zero gradient row and is never used as an index.
    ``params``: :class:`~dft_kernels.options.LossParams`.
    ``token_weights``: ``None`` or ``[n]`` float32; multiplies the row's whole loss.
    ``grad_scale``: ``None`` for a forward-only call, else a float32 tensor of shape
    ``[]`` or ``[n]`` (the reduction's normaliser, or the incoming per-token gradient).

Gradient output
    When ``grad_scale`` is given, the gradient ``grad_scale * token_weight * dL/dz0`` where
    ``z0`` are the raw logits, i.e. ``(a * softmax - b * onehot - c) * (1 - (z / softcap)^2)``
    with ``a = -g + 2 z_loss lse``, ``b = -g (1 - eps)``, ``c = -g eps / V`` (docs/design.md,
    Math), is written once, from float32 math, either
    - into ``grad_out`` when it is given: an ``[n, V]`` float tensor with unit stride along
      V (any row stride; float32, bfloat16, float16, and float64 on the torch backend), in
      *its* dtype, which may differ from the logits' (the chunk loop passes the dtype its
      ``dX``/``dW`` GEMMs read, so no cast pass follows); ``logits`` is then left untouched;
    - or, with ``grad_out=None``, over ``logits`` in place, in the logits' dtype.
    When ``grad_scale`` is None, ``grad_out`` is ignored and ``logits`` is left untouched.
    (The triton and torch backends write ``grad_out`` directly; the cuda backend computes in
    a copy of the row and converts, see :func:`via_in_place`.)

Outputs (:class:`RowOutputs`, float32 ``[n]`` tensors, float64 for float64 logits; zero at invalid rows)
    ``loss`` (times token weight), ``nll`` (``-logp``), ``prob`` (``p``),
    ``entropy`` (None unless the objective needs it), ``correct`` (1.0 where
    ``argmax == target``; None unless ``params.with_stats``).

Paths (every backend module also exposes ``supports(path, params) -> str``: "" where it runs
``path`` for ``params``, else the reason it does not)
    ``"rows"``: :func:`row_loss_grad` above; every backend, for every objective but one: the
    triton and cuda backends decline ``EAFT(top_k=k)`` (:func:`top_k_reason`), the torch backend
    runs it (its ``H``, the entropy of the row's top-k logits renormalised, from ``torch.topk``).
    ``"factored"``: ``row_loss_grad_factored(logits, target, params, token_weights, grad_scale,
    grad_out, row_scale)``: the same outputs, with the gradient written as a per-row factor times
    a matrix, i.e. ``row_scale[:, None] * grad_out`` (or ``* logits`` in place) equals the
    gradient above; ``row_scale`` is a float32 ``[n]`` tensor it fills (0 at invalid rows, whose
    matrix rows are zeros).  The point is one read of the logits instead of two: the entries
    ``e^{z_j - c}`` can be written before the row's ``lse`` is known, and the chunk loop's GEMMs
    apply the factor on chunk-sized operands (docs/design.md, Data path).  The triton backend
    has it (not with label smoothing or a z-loss).

The log-prob family (path ``"logprobs"``; docs/rl.md), for :func:`dft_kernels.linear_logprobs`
and :func:`dft_kernels.logprobs`.  A backend whose ``supports("logprobs", params)`` is "" has::

    row_logprobs(logits, target, params, temperature=None) -> LogprobRowOutputs
    row_logprobs_grad(logits, target, params, row_stats, grad_logp, grad_entropy,
                      temperature=None, grad_out=None) -> None

    ``logits``, ``target`` and validity as above; ``params``: :class:`~dft_kernels.options.LogprobParams`.
    Row ``i`` reads ``z = softcap * tanh(z0 / softcap) / T_i`` (no cap without ``softcap``), with
    ``T_i = temperature[i]`` when the float32 (float64) ``[n]`` tensor ``temperature`` is given,
    else ``params.temperature``; an invalid row's temperature is never used.
    ``row_logprobs`` returns float32 (float64 for float64 logits) ``[n]`` tensors, zero (False) at
    invalid rows: ``logp = z_y - lse``; ``entropy`` ``H = -sum_j pi_j log pi_j`` (None unless
    ``params.with_entropy``); ``sum_sq`` ``sum_j pi_j^2`` and ``top1`` (bool, first argmax == y)
    (None unless ``params.with_stats``); and ``row_stats``, ``[n, 3]`` in the same dtype:
    ``(m, log1p(r), gap)`` with ``m = max_j z_j``, ``lse = m + log1p(r)`` and
    ``gap = sum_j pi_j (m - z_j) = H - log1p(r)`` (the last 0 without ``with_entropy``), what
    ``row_logprobs_grad`` reads back instead of a second pass.
    ``row_logprobs_grad`` writes, from float32 math, in one read of the row, with ``a = grad_logp``
    and ``c = grad_entropy`` (``[n]`` float32/float64, or None for 0)::

        dL/dz0_j = (a (1[j=y] - pi_j) - c pi_j (log pi_j + H)) / T_i * (1 - (z_j T_i / softcap)^2)

    with ``log pi_j + H = (z_j - m) + gap`` and the target entry as
    ``-a expm1(logp) - c p ((z_y - m) + gap)`` (no cancellation when ``p ~ 1``); into
    ``grad_out`` (as ``row_loss_grad``'s: any float dtype, unit stride along V) or, with
    ``grad_out=None``, over ``logits`` in place; zero rows at invalid rows.

Two heads (paths ``"anchor"`` and ``"distill"``; docs/design.md, Two heads), for the anchored loss
(``kl_coef > 0``) and :func:`dft_kernels.linear_distill`.  A backend whose ``supports(path, None)`` is
"" has::

    row_anchor_loss_grad(logits, ref_logits, target, params, token_weights=None, grad_scale=None,
                         grad_out=None) -> RowOutputs
    row_distill_loss_grad(logits, ref_logits, target, params, token_weights=None, grad_scale=None,
                          grad_out=None) -> RowOutputs

    ``logits``, ``target``, ``token_weights``, ``grad_scale``, ``grad_out`` and the outputs as
    ``row_loss_grad``'s; ``ref_logits``: the second (frozen) head's raw ``[n, V]`` logits of the same
    rows, in the logits' dtype, only read.  ``row_anchor_loss_grad`` (``params``: :class:`LossParams`)
    adds to each valid row's objective loss ``kl_coef * KL`` with ``pi = softmax(cap(logits))``,
    ``q = softmax(cap(ref_logits))``, ``KL(q || pi)`` for ``params.kl == "forward"`` and ``KL(pi || q)``
    for ``"reverse"``, times the token weight, and to its gradient the KL's, ``pi - q`` or
    ``pi (log pi - log q - KL)`` times the cap's ``sech^2``, times ``grad_scale * token_weight *
    kl_coef``.  ``row_distill_loss_grad`` (``params``: :class:`~dft_kernels.options.DistillParams`)
    computes the generalized JSD of ``log_softmax(logits / T)`` to ``log_softmax(ref_logits / T)``
    (``beta``; the formulas in ``backends/torch.py``) and its gradient; ``nll``/``prob`` are the first
    head's, ``entropy`` and ``correct`` None.  The torch and triton backends have them.

Adding a backend is one file in this package plus one line in ``BACKENDS``.

Which backend and path a call runs is decided once, at the entry point, by
:func:`dft_kernels.options.plan_linear` (``plan_logits``): :func:`candidates` gives the
available backends in order.  With ``backend="auto"`` the chunk loop hands the rest of a call
to the next step when one raises (anything but out-of-memory), logging the reason; nothing is
switched off for later calls.
"""

from __future__ import annotations

import importlib
import logging
from typing import NamedTuple, Optional

from torch import Tensor
from torch import device as Device

# No module-level name 'torch' here: it would shadow the backends.torch submodule.

__all__ = ["RowOutputs", "LogprobRowOutputs", "BACKENDS", "BACKEND_NAMES", "candidates", "get_backend",
           "resolve_backend", "valid_rows", "check_grad_out", "via_in_place", "log_once", "top_k_reason"]

logger = logging.getLogger("dft_kernels")


class RowOutputs(NamedTuple):
    loss: Tensor
    nll: Tensor
    prob: Tensor
    entropy: Optional[Tensor]
    correct: Optional[Tensor]


class LogprobRowOutputs(NamedTuple):
    """What ``row_logprobs`` returns (the log-prob family of the contract above)."""

    logp: Tensor
    entropy: Optional[Tensor]
    sum_sq: Optional[Tensor]
    top1: Optional[Tensor]
    row_stats: Tensor


# name -> module implementing the contract.
BACKENDS: dict[str, str] = {
    "triton": "dft_kernels.backends.triton",
    "cuda": "dft_kernels.backends.cuda",
    "torch": "dft_kernels.backends.torch",
}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)
# What "auto" tries, in order, per device type.  Off CUDA only the torch backend is
# picked automatically (Triton's CPU interpreter is for tests, not for speed).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda", "torch")}
DEFAULT_AUTO_ORDER: tuple[str, ...] = ("torch",)


def valid_rows(target: Tensor, ignore_index: int, vocab_size: int) -> Tensor:
    """Boolean mask of the rows whose target is a real class (docs/design.md, Public API)."""
    return (target != ignore_index) & (target >= 0) & (target < vocab_size)


def check_grad_out(grad_out: Optional[Tensor], logits: Tensor, dtypes: tuple) -> None:
    """The contract's checks of ``grad_out`` (TypeError/ValueError naming it)."""
    if grad_out.dtype not in dtypes:
        raise TypeError(f"grad_out: expected one of {[str(d) for d in dtypes]}, got {grad_out.dtype}")
    if grad_out.shape != logits.shape or (grad_out.shape[1] > 1 and grad_out.stride(1) != 1):
        raise ValueError(f"grad_out must have the logits' shape {tuple(logits.shape)} and unit stride along V, got "
                         f"shape {tuple(grad_out.shape)} and strides {grad_out.stride()}")
    if grad_out.device != logits.device:
        raise ValueError(f"grad_out must be on {logits.device} like logits, got {grad_out.device}")


def via_in_place(row_loss_grad_in_place, logits: Tensor, grad_out: Tensor, *args) -> RowOutputs:
    """``grad_out`` for a kernel that only writes its gradient in place: run it on a copy of the
    logits (in place on ``grad_out`` itself when it has the logits' dtype), then convert."""
    work = grad_out.copy_(logits) if grad_out.dtype == logits.dtype else logits.clone()
    out = row_loss_grad_in_place(work, *args)
    if work is not grad_out:
        grad_out.copy_(work)
    return out


def top_k_reason(objective) -> str:
    """Why a compiled row kernel (triton, cuda) does not run ``objective``, or "": its ``H`` is the
    entropy of the row's top-k logits, which needs a selection of k entries out of V that these
    kernels do not make (they stream the row once and keep the exact entropy)."""
    k = objective.entropy_top_k
    if k is None:
        return ""
    return (f"{objective!r} weights each row by the entropy of its top-{k} logits, which needs a top-k selection "
            "over the row that the compiled kernels do not make (they compute the exact entropy: top_k=None); "
            "the torch backend runs it")


def get_backend(name: str):
    """Import a backend module by name (without checking the device)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as exc:  # a backend file that is not there yet, or a missing dependency
        raise ValueError(f"backend: {name!r} is not available: {exc}") from exc


def _availability(name: str, device: Device) -> tuple[bool, str]:
    try:
        module = get_backend(name)
    except ValueError as exc:
        return False, str(exc)
    return module.is_available(device)


_logged: set[str] = set()


def log_once(message: str) -> None:
    """A warning on logger ``dft_kernels``, once per distinct message."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def candidates(name: str, device: Device) -> tuple[str, ...]:
    """The backends a call with ``backend=name`` may run on ``device``, in order: a named backend
    alone (ValueError with the reason when it is unavailable); ``"auto"``: the available ones of
    :data:`AUTO_ORDER` for the device type (an unavailable one is skipped, and why is logged
    once; ValueError when none is)."""
    if name == "auto":
        found, skipped = [], []
        for candidate in AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER):
            ok, reason = _availability(candidate, device)
            if ok:
                found.append(candidate)
            else:
                skipped.append(f"{candidate!r} is not available ({reason})")
        if not found:
            raise ValueError(f"backend: no backend is available on device {device}"
                             + (f"; {'; '.join(skipped)}" if skipped else ""))
        if skipped and len(AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER)) > 1:
            log_once(f"dft_kernels: backend 'auto' on {device.type}: {'; '.join(skipped)}; using {found[0]!r}")
        return tuple(found)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    ok, reason = _availability(name, device)
    if not ok:
        raise ValueError(f"backend: {name!r} is not available on device {device}: {reason}")
    return (name,)


def resolve_backend(name: str, device: Device):
    """The module of the backend a call with ``backend=name`` runs first on ``device``
    (see :func:`candidates`)."""
    return get_backend(candidates(name, device)[0])
