"""Row-kernel backends and the one contract they all implement.

The contract (every backend module exposes ``row_loss_grad`` with exactly this behaviour)::

    row_loss_grad(logits, target, params, token_weights=None, grad_scale=None) -> RowOutputs

Inputs
    ``logits``: ``[n, V]`` contiguous float tensor (float32, bfloat16, float16; the torch
    backend also float64), the *raw* logits ``x W^T (+ b)`` before any softcap.
    ``target``: ``[n]`` int64.  A row is *valid* when ``0 <= target < V`` and
    ``target != params.ignore_index``; every other row (ignored or out of range) gives
    zero loss and a zero gradient row and is never used as an index.
    ``params``: :class:`~dft_kernels.params.LossParams`.
    ``token_weights``: ``None`` or ``[n]`` float32; multiplies the row's whole loss.
    ``grad_scale``: ``None`` for a forward-only call, else a float32 tensor of shape
    ``[]`` or ``[n]`` (the reduction's normaliser, or the incoming per-token gradient).

In-place rule
    When ``grad_scale`` is given, ``logits`` is overwritten, in its own dtype, with
    ``grad_scale * token_weight * dL/dz0`` where ``z0`` are the raw logits, i.e.
    ``(a * softmax - b * onehot - c) * (1 - (z / softcap)^2)`` with
    ``a = -g + 2 z_loss lse``, ``b = -g (1 - eps)``, ``c = -g eps / V`` (DESIGN §2).
    When ``grad_scale`` is None, ``logits`` is left untouched.

Outputs (:class:`RowOutputs`, float32 ``[n]`` tensors, zero at invalid rows)
    ``loss`` (times token weight), ``nll`` (``-logp``), ``prob`` (``p``),
    ``entropy`` (None unless the objective needs it), ``correct`` (1.0 where
    ``argmax == target``; None unless ``params.with_stats``).

Adding a backend is one file in this package plus one line in ``BACKENDS``.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

from torch import Tensor, device as Device

# No module-level name 'torch' here: it would shadow the backends.torch submodule.

__all__ = ["RowOutputs", "BACKENDS", "BACKEND_NAMES", "get_backend", "resolve_backend", "valid_rows"]


class RowOutputs(NamedTuple):
    loss: Tensor
    nll: Tensor
    prob: Tensor
    entropy: Optional[Tensor]
    correct: Optional[Tensor]


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
    """Boolean mask of the rows whose target is a real class (DESIGN §4)."""
    return (target != ignore_index) & (target >= 0) & (target < vocab_size)


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


def resolve_backend(name: str, device: Device):
    """Return the backend module for ``name`` on ``device``; "auto" picks the first available."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER):
            ok, _ = _availability(candidate, device)
            if ok:
                return get_backend(candidate)
        raise ValueError(f"backend: no backend is available on device {device}")
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    ok, reason = _availability(name, device)
    if not ok:
        raise ValueError(f"backend: {name!r} is not available on device {device}: {reason}")
    return get_backend(name)
