"""Argument checks shared by the fast path (:mod:`dft_kernels.functional`) and the oracle
(:mod:`dft_kernels.reference`): tensors, shapes, devices, dtypes, per-batch values.

The options themselves are checked by :class:`~dft_kernels.options.LossOptions`.  Every error
is a ``TypeError``/``ValueError`` whose message starts with the argument's name.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import valid_rows
from .options import LossOptions

__all__ = ["NumItems", "Prepared", "prepare", "check_linear_args", "check_logits", "count_valid"]

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
