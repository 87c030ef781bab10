"""Public functional API: argument checks, shift and flatten, reduction, dispatch.

``linear_cross_entropy`` computes the loss from hidden states and the head weight,
chunk by chunk; ``cross_entropy`` runs the same row kernel on logits you already have.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .backends import resolve_backend
from .chunked import count_valid, default_chunk_size
from .objectives import ObjectiveLike
from .params import LossParams, make_loss_params
from .stats import LossStats

__all__ = ["linear_cross_entropy", "cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
NumItems = Union[None, int, float, Tensor]


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


class Prepared(NamedTuple):
    """Flattened, checked arguments shared by the chunked path and the reference."""

    target: Tensor                  # [N] int64 (already shifted when shift=True)
    token_weights: Optional[Tensor]  # [N] float32 or None
    divisor: Optional[Tensor]       # float32 0-d: mean count or num_items_in_batch; None for sum/none
    params: LossParams
    reduction: str
    out_shape: tuple                # per-token shape before the shift slice
    shift: bool


def check_target_and_options(pred: Tensor, pred_name: str, target, vocab_size: int, *, objective,
                             ignore_index, reduction, num_items_in_batch, softcap, label_smoothing,
                             z_loss, token_weights, shift, return_stats, validate) -> Prepared:
    """Checks and normalisation common to every entry point (errors name the argument).

    ``pred`` is ``input (..., H)`` or ``logits (..., V)``; its leading dims are the token dims.
    """
    target = _require_tensor("target", target)
    _require_same_device("target", target, pred, pred_name)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(pred.shape[:-1]):
        raise ValueError(
            f"target has shape {tuple(target.shape)} but {pred_name} has shape {tuple(pred.shape)}; "
            f"target must have the shape of {pred_name} without its last dimension"
        )
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    params = make_loss_params(objective, ignore_index=ignore_index, softcap=softcap,
                              label_smoothing=label_smoothing, z_loss=z_loss, with_stats=return_stats)
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

    if shift:
        if target.dim() < 1:
            raise ValueError(f"shift=True needs a sequence dimension: {pred_name} must be at least "
                             f"(T, D), got shape {tuple(pred.shape)}")
        # Predict target[..., t+1] from position t; the last position has nothing to predict.
        target = F.pad(target[..., 1:], (0, 1), value=ignore_index)
        if token_weights is not None:
            token_weights = F.pad(token_weights[..., 1:], (0, 1), value=0.0)
    out_shape = tuple(target.shape)
    target = target.reshape(-1).to(torch.int64)
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).to(torch.float32).contiguous()

    divisor = _divisor(reduction, num_items_in_batch, target, params, vocab_size, pred.device)
    if validate:
        _validate_values(target, params.ignore_index, vocab_size, num_items_in_batch)
    return Prepared(target, token_weights, divisor, params, reduction, out_shape, bool(shift))


def _divisor(reduction: str, num_items: NumItems, target: Tensor, params: LossParams, vocab_size: int,
             device) -> Optional[Tensor]:
    if num_items is not None:
        if reduction == "none":
            raise ValueError("num_items_in_batch cannot be combined with reduction='none' "
                             "(divide the per-token losses yourself)")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items_in_batch must hold one number, got shape {tuple(num_items.shape)}")
            return num_items.detach().to(device=device, dtype=torch.float32).reshape(())
        if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
            raise TypeError(f"num_items_in_batch must be an int, float or tensor, got {type(num_items).__name__}")
        if not num_items > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items}")
        return torch.tensor(float(num_items), dtype=torch.float32, device=device)
    if reduction == "mean":
        return count_valid(target, params.ignore_index, vocab_size).clamp_min(1.0)
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


@torch.compiler.assume_constant_result
def _backend_ok(backend, device) -> bool:
    resolve_backend(backend, device)
    return True


def check_backend(backend, device) -> None:
    """Unknown or unavailable backends raise here, before any work (the ops resolve the name
    again).  Under ``torch.compile`` the check runs once, eagerly, while tracing."""
    _backend_ok(backend, device)


def _check_chunk_size(chunk_size, num_tokens: int, vocab_size: int, element_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(num_tokens, vocab_size, element_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


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


def _check_accum_dtype(accum_dtype, weight: Tensor) -> torch.dtype:
    if accum_dtype is None:
        return weight.dtype
    if not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point:
        raise TypeError(f"accum_dtype must be a floating torch.dtype or None, got {accum_dtype!r}")
    return torch.promote_types(accum_dtype, weight.dtype)


def finish(loss: Tensor, stats_sums, prep: Prepared, return_stats: bool, vocab_size: int):
    """Reshape a per-token loss (undoing the shift padding) and build LossStats."""
    if prep.reduction == "none":
        loss = loss.view(prep.out_shape)
        if prep.shift:
            loss = loss[..., :-1]
    if not return_stats:
        return loss
    nll, prob, correct, ent = stats_sums
    num = count_valid(prep.target, prep.params.ignore_index, vocab_size)
    stats = LossStats.from_sums(num, nll, prob, correct, ent if ent.numel() == 1 else None)
    return loss, stats


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
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
    accum_dtype: Optional[torch.dtype] = torch.float32,
    validate: bool = True,
):
    """Loss of ``objective`` on logits ``input @ weight.T (+ bias)``, never materialising them.

    ``input (..., H)``, ``weight (V, H)``, ``target (...)`` int64.  Returns the loss
    (0-d for ``mean``/``sum``, ``target``-shaped for ``none``), or ``(loss, LossStats)``
    when ``return_stats``.  See ``docs/api.md`` for every option.
    """
    input, weight, bias = check_linear_args(input, weight, bias)
    vocab_size, hidden = weight.shape
    prep = check_target_and_options(
        input, "input", target, vocab_size, objective=objective, ignore_index=ignore_index,
        reduction=reduction, num_items_in_batch=num_items_in_batch, softcap=softcap,
        label_smoothing=label_smoothing, z_loss=z_loss, token_weights=token_weights, shift=shift,
        return_stats=return_stats, validate=validate)
    x = input.reshape(-1, hidden)
    if not x.is_contiguous():
        x = x.contiguous()
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    check_backend(backend, input.device)
    # chunk logits are float32 (float64 for float64 input), see chunked.HeadGemms
    chunk = _check_chunk_size(chunk_size, x.shape[0], vocab_size, max(4, input.element_size()))
    acc_dtype = _check_accum_dtype(accum_dtype, weight)
    grad_on = torch.is_grad_enabled()
    loss, _dx, _dw, _db, *stats_sums = ops.lce_forward(
        x, weight_c, bias, prep.target, prep.token_weights, prep.divisor, *ops.loss_options(prep.params),
        backend, chunk, acc_dtype, prep.reduction, grad_on and x.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad)
    return finish(loss, stats_sums, prep, return_stats, vocab_size)


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
    validate: bool = True,
):
    """The same objectives on logits you already hold: ``logits (..., V)``, ``target (...)``.

    The gradient goes to ``logits``; the caller's logits are not modified.
    """
    logits = _require_tensor("logits", logits)
    _require_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., V), got a 0-d tensor")
    vocab_size = logits.shape[-1]
    prep = check_target_and_options(
        logits, "logits", target, vocab_size, objective=objective, ignore_index=ignore_index,
        reduction=reduction, num_items_in_batch=num_items_in_batch, softcap=softcap,
        label_smoothing=label_smoothing, z_loss=z_loss, token_weights=token_weights, shift=shift,
        return_stats=return_stats, validate=validate)
    flat = logits.reshape(-1, vocab_size)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    check_backend(backend, logits.device)
    chunk = _check_chunk_size(chunk_size, flat.shape[0], vocab_size, logits.element_size())
    loss, _grad, *stats_sums = ops.ce_forward(
        flat, prep.target, prep.token_weights, prep.divisor, *ops.loss_options(prep.params), backend, chunk,
        prep.reduction, torch.is_grad_enabled() and flat.requires_grad)
    return finish(loss, stats_sums, prep, return_stats, vocab_size)
