"""The public functional API: check and flatten the arguments, resolve the options into a plan
once, run it (:mod:`dft_kernels.ops`), shape the result.

``linear_cross_entropy`` computes the loss from hidden states and the head weight, chunk by
chunk; ``cross_entropy`` runs the same row kernel on logits you already have.  The options and
their defaults are declared once, in :class:`dft_kernels.options.LossOptions`; the argument
checks here are shared with the oracle (:mod:`dft_kernels.reference`): every error is a
``TypeError``/``ValueError`` whose message starts with the argument's name.  With a
``process_group`` (or a DTensor operand) the call takes the vocab-parallel branch
(:mod:`dft_kernels.vocab_parallel`; docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .backends import valid_rows
from .backends.split import resolve_split_backend
from .objectives import ObjectiveLike
from .options import (
    ANCHOR,
    DISTILL,
    LINEAR_ONLY_OPTIONS,
    DistillPlan,
    LossOptions,
    LossPlan,
    document_options,
    is_dtensor,
    plan_linear,
    plan_logits,
    plan_vocab_parallel,
    plan_vocab_parallel_pair,
)
from .stats import LossStats
from .vocab_parallel.autograd import ParallelRun, linear_loss, logits_loss
from .vocab_parallel.pair_kernel import VocabParallelPairKernel
from .vocab_parallel.row_kernel import VocabParallelRowKernel
from .vocab_parallel.shard import gather_layout, unwrap_head, unwrap_logits, unwrap_replicated

NumItems = Union[None, int, float, Tensor]

__all__ = ["linear_cross_entropy", "cross_entropy", "prepare", "check_linear_args", "check_logits", "count_valid",
           "check_second_head", "Prepared", "NumItems"]


@document_options
def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ref_input: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    objective: ObjectiveLike = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    kl_coef: float = 0.0,
    kl: str = "forward",
    token_weights: Optional[Tensor] = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    chunk_bytes: Optional[int] = None,
    autotune: bool = False,
    accum_dtype: Optional[torch.dtype] = torch.float32,
    logits_dtype: Optional[torch.dtype] = None,
    factored: Optional[bool] = None,
    fused_head: bool = False,
    process_group=None,
    allreduce_dgrad: bool = True,
    validate: bool = True,
):
    """Loss of ``objective`` on logits ``input @ weight.T (+ bias)``, never materialising them.

    ``input (..., H)``, ``weight (V, H)``, ``target (...)`` int64; ``bias (V,)`` or None;
    ``token_weights (...)`` float multiplies each token's loss (no gradient);
    ``num_items_in_batch``: divide the summed loss by it instead (Hugging Face's gradient
    accumulation convention).  Returns the loss (0-d for ``mean``/``sum``, ``target``-shaped
    for ``none``), or ``(loss, LossStats)`` when ``return_stats``.  With ``process_group`` (or
    a DTensor ``weight`` sharded over the vocabulary), ``weight``/``bias`` are this rank's slice.

    The anchor (ASFT; docs/objectives.md): with ``kl_coef > 0``, ``ref_input (..., H_ref)`` (the frozen
    reference model's hidden states at the same positions), ``ref_weight (V, H_ref)`` and ``ref_bias (V,)``
    or None give the reference head, and each valid token's loss is the objective's plus ``kl_coef * KL``
    (``kl``) between the two heads' distributions.  The reference tensors are detached: no gradient
    reaches them, and they are never modified.
    """
    # keywords, not locals(): torch.compile (2.11) cannot trace locals()
    opts = LossOptions(objective=objective, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                       label_smoothing=label_smoothing, z_loss=z_loss, kl_coef=kl_coef, kl=kl, shift=shift,
                       return_stats=return_stats, backend=backend, chunk_size=chunk_size, chunk_bytes=chunk_bytes,
                       autotune=autotune, accum_dtype=accum_dtype, logits_dtype=logits_dtype, factored=factored,
                       fused_head=fused_head, process_group=process_group, allreduce_dgrad=allreduce_dgrad,
                       validate=validate)
    anchored = _check_anchor(opts, ref_input, ref_weight, ref_bias)
    if opts.process_group is not None or is_dtensor(weight) or is_dtensor(input):
        return _vocab_parallel_linear(input, weight, target, bias, opts, num_items_in_batch, token_weights,
                                      (ref_input, ref_weight, ref_bias) if anchored else None)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    if ref_input is not None:  # with ref_weight (_check_anchor); checked also when kl_coef=0 leaves it unused
        ref_x, ref_w, ref_b = check_second_head(input, weight, ref_input, ref_weight, ref_bias, "ref_input",
                                                "ref_weight", "ref_bias")
    vocab_size, hidden = weight.shape
    prep = prepare(input, "input", target, vocab_size, opts, num_items_in_batch, token_weights)
    x = _contiguous(input.reshape(-1, hidden))
    grad_on = torch.is_grad_enabled()
    plan = plan_linear(opts, x, weight, bias, grad_on and x.requires_grad, grad_on and weight.requires_grad,
                       grad_on and bias is not None and bias.requires_grad)
    second = (ref_x, ref_w, ref_b) if anchored else ()
    loss, _dx, _dw, _db, *stats_sums = ops.lce_forward(x, _contiguous(weight), bias, prep.target,
                                                       prep.token_weights, prep.divisor, plan.encode(), *second)
    return finish(loss, stats_sums, prep, opts, vocab_size)


def _check_anchor(opts: LossOptions, ref_input, ref_weight, ref_bias) -> bool:
    """Whether the call carries the anchor: ``kl_coef > 0`` needs ``ref_input`` and ``ref_weight``, which
    come together (``ref_bias`` only with them); given with ``kl_coef=0`` they are checked and unused."""
    if ref_input is None and ref_weight is None:
        if ref_bias is not None:
            raise ValueError("ref_bias is given without ref_input and ref_weight; the reference head needs all "
                             "of its parts")
        if opts.kl_coef > 0:
            raise ValueError(f"ref_input and ref_weight are needed for the anchor (kl_coef={opts.kl_coef} > 0): "
                             "pass the reference model's hidden states and its head weight")
        return False
    if ref_input is None or ref_weight is None:
        missing = "ref_input" if ref_input is None else "ref_weight"
        raise ValueError(f"{missing} is missing: ref_input and ref_weight come together (the reference model's "
                         "hidden states and its head weight)")
    return opts.kl_coef > 0


def check_second_head(input: Tensor, weight: Tensor, second_input, second_weight, second_bias, input_name: str,
                      weight_name: str, bias_name: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Check a frozen second head (the anchor's reference, distillation's teacher) against the first, already
    checked ``input (..., H)`` and ``weight (V, H)``: ``second_input (..., H2)`` with the same leading (token)
    shape, ``second_weight (V, H2)`` (the same vocabulary; ``H2`` may differ from ``H``), ``second_bias (V,)``
    or None, on ``input``'s device and in its dtype (errors name the argument).  Returns the rows
    ``[N, H2]``, the weight and the bias, detached and contiguous: this head gets no gradient."""
    second_input, second_weight, second_bias = _autocast_cast(second_input, second_weight, second_bias)
    for name, t in ((input_name, second_input), (weight_name, second_weight)):
        _require_tensor(name, t)
        _require_float(name, t)
        _require_same_device(name, t, input, "input")
        if t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; use one dtype")
    if second_input.dim() < 1 or tuple(second_input.shape[:-1]) != tuple(input.shape[:-1]):
        raise ValueError(f"{input_name} has shape {tuple(second_input.shape)} but input has shape "
                         f"{tuple(input.shape)}; {input_name} must have input's leading (token) dimensions "
                         "(its hidden size may differ)")
    hidden = second_input.shape[-1]
    if second_weight.dim() != 2 or tuple(second_weight.shape) != (weight.shape[0], hidden):
        raise ValueError(f"{weight_name} has shape {tuple(second_weight.shape)}; expected ({weight.shape[0]}, "
                         f"{hidden}): weight's vocabulary size and {input_name}'s hidden size")
    if second_bias is not None:
        _require_tensor(bias_name, second_bias)
        _require_same_device(bias_name, second_bias, input, "input")
        if tuple(second_bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape (V,) = ({weight.shape[0]},), got "
                             f"{tuple(second_bias.shape)}")
        if second_bias.dtype != input.dtype:
            raise TypeError(f"{bias_name} has dtype {second_bias.dtype} but input has dtype {input.dtype}; "
                            "use one dtype")
        second_bias = _contiguous(second_bias.detach())
    rows = _contiguous(second_input.detach().reshape(-1, hidden))
    return rows, _contiguous(second_weight.detach()), second_bias


@document_options
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    objective: ObjectiveLike = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: NumItems = None,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weights: Optional[Tensor] = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    chunk_bytes: Optional[int] = None,
    autotune: bool = False,
    process_group=None,
    validate: bool = True,
):
    """The same objectives on logits you already hold: ``logits (..., V)``, ``target (...)``.

    The gradient goes to ``logits``; the caller's logits are not modified.  The other
    arguments are those of :func:`linear_cross_entropy`; with ``process_group`` (or a DTensor
    sharded over its last dim), ``logits`` are this rank's ``(..., V_local)`` slice.
    """
    opts = LossOptions(objective=objective, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                       label_smoothing=label_smoothing, z_loss=z_loss, shift=shift, return_stats=return_stats,
                       backend=backend, chunk_size=chunk_size, chunk_bytes=chunk_bytes, autotune=autotune,
                       process_group=process_group, validate=validate)
    if opts.process_group is not None or is_dtensor(logits):
        return _vocab_parallel_logits(logits, target, opts, num_items_in_batch, token_weights)
    logits = check_logits(logits)
    vocab_size = logits.shape[-1]
    prep = prepare(logits, "logits", target, vocab_size, opts, num_items_in_batch, token_weights)
    flat = _contiguous(logits.reshape(-1, vocab_size))
    plan = plan_logits(opts, flat, torch.is_grad_enabled() and flat.requires_grad)
    loss, _grad, *stats_sums = ops.ce_forward(flat, prep.target, prep.token_weights, prep.divisor, plan.encode())
    return finish(loss, stats_sums, prep, opts, vocab_size)


def finish(loss: Tensor, stats_sums, prep: "Prepared", opts: LossOptions, vocab_size: int):
    """Reshape a per-token loss (undoing the shift padding) and build LossStats."""
    if opts.reduction == "none":
        loss = loss.view(prep.out_shape)
        if opts.shift:
            loss = loss[..., :-1]
    if not opts.return_stats:
        return loss
    nll, prob, correct, ent = stats_sums
    num = count_valid(prep.target, opts.ignore_index, vocab_size)
    stats = LossStats.from_sums(num, nll, prob, correct, ent if ent.numel() == 1 else None)
    return loss, stats


def _autocast_cast(*tensors):
    """Inside ``torch.autocast``, the 16/32-bit float tensors cast once to the autocast dtype (a
    differentiable cast: gradients come back in the callers' dtypes), so that the loss is the
    one on inputs of that dtype, with its precision policy.  The ops themselves run with
    autocast off (:func:`dft_kernels.ops._autocast_off`)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_CASTS else t for t in tensors)


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # as autocast: float64 stays


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------- argument checks


def _require_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _require_same_device(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def count_valid(target: Tensor, ignore_index: int, vocab_size: int) -> Tensor:
    """Number of valid tokens as a float32 0-d device tensor (no host sync)."""
    return valid_rows(target, ignore_index, vocab_size).sum(dtype=torch.float32)


class Prepared(NamedTuple):
    """Flattened, checked per-batch arguments."""

    target: Tensor                  # [N] int64 (already shifted when shift=True)
    token_weights: Optional[Tensor]  # [N] float32 (float64 for float64 pred) or None
    divisor: Optional[Tensor]       # 0-d, same dtype: mean count or num_items_in_batch; None for sum/none
    out_shape: tuple                # per-token shape before the shift slice


def check_linear_args(input, weight, bias) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    input = _require_tensor("input", input)
    weight = _require_tensor("weight", weight)
    _require_float("input", input)
    _require_float("weight", weight)
    if input.dim() < 1:
        raise ValueError("input must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but input has hidden size {input.shape[-1]}; "
                         "weight must be (V, H) with H = input.shape[-1]")
    _require_same_device("weight", weight, input, "input")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but input has dtype {input.dtype}; use one dtype")
    if bias is not None:
        bias = _require_tensor("bias", bias)
        _require_same_device("bias", bias, input, "input")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but input has dtype {input.dtype}; use one dtype")
    return input, weight, bias


def check_logits(logits) -> Tensor:
    logits = _require_tensor("logits", logits)
    _require_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., V), got a 0-d tensor")
    return logits


def prepare(pred: Tensor, pred_name: str, target, vocab_size: int, opts: LossOptions,
            num_items_in_batch: NumItems, token_weights) -> Prepared:
    """Check ``target``, ``token_weights`` and ``num_items_in_batch`` against ``pred`` (``input (..., H)``
    or ``logits (..., V)``, whose leading dims are the token dims); shift and flatten them."""
    target = _require_tensor("target", target)
    _require_same_device("target", target, pred, pred_name)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(pred.shape[:-1]):
        raise ValueError(
            f"target has shape {tuple(target.shape)} but {pred_name} has shape {tuple(pred.shape)}; "
            f"target must have the shape of {pred_name} without its last dimension"
        )
    if token_weights is not None:
        token_weights = _require_tensor("token_weights", token_weights)
        _require_same_device("token_weights", token_weights, pred, pred_name)
        _require_float("token_weights", token_weights)
        if tuple(token_weights.shape) != tuple(target.shape):
            raise ValueError(f"token_weights has shape {tuple(token_weights.shape)}; expected the "
                             f"shape of target {tuple(target.shape)}")
        if token_weights.requires_grad:
            raise ValueError("token_weights must not require grad (they are constant weights); "
                             "pass token_weights.detach()")

    if opts.shift:
        if target.dim() < 1:
            raise ValueError(f"shift=True needs a sequence dimension: {pred_name} must be at least "
                             f"(T, D), got shape {tuple(pred.shape)}")
        # Predict target[..., t+1] from position t; the last position has nothing to predict.
        target = F.pad(target[..., 1:], (0, 1), value=opts.ignore_index)
        if token_weights is not None:
            token_weights = F.pad(token_weights[..., 1:], (0, 1), value=0.0)
    out_shape = tuple(target.shape)
    target = target.reshape(-1).to(torch.int64)
    wide = torch.promote_types(pred.dtype, torch.float32)  # float64 inputs stay float64-exact
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).to(wide).contiguous()

    divisor = _divisor(opts, num_items_in_batch, target, vocab_size, pred.device, wide)
    if opts.validate:
        _validate_values(target, opts.ignore_index, vocab_size, num_items_in_batch)
    return Prepared(target, token_weights, divisor, out_shape)


def _divisor(opts: LossOptions, num_items: NumItems, target: Tensor, vocab_size: int, device,
             dtype: torch.dtype) -> Optional[Tensor]:
    if num_items is not None:
        if opts.reduction == "none":
            raise ValueError("num_items_in_batch cannot be combined with reduction='none' "
                             "(divide the per-token losses yourself)")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items_in_batch must hold one number, got shape {tuple(num_items.shape)}")
            return num_items.detach().to(device=device, dtype=dtype).reshape(())
        if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
            raise TypeError(f"num_items_in_batch must be an int, float or tensor, got {type(num_items).__name__}")
        if not num_items > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items}")
        # a fill kernel with the value as its argument: no blocking host-to-device copy
        # (torch.tensor(value, device=...) would be one per call)
        return torch.full((), float(num_items), dtype=dtype, device=device)
    if opts.reduction == "mean":
        return count_valid(target, opts.ignore_index, vocab_size).to(dtype).clamp_min(1.0)
    return None


def _validate_values(target: Tensor, ignore_index: int, vocab_size: int, num_items: NumItems) -> None:
    """The one host sync of ``validate=True``."""
    checks = [((target != ignore_index) & ((target < 0) | (target >= vocab_size))).any()]
    if isinstance(num_items, Tensor):
        checks.append((num_items.detach() <= 0).any() | num_items.detach().isnan().any())
    bad = torch.stack([c.to(target.device) for c in checks]).tolist()
    if bad[0]:
        t = target[(target != ignore_index) & ((target < 0) | (target >= vocab_size))]
        raise ValueError(
            f"target holds class indices outside [0, {vocab_size}) that are not ignore_index={ignore_index} "
            f"(e.g. {t[:5].tolist()}); pass validate=False to mask such rows instead"
        )
    if len(bad) > 1 and bad[1]:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items.tolist()}")


# ---------------------------------------------------------------- the vocab-parallel branch


def _sharded(group) -> bool:
    if group is None:
        return False
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call "
                         "torch.distributed.init_process_group first)")
    return dist.get_world_size(group) > 1


def _single_process_options(opts: LossOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "process_group"}


def _vocab_parallel_linear(input, weight, target, bias, opts: LossOptions, num_items_in_batch: NumItems,
                           token_weights: Optional[Tensor], ref: Optional[tuple] = None):
    """The vocab-parallel branch of :func:`linear_cross_entropy` (``ref``: the anchor's
    ``(ref_input, ref_weight, ref_bias)``, with ``kl_coef > 0``)."""

    def single_process(input, weight, bias, second):
        extra = {} if second is None else dict(zip(("ref_input", "ref_weight", "ref_bias"), second))
        return linear_cross_entropy(input, weight, target, bias=bias, num_items_in_batch=num_items_in_batch,
                                    token_weights=token_weights, **extra, **_single_process_options(opts))

    second = None if ref is None else (ref, ("ref_input", "ref_weight", "ref_bias"))
    return vocab_parallel_linear(input, weight, bias, target, opts, opts, num_items_in_batch, token_weights,
                                 second, single_process)


def vocab_parallel_linear(input, weight, bias, target, opts, loss_opts: LossOptions, num_items_in_batch: NumItems,
                          token_weights: Optional[Tensor], second: Optional[tuple], single_process):
    """The vocab-parallel branch of the linear losses: unwrap DTensors, learn the slice layout, check the
    arguments against the *global* vocabulary, run the chunked loss with the vocab-parallel row kernel;
    with no group (or a group of one rank) ``single_process(input, weight, bias, second_head)`` gets the
    local tensors.

    ``opts``: the call's options (:class:`LossOptions`, or :class:`~dft_kernels.options.DistillOptions`),
    ``loss_opts`` the :class:`LossOptions` of its argument checks and reduction.  ``second``: None, or
    ``((input2, weight2, bias2), names)`` of a frozen second head split like the first (the anchor's
    reference with an anchored ``opts``, else distillation's teacher): each rank holds the same slice of
    both heads; the two-head row kernel runs (:mod:`dft_kernels.vocab_parallel.pair_kernel`)."""
    weight, bias, group = unwrap_head(weight, bias, opts.process_group)
    allreduce_dgrad = getattr(opts, "allreduce_dgrad", True)
    input = unwrap_replicated("input", input, partial_grad=_sharded(group) and not allreduce_dgrad)
    if second is not None:
        (input2, weight2, bias2), names = second
        weight2, bias2, group2 = unwrap_head(weight2, bias2, opts.process_group)
        if group2 is not group and group2 is not None and (
                group is None or dist.get_process_group_ranks(group2) != dist.get_process_group_ranks(group)):
            raise ValueError(f"{names[1]} is split over another process group than weight; both heads must be "
                             "split over the same group, each rank holding the same slice of both")
        input2 = unwrap_replicated(names[0], input2)
        second = (input2, weight2, bias2)
    if not _sharded(group):
        return single_process(input, weight, bias, second)
    if getattr(opts, "logits_dtype", None) is not None:
        raise ValueError("logits_dtype: the fast mode (16-bit chunk logits) is not supported on the vocab-parallel "
                         "path; leave it None")
    # under torch.autocast: one cast to its dtype, as on one process (the Functions run with autocast off)
    input, weight, bias = check_linear_args(*_autocast_cast(input, weight, bias))
    local_vocab, hidden = weight.shape
    x = _contiguous(input.reshape(-1, hidden))
    split = resolve_split_backend(opts.backend, input.device)
    layout_of_second = None
    if second is not None:
        if not isinstance(second[1], Tensor) or second[1].dim() != 2:
            raise ValueError(f"{names[1]} must be a 2-D tensor, this rank's slice of the second head")
        layout_of_second = (names[1], second[1].shape[0])
    shard = gather_layout(group, local_vocab, x.shape[0], opts.chunk_size, input.device, layout_of_second)
    prep = prepare(input, "input", target, shard.vocab_size, loss_opts, num_items_in_batch, token_weights)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and x.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    ref = None
    if second is None:
        plan = plan_vocab_parallel(opts, x, shard.max_local_size, weight.dtype, *need)
        kernel = VocabParallelRowKernel(split, shard)
    else:
        # each rank checks its slice of the second head against its slice of the first: the same sizes on
        # every rank, so the same vocabulary columns (the slices are contiguous and in rank order)
        ref = check_second_head(input, weight, *second, *names)
        path, plan_type = (ANCHOR, LossPlan) if isinstance(opts, LossOptions) else (DISTILL, DistillPlan)
        plan = plan_vocab_parallel_pair(opts, path, plan_type, x, shard.max_local_size, weight.dtype, *need)
        kernel = VocabParallelPairKernel(split, shard)
    run = ParallelRun(plan=plan, kernel=kernel, group=group, allreduce_dgrad=allreduce_dgrad)
    loss, *stats_sums = linear_loss(x, _contiguous(weight), bias, prep.target, prep.token_weights, prep.divisor,
                                    run, ref)
    return finish(loss, stats_sums, prep, loss_opts, shard.vocab_size)


def _vocab_parallel_logits(logits, target, opts: LossOptions, num_items_in_batch: NumItems,
                           token_weights: Optional[Tensor]):
    """The vocab-parallel branch of :func:`cross_entropy` (as :func:`_vocab_parallel_linear`)."""
    logits, group = unwrap_logits(logits, opts.process_group)
    if not _sharded(group):
        options = _single_process_options(opts)
        for name in LINEAR_ONLY_OPTIONS:  # not options of cross_entropy
            del options[name]
        return cross_entropy(logits, target, num_items_in_batch=num_items_in_batch, token_weights=token_weights,
                             **options)
    logits = check_logits(logits)
    local_vocab = logits.shape[-1]
    flat = _contiguous(logits.reshape(-1, local_vocab))
    split = resolve_split_backend(opts.backend, logits.device)
    shard = gather_layout(group, local_vocab, flat.shape[0], opts.chunk_size, logits.device)
    prep = prepare(logits, "logits", target, shard.vocab_size, opts, num_items_in_batch, token_weights)
    plan = plan_vocab_parallel(opts, flat, shard.max_local_size, flat.dtype,
                               torch.is_grad_enabled() and flat.requires_grad)
    run = ParallelRun(plan=plan, kernel=VocabParallelRowKernel(split, shard), group=group)
    loss, *stats_sums = logits_loss(flat, prep.target, prep.token_weights, prep.divisor, run)
    return finish(loss, stats_sums, prep, opts, shard.vocab_size)
