"""The public loss options, declared once: name, default, meaning and check.

:func:`dft_kernels.linear_cross_entropy`, :func:`dft_kernels.cross_entropy`, their
references in :mod:`dft_kernels.reference`, :class:`dft_kernels.LinearCrossEntropyLoss`,
``dk.patch``, ``dk.hf.compute_loss_func`` and the trainer's ``loss_kwargs`` all take these
options by keyword with these defaults and check them by building one :class:`LossOptions`.
The custom ops in :mod:`dft_kernels.ops` receive them as one encoded string
(:meth:`LossOptions.encode` / :func:`decode`), so a new option crosses every layer as a
new field here, its keyword in the public signatures (``tests/test_options.py`` checks
that they agree with the fields) and the code that uses it.

Per-batch *data* is not an option: ``input``, ``weight``, ``bias``, ``target``,
``token_weights`` and ``num_items_in_batch`` are call arguments, checked in
:mod:`dft_kernels.checks`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from .backends import BACKEND_NAMES
from .objectives import OBJECTIVES, Objective, ObjectiveLike, get_objective
from .params import LossParams

__all__ = ["LossOptions", "OPTION_NAMES", "LINEAR_ONLY_OPTIONS", "REDUCTIONS", "decode", "document_options"]

REDUCTIONS = ("mean", "sum", "none")
LOGITS_DTYPES = (torch.bfloat16, torch.float16)  # the fast mode's; None is the accurate default


def _option(default, doc: str, *, linear_only: bool = False):
    """A :class:`LossOptions` field with its documentation.  ``linear_only``: meaningful only
    when the loss computes the logits itself (``linear_cross_entropy``), so ``cross_entropy``
    on given logits does not take it."""
    return field(default=default, metadata={"doc": doc, "linear_only": linear_only})


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """The loss options of every entry point, checked and normalised on construction
    (a bad value raises ``TypeError``/``ValueError`` naming the option)."""

    objective: ObjectiveLike = _option(
        "dft", "a name (``ce``, ``dft``, ``power``, ``focal``, ``chord``, ``prob``, ``entropy``: defaults) "
               "or an objective object such as ``dk.DFT(min_weight=0.1)``; see docs/objectives.md.")
    ignore_index: int = _option(
        -100, "targets equal to it contribute no loss and no gradient (nor, with ``validate=False``, "
              "any target outside ``[0, V)``).")
    reduction: str = _option(
        "mean", "``mean`` (sum over valid tokens / their number), ``sum``, or ``none`` (per-token "
                "losses shaped like ``target``, zeros at ignored positions).")
    softcap: Optional[float] = _option(
        None, "when set, the logits are ``softcap * tanh(z / softcap)`` (Gemma-2 style).")
    label_smoothing: float = _option(
        0.0, "``eps`` in ``[0, 1]``: the per-token NLL becomes ``(1-eps)(-logp) + eps * mean_j(-log "
             "softmax_j)``, times the objective's weight (``ce`` and the stop-gradient-weight objectives only).")
    z_loss: float = _option(
        0.0, "``lam >= 0``: adds ``lam * logsumexp(z)^2`` per token (PaLM's z-loss; same objectives as "
             "``label_smoothing``).")
    shift: bool = _option(
        False, "predict ``target[..., 1:]`` from positions ``[..., :-1]`` (the causal-LM shift), without "
               "copying the input.")
    return_stats: bool = _option(
        False, "return ``(loss, dk.LossStats)``: valid-token count, mean NLL, mean probability, accuracy "
               "and (for ``entropy``) mean entropy, as 0-d tensors, without a host sync.")
    backend: str = _option(
        "auto", "row-kernel backend: ``auto``, ``triton``, ``cuda`` or ``torch``; an unavailable one raises "
                "with the reason.")
    chunk_size: Optional[int] = _option(
        None, "token rows per chunk; None: the most rows, a multiple of 256, whose chunk buffers fit the "
              "device's byte budget (1.5 GiB on CUDA, ``DFT_KERNELS_CHUNK_BYTES`` overrides it), capped by the "
              "number of tokens; docs/design.md, Chunk size.")
    accum_dtype: Optional[torch.dtype] = _option(
        torch.float32, "dtype of the ``dW``/``db`` accumulators; None: the weight's dtype.", linear_only=True)
    logits_dtype: Optional[torch.dtype] = _option(
        None, "dtype of the chunk logits.  None: float32 (float64 for float64 input), the accurate default. "
              "``torch.bfloat16``/``torch.float16`` (equal to the input's dtype): the fast mode, where the GEMM "
              "writes 16-bit logits and the row kernel reads them with float32 math (docs/api.md lists its "
              "error per objective).", linear_only=True)
    process_group: Optional[object] = _option(
        None, "vocab-parallel head: a ``torch.distributed`` ProcessGroup whose ranks each hold a contiguous "
              "slice of the vocabulary (``weight``/``bias`` rows, or ``logits`` columns); the loss and stats "
              "are the global ones on every rank; docs/distributed.md.  None: one process (a DTensor head "
              "sharded ``Shard(0)`` on a 1-D mesh brings its own group).")
    allreduce_dgrad: bool = _option(
        True, "with a ``process_group``: return the full input gradient, all-reduced over the group; False: "
              "this rank's partial sum, for frameworks that all-reduce it themselves (Megatron-core's "
              "convention).", linear_only=True)
    validate: bool = _option(
        True, "check with one host sync that every target is in ``[0, V)`` or ``ignore_index``; False "
              "skips it (such rows are then masked).")

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        put("objective", get_objective(self.objective))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not isinstance(self.reduction, str) or self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.softcap is not None:
            put("softcap", _real("softcap", self.softcap))
            if self.softcap <= 0:
                raise ValueError(f"softcap must be > 0 (or None to disable), got {self.softcap}")
        put("label_smoothing", _real("label_smoothing", self.label_smoothing))
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        put("z_loss", _real("z_loss", self.z_loss))
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if not self.objective.is_weighted_nll and (self.label_smoothing != 0.0 or self.z_loss != 0.0):
            raise ValueError(
                f"label_smoothing and z_loss are not defined for objective '{self.objective.name}'; "
                "they work with ce, dft, power, chord and entropy")
        for flag in ("shift", "return_stats", "validate"):
            put(flag, bool(getattr(self, flag)))
        if not isinstance(self.allreduce_dgrad, bool):
            raise TypeError(f"allreduce_dgrad must be a bool, got {type(self.allreduce_dgrad).__name__}")
        if self.process_group is not None and not _is_process_group(self.process_group):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(self.process_group).__name__}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {type(self.backend).__name__}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend: unknown backend {self.backend!r}; expected one of {list(BACKEND_NAMES)}")
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
                raise TypeError(f"chunk_size must be an int or None, got {type(self.chunk_size).__name__}")
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.accum_dtype is not None and (not isinstance(self.accum_dtype, torch.dtype)
                                             or not self.accum_dtype.is_floating_point):
            raise TypeError(f"accum_dtype must be a floating torch.dtype or None, got {self.accum_dtype!r}")
        if self.logits_dtype is not None and self.logits_dtype not in LOGITS_DTYPES:
            raise TypeError(f"logits_dtype must be None, torch.bfloat16 or torch.float16, got {self.logits_dtype!r}")

    @classmethod
    def from_arguments(cls, arguments: dict) -> "LossOptions":
        """The options among a call's arguments (``locals()`` of a public function); the ones it
        does not take keep their defaults."""
        return cls(**{name: arguments[name] for name in OPTION_NAMES if name in arguments})

    @property
    def row_params(self) -> LossParams:
        """What the row kernel needs (the backend contract in ``dft_kernels.backends``)."""
        return LossParams(self.objective, self.ignore_index, self.softcap, self.label_smoothing, self.z_loss,
                          self.return_stats)

    def encode(self, **resolved) -> str:
        """These options (with ``resolved`` values replacing some, e.g. the chunk size chosen for
        the call) as one string, the custom ops' options argument; :func:`decode` inverts it.
        Built from constants only, so ``torch.compile`` folds it into the graph.  The ops are the
        single-process path: a ``process_group`` does not cross them."""
        if resolved.get("process_group", self.process_group) is not None:
            raise TypeError("process_group: the vocab-parallel path does not run through the custom ops")
        return repr(tuple(_encode_value(resolved[name] if name in resolved else getattr(self, name))
                          for name in OPTION_NAMES))


def _is_process_group(value) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(value, dist.ProcessGroup)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LossOptions))
LINEAR_ONLY_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(LossOptions) if f.metadata["linear_only"])
_OBJECTIVE_TAG, _DTYPE_TAG = "objective", "dtype"


def _encode_value(value):
    if isinstance(value, Objective):
        if OBJECTIVES.get(value.name) is not type(value):
            raise TypeError(f"objective: {type(value).__name__} is not a registered objective; expected one of "
                            f"{sorted(OBJECTIVES)}")
        return (_OBJECTIVE_TAG, value.name, tuple(getattr(value, f.name) for f in fields(value)))
    if isinstance(value, torch.dtype):
        return (_DTYPE_TAG, str(value).removeprefix("torch."))
    return value


def _decode_value(value):
    if isinstance(value, tuple) and value[0] == _OBJECTIVE_TAG:
        return OBJECTIVES[value[1]](*value[2])
    if isinstance(value, tuple) and value[0] == _DTYPE_TAG:
        return getattr(torch, value[1])
    return value


@functools.lru_cache(maxsize=256)
def decode(encoded: str) -> LossOptions:
    """The :class:`LossOptions` that :meth:`LossOptions.encode` wrote (cached: a training loop
    decodes the same few strings over and over)."""
    values = ast.literal_eval(encoded)
    return LossOptions(**{name: _decode_value(v) for name, v in zip(OPTION_NAMES, values, strict=True)})


def document_options(obj):
    """Decorator: append to a function's (or class's) docstring the documentation of the options
    its signature takes, from the field docs above."""
    params = inspect.signature(obj).parameters
    lines = [inspect.cleandoc(obj.__doc__ or ""), "", "Options::", ""]
    for f in fields(LossOptions):
        if f.name in params:
            lines.append(textwrap.fill(f"{f.name}={f.default!r}: {f.metadata['doc']}", 100,
                                       initial_indent="    ", subsequent_indent="        "))
    obj.__doc__ = "\n".join(lines)
    return obj
