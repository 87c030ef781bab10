"""The public loss options, declared once: name, default, meaning and check.

:func:`dft_kernels.linear_cross_entropy`, :func:`dft_kernels.cross_entropy`, their
references in :mod:`dft_kernels.reference`, :class:`dft_kernels.LinearCrossEntropyLoss`,
``dk.patch``, ``dk.hf.compute_loss_func`` and the trainer's ``loss_kwargs`` all take these
options by keyword with these defaults and check them by building one :class:`LossOptions`.
Every knob of the library is a field here (no environment variable is read inside an op); a
new option crosses every layer as a new field, its keyword in the public signatures
(``tests/test_options.py`` checks that they agree with the fields) and the code that uses it.
At the entry point the options are resolved once, with the call's tensors, into a
:class:`LossPlan`: the backend steps, the gradient path, the chunk rows and the dtypes.  The
plan travels down unchanged; the custom ops in :mod:`dft_kernels.ops` receive it as one
encoded string (:meth:`LossPlan.encode` / :func:`decode_plan`).

:class:`LossParams` is the subset a row kernel reads (the backend contract in
:mod:`dft_kernels.backends`).

Per-batch *data* is not an option: ``input``, ``weight``, ``bias``, ``target``,
``token_weights`` and ``num_items_in_batch`` are call arguments, checked in
:mod:`dft_kernels.functional`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional

import torch

from . import backends
from .backends import BACKEND_NAMES
from .objectives import OBJECTIVES, Objective, ObjectiveLike, get_objective

__all__ = ["LossOptions", "LossParams", "ChunkPlan", "LossPlan", "OPTION_NAMES", "LINEAR_ONLY_OPTIONS", "REDUCTIONS",
           "decode_plan", "document_options", "make_loss_params", "plan_linear", "plan_logits", "is_dtensor",
           "default_chunk_size", "CHUNK_BYTES", "MM_OUT_DTYPE"]

REDUCTIONS = ("mean", "sum", "none")
KL_DIRECTIONS = ("forward", "reverse")  # the anchor's KL(pi_ref || pi_theta), KL(pi_theta || pi_ref)
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
        "dft", "a name (``ce``, ``dft``, ``power``, ``focal``, ``chord``, ``prob``, ``entropy``, ``eaft``: defaults) "
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
    kl_coef: float = _option(
        0.0, "``>= 0``: the anchor (ASFT): per valid token the objective's loss plus ``kl_coef * KL`` between "
             "the policy's distribution and the frozen reference head's (``ref_input``, ``ref_weight``, "
             "``ref_bias``) over the whole vocabulary, after the same softcap; 0: no anchor.  docs/objectives.md, "
             "Anchored objectives (ASFT) and distillation.", linear_only=True)
    kl: str = _option(
        "forward", "direction of the anchor's KL: ``forward`` is ``KL(pi_ref || pi_theta)`` (LLaMA-Factory's "
                   "ASFT), ``reverse`` is ``KL(pi_theta || pi_ref)``.", linear_only=True)
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
        None, "token rows per chunk; None: the most rows, a multiple of 256, whose chunk buffers fit "
              "``chunk_bytes``, capped by the number of tokens; docs/design.md, Chunk size.")
    chunk_bytes: Optional[int] = _option(
        None, "byte budget of the chunk buffers when ``chunk_size`` is None; None: the device's "
              "(1.5 GiB on CUDA, 128 MiB on CPU).")
    autotune: bool = _option(
        False, "triton backend: autotune the row kernel's block size and warps per vocabulary size (the "
               "first call of each shape runs every configuration).")
    accum_dtype: Optional[torch.dtype] = _option(
        torch.float32, "dtype of the ``dW``/``db`` accumulators; None: the weight's dtype.", linear_only=True)
    logits_dtype: Optional[torch.dtype] = _option(
        None, "dtype of the chunk logits.  None: float32 (float64 for float64 input), the accurate default. "
              "``torch.bfloat16``/``torch.float16`` (equal to the input's dtype): the fast mode, where the GEMM "
              "writes 16-bit logits and the row kernel reads them with float32 math (docs/api.md lists its "
              "error per objective).", linear_only=True)
    factored: Optional[bool] = _option(
        None, "the one-read factored gradient of the triton backend (the row kernel writes the gradient as a "
              "per-row factor times a matrix, the GEMMs apply the factor).  None: where it applies (float32 or "
              "bfloat16, no bias gradient, no label smoothing or z-loss), else the two-pass kernel; True: "
              "required (ValueError with the reason where it does not apply); False: the two-pass kernel.",
        linear_only=True)
    fused_head: bool = _option(
        False, "experimental, not yet measured on a GPU (``dft_kernels.experimental.fused_head``): a Triton "
               "logits GEMM that writes the factored gradient itself, so no logits tensor exists.  Triton "
               "backend, float32/bfloat16, no bias, no label smoothing or z-loss; ValueError elsewhere.",
        linear_only=True)
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
                "they work with ce, dft, power, chord, entropy and eaft")
        put("kl_coef", _real("kl_coef", self.kl_coef))
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not isinstance(self.kl, str):
            raise TypeError(f"kl must be a string, got {type(self.kl).__name__}")
        if self.kl not in KL_DIRECTIONS:
            raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {self.kl!r}")
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
        if self.chunk_bytes is not None:
            if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int):
                raise TypeError(f"chunk_bytes must be an int or None, got {type(self.chunk_bytes).__name__}")
            if self.chunk_bytes < 1:
                raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.factored is not None and not isinstance(self.factored, bool):
            raise TypeError(f"factored must be None, True or False, got {self.factored!r}")
        for flag in ("fused_head", "autotune"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")
        if self.kl_coef > 0 and (self.fused_head or self.factored):
            name = "fused_head" if self.fused_head else "factored"
            raise ValueError(f"{name}: the anchored loss (kl_coef > 0) runs the two-head row path, not the "
                             f"factored gradient; leave {name} at its default")
        if self.fused_head and self.factored is False:
            raise ValueError("fused_head=True writes the factored gradient; it cannot run with factored=False")

    @classmethod
    def from_arguments(cls, arguments: dict) -> "LossOptions":
        """The options among a call's arguments (``locals()`` of a function that is not compiled: the
        reference, the module); the ones it does not take keep their defaults."""
        return cls(**{name: arguments[name] for name in OPTION_NAMES if name in arguments})

    @property
    def row_params(self) -> "LossParams":
        """What the row kernel needs (the backend contract in ``dft_kernels.backends``)."""
        return LossParams(self.objective, self.ignore_index, self.softcap, self.label_smoothing, self.z_loss,
                          self.return_stats, self.autotune, self.kl_coef, self.kl)

    @property
    def anchored(self) -> bool:
        """Whether the loss carries the anchor to a reference head (``kl_coef > 0``)."""
        return self.kl_coef > 0


def _is_process_group(value) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(value, dist.ProcessGroup)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LossOptions))
LINEAR_ONLY_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(LossOptions) if f.metadata["linear_only"])


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (without importing ``torch.distributed.tensor``, ~1 s: a DTensor
    exists only once it is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


@dataclass(frozen=True)
class LossParams:
    """Per-row loss options every backend receives (the subset of :class:`LossOptions` a row
    kernel reads, already checked there).

    ``objective``: a resolved :class:`Objective`; ``ignore_index``: targets equal to it
    (and, when unvalidated, any target outside ``[0, V)``) contribute nothing;
    ``softcap``: ``z = softcap * tanh(z0 / softcap)`` when set; ``label_smoothing`` and
    ``z_loss``: see docs/design.md, Math; ``with_stats``: also compute the argmax flag for
    accuracy; ``autotune``: the triton backend autotunes its launch configuration;
    ``kl_coef``, ``kl``: the anchor to a reference head (path ``"anchor"``, ``row_anchor_loss_grad``).
    """

    objective: Objective
    ignore_index: int = -100
    softcap: Optional[float] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    with_stats: bool = False
    autotune: bool = False
    kl_coef: float = 0.0
    kl: str = "forward"

    @property
    def needs_entropy(self) -> bool:
        return self.objective.needs_entropy


def make_loss_params(objective: ObjectiveLike, *, ignore_index: int = -100, softcap=None,
                     label_smoothing: float = 0.0, z_loss: float = 0.0, with_stats: bool = False) -> LossParams:
    """Checked row-kernel options (for calling a backend directly); errors name the argument."""
    return LossOptions(objective=objective, ignore_index=ignore_index, softcap=softcap,
                       label_smoothing=label_smoothing, z_loss=z_loss, return_stats=with_stats).row_params


# ---------------------------------------------------------------- what the device's GEMMs can do


def _cuda_mm_out_dtype(a, b, out_dtype: torch.dtype, *, out=None, accumulate: bool = False):
    """``a @ b`` of 16-bit ``a``, ``b`` written in ``out_dtype`` (float32) from a float32 accumulator:
    into ``out`` when given, and added to ``out`` in place with ``accumulate`` (cuBLAS, beta = 1)."""
    if accumulate:
        return torch.addmm(out, a, b, out_dtype=out_dtype, out=out)
    if out is None:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a, b, out_dtype=out_dtype, out=out)


# device type -> the device's GEMM that writes (or accumulates into) float32 from 16-bit operands,
# with the signature of :func:`_cuda_mm_out_dtype`, or None where it has none.  Probed once per device
# type (CUDA: ``mm``/``addmm`` with ``out_dtype``; CPU: none); tests put an exact emulation of cuBLAS
# here for "cpu", to run the CUDA policy on CPU.
MM_OUT_DTYPE: dict = {}


def _probe_cuda(device: torch.device) -> bool:
    for dt in (torch.bfloat16, torch.float16):
        a = torch.ones(2, 2, dtype=dt, device=device)
        acc = _cuda_mm_out_dtype(a, a, torch.float32)
        _cuda_mm_out_dtype(a, a, torch.float32, out=acc, accumulate=True)
        if acc.dtype != torch.float32 or not bool((acc == 4.0).all()):
            return False
    return True


def mm_out_dtype(device: torch.device):
    """The device's float32-output GEMM for 16-bit operands (:data:`MM_OUT_DTYPE`), or None."""
    dev = device.type
    if dev not in MM_OUT_DTYPE:
        mm = None
        if dev == "cuda":
            try:
                mm = _cuda_mm_out_dtype if _probe_cuda(device) else None
            except (RuntimeError, TypeError, NotImplementedError):
                mm = None
        MM_OUT_DTYPE[dev] = mm
    return MM_OUT_DTYPE[dev]


def head_dtypes(x_dtype: torch.dtype, logits_dtype: Optional[torch.dtype],
                device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """``(logits dtype, gradient dtype)`` of the chunk buffers for inputs of ``x_dtype``
    (docs/design.md, Precision policy): float32 logits (float64 for float64; the fast mode's
    16 bits), and the gradient in the dtype the ``dX``/``dW`` GEMMs read: float32 where the
    device has no float32-output 16-bit GEMM (CPU: a 16-bit weight is upcast once per call),
    else the input dtype for bfloat16 and float32 for float16 (rescaled into float16's range
    by the GEMMs)."""
    compute = torch.promote_types(x_dtype, torch.float32)
    logits = compute if logits_dtype is None else logits_dtype
    if x_dtype == compute or mm_out_dtype(device) is None:
        return logits, compute
    return logits, x_dtype if x_dtype == torch.bfloat16 else torch.float32


# ---------------------------------------------------------------- the plan

# Bytes of chunk buffers (logits, plus the gradient buffer where it has its own dtype) per device
# type: on a GPU large enough chunks keep the GEMMs compute-bound (2048 rows at V = 128256 for
# 16-bit inputs: 1.5 GiB); on CPU chunks only bound memory, and 128 MiB of them is as fast as more
# (bench/NOTES.md, CPU chunk budget).
CHUNK_BYTES = {"cuda": 3 << 29, "cpu": 1 << 27}
DEFAULT_CHUNK_BYTES = 1 << 30  # other device types
CHUNK_ROWS_MULTIPLE = 256  # GEMM tile friendly, without the halving a power of two can cost


def default_chunk_size(num_tokens: int, vocab_size: int, row_element_bytes: int,
                       budget: Optional[int] = None, device_type: str = "cuda") -> int:
    """Rows per chunk: the most rows whose chunk buffers (``row_element_bytes`` per logit:
    the logits buffer plus any separate gradient buffer) fit the byte budget (default
    :data:`CHUNK_BYTES` of ``device_type``), rounded down to a multiple of 256 (fewer rows only
    when not even 256 fit), and no more than the tokens need: ``num_tokens`` rounded up to a
    multiple of 256 (a power of two below 256), so that small batches keep small chunks while
    the chunk sizes, which enter the compiled graph, stay few."""
    budget = CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES) if budget is None else budget
    rows = max(1, budget // max(1, vocab_size * row_element_bytes))
    chunk = rows - rows % CHUNK_ROWS_MULTIPLE if rows >= CHUNK_ROWS_MULTIPLE else rows
    n = max(1, num_tokens)
    cap = (1 << (n - 1).bit_length()) if n < CHUNK_ROWS_MULTIPLE else -(-n // CHUNK_ROWS_MULTIPLE) * CHUNK_ROWS_MULTIPLE
    return max(1, min(chunk, cap))


# The gradient paths of a row step (docs/design.md, Data path):
ROWS = "rows"          # the row kernel reads the logits twice and writes the gradient
FACTORED = "factored"  # one read; the gradient as a per-row factor times a matrix, the factor in the GEMMs
FUSED = "fused"        # experimental: a logits GEMM that writes the factored gradient (no logits)
_FACTORABLE_DTYPES = (torch.float32, torch.bfloat16)  # float16's gradient is rescaled by the GEMMs instead


@dataclass(frozen=True)
class ChunkPlan:
    """What one call runs, resolved once at the entry point from the options and the call's
    tensors, and passed down unchanged (to the custom ops as :meth:`encode`'s string).  One class
    per option family (:class:`LossPlan`, :class:`LogprobPlan`, :class:`DistillPlan`), the same fields:

    ``options``: the checked options; ``steps``: ``(backend, path)`` pairs in the order tried,
    the first serves the call and, with ``backend="auto"`` only, a step that raises (anything
    but out-of-memory) hands the rest of *this call* to the next one, with a logged reason;
    ``chunk_size``: token rows per chunk; ``logits_dtype``/``grad_dtype``: the chunk buffers'
    (:func:`head_dtypes`); ``accum_dtype``: the ``dW``/``db`` accumulators'; ``need_*``: which
    gradients the call computes."""

    OPTIONS: ClassVar[type]  # the options class of the family
    options: object
    steps: tuple
    chunk_size: int
    logits_dtype: torch.dtype
    grad_dtype: torch.dtype
    accum_dtype: torch.dtype
    need_dx: bool = False
    need_dw: bool = False
    need_db: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _PLAN_TYPES[cls.__name__] = cls

    @property
    def params(self):
        """What the row kernels read: the options' ``row_params``."""
        return self.options.row_params

    @property
    def path(self) -> str:
        return self.steps[0][1]

    def encode(self) -> str:
        """This plan as one string, the custom ops' argument; :func:`decode_plan` inverts it.  Built
        from constants only, so ``torch.compile`` folds it into the graph.  The ops are the
        single-process path: a ``process_group`` does not cross them."""
        if self.options.process_group is not None:
            raise TypeError("process_group: the vocab-parallel path does not run through the custom ops")
        opts = tuple(_encode_value(getattr(self.options, f.name)) for f in fields(self.options))
        rest = tuple(_encode_value(getattr(self, f.name)) for f in fields(self) if f.name != "options")
        return repr((type(self).__name__, opts, rest))


_PLAN_TYPES: dict = {}  # class name -> ChunkPlan subclass (filled by ChunkPlan.__init_subclass__)


@dataclass(frozen=True)
class LossPlan(ChunkPlan):
    """The plan of a loss call (:class:`LossOptions`; ``params``: :class:`LossParams`)."""

    OPTIONS: ClassVar[type] = LossOptions


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
    if isinstance(value, tuple) and value and value[0] == _OBJECTIVE_TAG:
        return OBJECTIVES[value[1]](*value[2])
    if isinstance(value, tuple) and value and value[0] == _DTYPE_TAG:
        return getattr(torch, value[1])
    return value


_OBJECTIVE_TAG, _DTYPE_TAG = "objective", "dtype"


@functools.lru_cache(maxsize=256)
def decode_plan(encoded: str) -> ChunkPlan:
    """The plan that :meth:`ChunkPlan.encode` wrote, of its class (cached: a training loop decodes
    the same few strings over and over)."""
    kind, opts, rest = ast.literal_eval(encoded)
    plan_type = _PLAN_TYPES[kind]
    option_names = [f.name for f in fields(plan_type.OPTIONS)]
    options = plan_type.OPTIONS(**{n: _decode_value(v) for n, v in zip(option_names, opts, strict=True)})
    return plan_type(options, *(_decode_value(v) for v in rest))


def _budget(opts: LossOptions, device: torch.device) -> int:
    return opts.chunk_bytes or CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)


def _steps(backend: str, factored: Optional[bool], fused_head: bool, label_smoothing: float, z_loss: float,
           device: torch.device, factor_reason: str, objective: tuple = (_OBJECTIVE_TAG, "ce", ())) -> tuple:
    """``(backend, path)`` steps of a call on ``device``; ``factor_reason``: why the chunk loop's
    GEMMs cannot apply a factored gradient here ("" where they can); ``objective``: the call's, as
    :func:`_encode_value` writes it.  A backend whose ``supports("rows", ...)`` declines the call
    is left out of an ``auto`` plan (the reason logged once) and raises its reason when named.
    Plain values in, a tuple of strings out: torch.compile takes the result as a constant (see below)."""
    params = LossParams(_decode_value(objective), label_smoothing=label_smoothing, z_loss=z_loss)
    names, declined = [], []
    for name in backends.candidates(backend, device):
        reason = backends.get_backend(name).supports(ROWS, params)
        if not reason:
            names.append(name)
        elif backend != "auto":
            raise ValueError(f"backend: {name!r} does not run this call: {reason}")
        else:
            declined.append(f"{name!r} does not run this call ({reason})")
    if not names:
        raise ValueError(f"backend: no backend available on device {device} runs this call: {'; '.join(declined)}")
    if declined:
        backends.log_once(f"dft_kernels: backend 'auto': {'; '.join(declined)}; using {names[0]!r}")
    if fused_head:
        reason = factor_reason or backends.get_backend(names[0]).supports(FACTORED, params)
        if names[0] != "triton":
            reason = f"the fused head is a Triton kernel, and the backend is {names[0]!r}"
        if reason:
            raise ValueError(f"fused_head: not available for this call: {reason}")
        return (("triton", FUSED),)
    steps = []
    for name in names:
        reason = factor_reason or backends.get_backend(name).supports(FACTORED, params)
        if factored and not steps and reason:
            raise ValueError(f"factored=True: the factored gradient does not apply to this call: {reason}")
        if factored is not False and not reason:
            steps.append((name, FACTORED))
        if not factored:
            steps.append((name, ROWS))
    return tuple(steps) if backend == "auto" else tuple(steps[:1])


# Resolving the steps imports the backend modules and asks the device what it has, which
# torch.compile cannot trace; the steps depend on nothing else, so dynamo calls these at trace time
# and keeps their results as constants.  (This is what torch.compiler.assume_constant_result(fn)
# does; it would import torch._dynamo with dft_kernels.)
_steps._dynamo_marked_constant = True
head_dtypes._dynamo_marked_constant = True


def _plan_steps(opts: LossOptions, device: torch.device, factor_reason: str) -> tuple:
    return _steps(opts.backend, opts.factored, opts.fused_head, opts.label_smoothing, opts.z_loss, device,
                  factor_reason, _encode_value(opts.objective))


def plan_linear(opts: LossOptions, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                need_dx: bool, need_dw: bool, need_db: bool) -> LossPlan:
    """The plan of :func:`dft_kernels.linear_cross_entropy` on ``x`` ``[N, H]`` and ``weight`` ``[V, H]``."""
    need_db = need_db and bias is not None
    if opts.logits_dtype is not None and opts.logits_dtype != x.dtype:
        raise ValueError(f"logits_dtype={opts.logits_dtype} (the fast mode) needs input and weight of that dtype, "
                         f"got {x.dtype}")
    if opts.anchored:
        return _plan_pair(opts, ANCHOR, LossPlan, x, weight, bias, need_dx, need_dw, need_db,
                          logits_dtype=opts.logits_dtype, accum_dtype=opts.accum_dtype, chunk_size=opts.chunk_size,
                          budget=_budget(opts, x.device))
    factor_reason = ""
    if x.dtype not in _FACTORABLE_DTYPES:
        factor_reason = f"the input is {x.dtype} (the factored gradient is for float32 and bfloat16)"
    elif need_db:
        factor_reason = "the bias needs a gradient (a column sum of the unfactored gradient)"
    elif opts.fused_head and bias is not None:
        factor_reason = "the head has a bias"
    logits_dtype, grad_dtype = head_dtypes(x.dtype, opts.logits_dtype, x.device)
    row_bytes = grad_dtype.itemsize if opts.fused_head else (
        logits_dtype.itemsize + (grad_dtype.itemsize if grad_dtype != logits_dtype else 0))
    chunk = opts.chunk_size or default_chunk_size(x.shape[0], weight.shape[0], row_bytes, _budget(opts, x.device))
    accum = weight.dtype if opts.accum_dtype is None else torch.promote_types(opts.accum_dtype, weight.dtype)
    return LossPlan(opts, _plan_steps(opts, x.device, factor_reason), chunk, logits_dtype, grad_dtype, accum,
                    need_dx, need_dw, need_db)


# ---------------------------------------------------------------- two heads (docs/objectives.md, Anchored objectives)

ANCHOR = "anchor"    # the objective plus kl_coef * KL to a frozen reference head (row_anchor_loss_grad)
DISTILL = "distill"  # the generalized JSD of a student head to a frozen teacher head (row_distill_loss_grad)


def _pair_steps(path: str, backend: str, device: torch.device, objective: Optional[tuple] = None) -> tuple:
    """``(backend, path)`` steps of a two-head call: the candidates whose ``supports(path, params)`` is
    "" (``params`` carries the anchored loss's objective, :func:`_encode_value`'s form; None for
    distillation; plain values in, strings out: a constant under torch.compile, as :func:`_steps`).  With
    ``backend="auto"`` the others are skipped, and why is logged once; a named backend that declines
    raises with its reason."""
    params = None if objective is None else LossParams(_decode_value(objective))
    steps = []
    for name in backends.candidates(backend, device):
        reason = backends.get_backend(name).supports(path, params)
        if not reason:
            steps.append((name, path))
        elif backend != "auto":
            raise ValueError(f"backend: {name!r} cannot compute the {path} loss: {reason}; pass backend='auto' "
                             "or 'torch'")
        else:
            backends.log_once(f"dft_kernels: backend 'auto': {name!r} has no {path} path ({reason}); this call "
                              "uses the next backend")
    if not steps:
        raise ValueError(f"backend: no backend with a {path} path is available on device {device}")
    return tuple(steps) if backend == "auto" else tuple(steps[:1])


def _plan_pair(opts, path: str, plan_type, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], need_dx: bool, need_dw: bool, need_db: bool, *,
               logits_dtype: Optional[torch.dtype], accum_dtype: Optional[torch.dtype], chunk_size: Optional[int],
               budget: int):
    """The plan of a two-head call (the anchored loss, distillation) on ``x`` ``[N, H]`` and ``weight``
    ``[V, H]``: the loss's precision policy, and chunk buffers for *two* logits rows per token (the
    second head's logits live beside the first's; docs/design.md, Two heads)."""
    need_db = need_db and bias is not None
    if logits_dtype is not None and logits_dtype != x.dtype:
        raise ValueError(f"logits_dtype={logits_dtype} (the fast mode) needs input and weight of that dtype, "
                         f"got {x.dtype}")
    logits_dt, grad_dt = head_dtypes(x.dtype, logits_dtype, x.device)
    steps = _pair_steps(path, opts.backend, x.device, _encode_value(opts.objective) if path == ANCHOR else None)
    row_bytes = (2 * logits_dt.itemsize + (grad_dt.itemsize if grad_dt != logits_dt else 0)
                 + _torch_work_bytes(steps[0][0] == "torch", x.dtype, _TORCH_PAIR_WORK_ROWS))
    chunk = chunk_size or default_chunk_size(x.shape[0], weight.shape[0], row_bytes, budget)
    accum = weight.dtype if accum_dtype is None else torch.promote_types(accum_dtype, weight.dtype)
    return plan_type(opts, steps, chunk, logits_dt, grad_dt, accum, need_dx, need_dw, need_db)


_pair_steps._dynamo_marked_constant = True  # as _steps: resolved at trace time, a constant


def _torch_work_bytes(in_torch: bool, dtype: torch.dtype, work_rows: int) -> int:
    """Bytes per logit of ``work_rows`` whole-row working tensors (float32, float64 for float64) of row
    math done in torch ops (``in_torch``: the torch backend serves the call, or the vocab-parallel
    kernels, else 0): they are chunk-sized, so they count against the chunk budget like the buffers."""
    return work_rows * torch.promote_types(dtype, torch.float32).itemsize if in_torch else 0


# float32 rows per token that the torch backend's two-head row functions hold at their peak beyond the
# chunk buffers (both heads' log-softmax rows, the probabilities and the gradient being formed)
_TORCH_PAIR_WORK_ROWS = 4


def plan_logits(opts: LossOptions, logits: torch.Tensor, need_grad: bool) -> LossPlan:
    """The plan of :func:`dft_kernels.cross_entropy` on given ``logits`` ``[N, V]``: the row kernel
    writes the gradient into a buffer of its own (the only chunk-sized one)."""
    grad_dtype = logits.dtype if logits.dtype != torch.float16 else torch.float32  # float16 waits in float32
    chunk = opts.chunk_size or default_chunk_size(logits.shape[0], logits.shape[1], max(4, logits.element_size()),
                                                  _budget(opts, logits.device))
    steps = _plan_steps(opts, logits.device, "the logits are given (the gradient is the logits')")
    return LossPlan(opts, steps, chunk, logits.dtype, grad_dtype, torch.promote_types(logits.dtype, torch.float32),
                    need_dx=need_grad)


def _refuse_top_k_entropy(opts: LossOptions) -> None:
    """A vocab-parallel call cannot weight by the entropy of a row's top-k logits (``EAFT(top_k=...)``)."""
    if opts.objective.entropy_top_k is not None:
        raise ValueError(f"objective: {opts.objective!r} has no vocab-parallel path: the entropy of a row's top-k "
                         "logits needs a top-k over every rank's slice (top_k=None, the exact entropy, has one)")


def plan_vocab_parallel(opts: LossOptions, rows: torch.Tensor, max_local_size: int, weight_dtype: torch.dtype,
                        need_dx: bool, need_dw: bool = False, need_db: bool = False) -> LossPlan:
    """The plan of a vocab-parallel call on ``rows`` (``x`` ``[N, H]``, or this rank's ``[N, V_r]``
    logits): the vocab-parallel row kernel over this rank's slice (the chunk loop is given it), and
    the default chunk from the largest slice, so that every rank loops over the same chunks."""
    _refuse_top_k_entropy(opts)
    logits_dtype, grad_dtype = head_dtypes(rows.dtype, None, rows.device)
    chunk = opts.chunk_size or default_chunk_size(rows.shape[0], max_local_size, max(4, rows.element_size()),
                                                  _budget(opts, rows.device))
    accum = weight_dtype if opts.accum_dtype is None else torch.promote_types(opts.accum_dtype, weight_dtype)
    return LossPlan(opts, (("vocab-parallel", ROWS),), chunk, logits_dtype, grad_dtype, accum, need_dx, need_dw,
                    need_db)


def plan_vocab_parallel_pair(opts, path: str, plan_type, rows: torch.Tensor, max_local_size: int,
                             weight_dtype: torch.dtype, need_dx: bool, need_dw: bool, need_db: bool):
    """The plan of a vocab-parallel two-head call (``path``: ``"anchor"`` with a :class:`LossPlan`,
    ``"distill"`` with a :class:`DistillPlan`) on ``x`` ``[N, H]``: the two-head row kernel over this
    rank's slices (:mod:`dft_kernels.vocab_parallel.pair_kernel`), chunk buffers for two logits rows per
    token plus its torch working rows, the default chunk from the largest slice."""
    if path == ANCHOR:
        _refuse_top_k_entropy(opts)
    logits_dt, grad_dt = head_dtypes(rows.dtype, None, rows.device)
    row_bytes = (2 * logits_dt.itemsize + (grad_dt.itemsize if grad_dt != logits_dt else 0)
                 + _torch_work_bytes(True, rows.dtype, _TORCH_PAIR_WORK_ROWS))
    budget = _budget(opts, rows.device) if path == ANCHOR else _budget_of(rows.device)
    chunk = opts.chunk_size or default_chunk_size(rows.shape[0], max_local_size, row_bytes, budget)
    accum_dtype = opts.accum_dtype if path == ANCHOR else torch.float32
    accum = weight_dtype if accum_dtype is None else torch.promote_types(accum_dtype, weight_dtype)
    return plan_type(opts, (("vocab-parallel", path),), chunk, logits_dt, grad_dt, accum, need_dx, need_dw, need_db)


def document_options(obj, options=None):
    """Decorator: append to a function's (or class's) docstring the documentation of the options
    its signature takes, from the field docs of ``options`` (default :class:`LossOptions`)."""
    params = inspect.signature(obj).parameters
    lines = [inspect.cleandoc(obj.__doc__ or ""), "", "Options::", ""]
    for f in fields(options or LossOptions):
        if f.name in params:
            lines.append(textwrap.fill(f"{f.name}={f.default!r}: {f.metadata['doc']}", 100,
                                       initial_indent="    ", subsequent_indent="        "))
    obj.__doc__ = "\n".join(lines)
    return obj


# ---------------------------------------------------------------- the log-prob family (docs/rl.md)

LOGPROBS = "logprobs"  # the row-kernel path of the log-prob family (backends: row_logprobs / row_logprobs_grad)


def _logprob_option(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LogprobOptions:
    """The options of :func:`dft_kernels.linear_logprobs` and :func:`dft_kernels.logprobs`, checked
    and normalised on construction (errors name the option).  The options shared with the loss
    (``softcap``, ``ignore_index``, ``shift``, ``backend``, ``chunk_size``, ``process_group``,
    ``validate``) are checked by :class:`LossOptions` itself, so they mean and reject the same.
    A tensor ``temperature`` is per-token *data*: the entry point passes it apart and leaves 1.0 here."""

    temperature: float = _logprob_option(
        1.0, "a float > 0, or a tensor broadcastable to ``target`` (per-token or per-sequence temperatures, "
             "taken at the target's positions, so shifted with it): the log-probs are those of "
             "``softmax(z / temperature)``.")
    softcap: Optional[float] = _logprob_option(
        None, "when set, the logits are ``softcap * tanh(z / softcap)`` (Gemma-2 style), before the temperature.")
    ignore_index: int = _logprob_option(
        -100, "targets equal to it (and, with ``validate=False``, any target outside ``[0, V)``) give 0 and "
              "no gradient.")
    shift: bool = _logprob_option(
        False, "predict ``target[..., 1:]`` from positions ``[..., :-1]`` (the causal-LM shift); the outputs "
               "are then shaped like ``target[..., 1:]``.")
    return_entropy: bool = _logprob_option(
        False, "also return the per-token entropy of ``softmax(z / temperature)``, differentiable.")
    return_stats: bool = _logprob_option(
        False, "also return ``dk.LogprobStats`` (per-token ``sum_sq_probs`` and ``is_top1``, no gradient), "
               "from the same pass.")
    backend: str = _logprob_option(
        "auto", "row-kernel backend: ``auto``, ``triton`` or ``torch`` (the ``cuda`` backend has no log-prob "
                "kernel and says so).")
    chunk_size: Optional[int] = _logprob_option(
        None, "token rows per chunk; None: the most rows whose chunk buffers fit the device's budget "
              "(docs/design.md, Chunk size).")
    process_group: Optional[object] = _logprob_option(
        None, "vocab-parallel operands: ``weight``/``bias`` (``linear_logprobs``) or ``logits`` (``logprobs``) are "
              "this rank's contiguous slice of the vocabulary, ``target`` holds global ids; a DTensor sharded "
              "over the vocabulary needs none (docs/rl.md).")
    validate: bool = _logprob_option(
        True, "check with one host sync that every target is in ``[0, V)`` or ``ignore_index`` and every "
              "temperature of a valid token is finite and > 0; False skips it.")

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        shared = LossOptions(ignore_index=self.ignore_index, softcap=self.softcap, shift=self.shift,
                             backend=self.backend, chunk_size=self.chunk_size, process_group=self.process_group,
                             validate=self.validate)
        for name in ("ignore_index", "softcap", "shift", "backend", "chunk_size", "validate"):
            put(name, getattr(shared, name))
        put("temperature", _real("temperature", self.temperature))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for flag in ("return_entropy", "return_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")

    @property
    def row_params(self) -> "LogprobParams":
        return LogprobParams(self.ignore_index, self.softcap, self.temperature, self.return_entropy,
                             self.return_stats)


@dataclass(frozen=True)
class LogprobParams:
    """What a log-prob row kernel reads (``row_logprobs`` / ``row_logprobs_grad`` of the backend
    contract): ``ignore_index``; ``softcap``; ``temperature``, the scalar temperature of every row
    when no per-row temperature tensor is given; ``with_entropy``: compute the entropy (and keep
    what its gradient needs); ``with_stats``: ``sum_sq_probs`` and ``is_top1``."""

    ignore_index: int = -100
    softcap: Optional[float] = None
    temperature: float = 1.0
    with_entropy: bool = False
    with_stats: bool = False


@dataclass(frozen=True)
class LogprobPlan(ChunkPlan):
    """The plan of a log-prob call (:class:`LogprobOptions`; ``params``: :class:`LogprobParams`):
    ``steps`` are ``(backend, "logprobs")`` pairs."""

    OPTIONS: ClassVar[type] = LogprobOptions


def _logprob_steps(backend: str, device: torch.device) -> tuple:
    """``(backend, "logprobs")`` steps of a log-prob call on ``device``: the candidates whose
    ``supports("logprobs", ...)`` is "" (a named backend that declines raises with its reason)."""
    steps = []
    for name in backends.candidates(backend, device):
        reason = backends.get_backend(name).supports(LOGPROBS, LogprobParams())
        if not reason:
            steps.append((name, LOGPROBS))
        elif backend != "auto":
            raise ValueError(f"backend: {name!r} cannot compute log-probs: {reason}")
    if not steps:
        raise ValueError(f"backend: no backend with a log-prob kernel is available on device {device}")
    return tuple(steps) if backend == "auto" else tuple(steps[:1])


_logprob_steps._dynamo_marked_constant = True  # as _steps: resolved at trace time, a constant


def plan_logprobs_linear(opts: LogprobOptions, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         need_dx: bool, need_dw: bool, need_db: bool) -> LogprobPlan:
    """The plan of :func:`dft_kernels.linear_logprobs` on ``x`` ``[N, H]`` and ``weight`` ``[V, H]``: the
    loss's precision policy (float32 chunk logits, the gradient in the dtype the GEMMs read, a float32
    ``dW`` accumulator)."""
    logits_dtype, grad_dtype = head_dtypes(x.dtype, None, x.device)
    steps = _logprob_steps(opts.backend, x.device)
    with_grad = need_dx or need_dw or (need_db and bias is not None)  # else no gradient buffer (scoring rollouts)
    row_bytes = (logits_dtype.itemsize + (grad_dtype.itemsize if grad_dtype != logits_dtype and with_grad else 0)
                 + _torch_work_bytes(steps[0][0] == "torch", x.dtype, _TORCH_LOGPROB_WORK_ROWS))
    chunk = opts.chunk_size or default_chunk_size(x.shape[0], weight.shape[0], row_bytes, _budget_of(x.device))
    return LogprobPlan(opts, steps, chunk, logits_dtype, grad_dtype, torch.promote_types(torch.float32, weight.dtype),
                       need_dx, need_dw, need_db and bias is not None)


def plan_logprobs_logits(opts: LogprobOptions, logits: torch.Tensor, need_grad: bool) -> LogprobPlan:
    """The plan of :func:`dft_kernels.logprobs` on given ``logits`` ``[N, V]``: the gradient is written
    once, in the logits' dtype."""
    steps = _logprob_steps(opts.backend, logits.device)
    row_bytes = max(4, logits.element_size()) + _torch_work_bytes(steps[0][0] == "torch", logits.dtype,
                                                                     _TORCH_LOGPROB_WORK_ROWS)
    chunk = opts.chunk_size or default_chunk_size(logits.shape[0], logits.shape[1], row_bytes,
                                                  _budget_of(logits.device))
    return LogprobPlan(opts, steps, chunk, logits.dtype, logits.dtype, torch.promote_types(logits.dtype, torch.float32),
                       need_dx=need_grad)


# float32 (float64) rows per token that the torch backend's log-prob row functions hold at their peak beyond
# the chunk buffers (a working copy of the scaled logits, and the probabilities)
_TORCH_LOGPROB_WORK_ROWS = 2


def _budget_of(device: torch.device) -> int:
    return CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)


__all__ += ["LogprobOptions", "LogprobParams", "LogprobPlan", "LOGPROBS", "plan_logprobs_linear",
            "plan_logprobs_logits"]


# ---------------------------------------------------------------- distillation (dft_kernels/distill.py)


@dataclass(frozen=True)
class DistillOptions:
    """The options of :func:`dft_kernels.linear_distill`, checked and normalised on construction (errors
    name the option).  Those shared with the loss (``ignore_index``, ``reduction``, ``shift``, ``backend``,
    ``chunk_size``, ``process_group``, ``validate``) are checked by :class:`LossOptions` itself."""

    beta: float = _logprob_option(
        0.5, "in ``[0, 1]``: 0 is ``KL(teacher || student)``, 1 is ``KL(student || teacher)``, in between the "
             "generalized Jensen-Shannon divergence ``beta KL(teacher || m) + (1 - beta) KL(student || m)`` with "
             "``m = beta teacher + (1 - beta) student`` (TRL GKD's ``generalized_jsd_loss``).")
    temperature: float = _logprob_option(
        1.0, "a float > 0 that divides both heads' logits before their softmax.")
    ignore_index: int = _logprob_option(
        -100, "targets equal to it (and, with ``validate=False``, any target outside ``[0, V)``) mark tokens "
              "that contribute no loss and no gradient; the target's value is otherwise unused.")
    reduction: str = _logprob_option(
        "mean", "``mean`` (sum over valid tokens / their number: TRL's ``batchmean``), ``sum``, or ``none`` "
                "(per-token divergences shaped like ``target``, zeros at ignored positions).")
    shift: bool = _logprob_option(
        False, "the causal-LM shift: positions ``[..., :-1]`` are scored where ``target[..., 1:]`` is valid.")
    backend: str = _logprob_option(
        "auto", "row-kernel backend: ``auto``, ``torch`` or ``triton`` (the ``cuda`` backend has no "
                "distillation path: it raises with the reason, and ``auto`` skips it).")
    chunk_size: Optional[int] = _logprob_option(
        None, "token rows per chunk; None: the most rows whose chunk buffers (two logits rows per token) fit "
              "the device's budget (docs/design.md, Chunk size).")
    process_group: Optional[object] = _logprob_option(
        None, "the tensor-parallel group over which both heads are split along the vocabulary (each rank passes "
              "its slice of ``weight`` and ``teacher_weight``, the same slice of both, and the whole ``input``, "
              "``teacher_input`` and ``target``); DTensor heads sharded ``Shard(0)`` need none "
              "(docs/distributed.md).")
    validate: bool = _logprob_option(
        True, "check with one host sync that every target is in ``[0, V)`` or ``ignore_index``; False skips it.")

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        shared = LossOptions(objective="ce", ignore_index=self.ignore_index, reduction=self.reduction,
                             shift=self.shift, backend=self.backend, chunk_size=self.chunk_size,
                             process_group=self.process_group, validate=self.validate)
        for name in ("ignore_index", "reduction", "shift", "backend", "chunk_size", "validate"):
            put(name, getattr(shared, name))
        put("beta", _real("beta", self.beta))
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        put("temperature", _real("temperature", self.temperature))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def row_params(self) -> "DistillParams":
        return DistillParams(self.ignore_index, self.beta, self.temperature)


DISTILL_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DistillOptions))


@dataclass(frozen=True)
class DistillParams:
    """What a distillation row kernel reads (``row_distill_loss_grad`` of the backend contract):
    ``ignore_index``, ``beta``, ``temperature``.  No stats and no entropy (the chunk driver's
    accumulators read ``with_stats`` and ``needs_entropy``)."""

    ignore_index: int = -100
    beta: float = 0.5
    temperature: float = 1.0
    with_stats: bool = False
    needs_entropy: bool = False


@dataclass(frozen=True)
class DistillPlan(ChunkPlan):
    """The plan of a distillation call (:class:`DistillOptions`; ``params``: :class:`DistillParams`):
    ``steps`` are ``(backend, "distill")`` pairs."""

    OPTIONS: ClassVar[type] = DistillOptions


def plan_distill(opts: DistillOptions, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 need_dx: bool, need_dw: bool, need_db: bool) -> DistillPlan:
    """The plan of :func:`dft_kernels.linear_distill` on the student's ``x`` ``[N, H]`` and ``weight``
    ``[V, H]``: the loss's precision policy, a float32 ``dW`` accumulator."""
    return _plan_pair(opts, DISTILL, DistillPlan, x, weight, bias, need_dx, need_dw, need_db, logits_dtype=None,
                      accum_dtype=torch.float32, chunk_size=opts.chunk_size, budget=_budget_of(x.device))


__all__ += ["ANCHOR", "DISTILL", "KL_DIRECTIONS", "DistillOptions", "DistillParams", "DistillPlan",
            "DISTILL_OPTION_NAMES", "plan_distill"]
