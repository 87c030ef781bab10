"""Where this rank's vocabulary slice sits in the whole head, and how DTensor operands are unwrapped.

The slices of the ranks of a process group, in rank order, make the whole vocabulary; their
sizes may differ.  :func:`gather_layout` learns them with one ``all_gather`` of three integers
per call (a host sync), which also checks that every rank runs the same call (same number of
tokens, same chunk size).  Every check that fails raises the same ``ValueError`` on every rank,
so no rank is left waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..options import is_dtensor

__all__ = ["VocabShard", "gather_layout", "is_dtensor", "is_vocab_sharded", "unwrap_head", "unwrap_logits",
           "unwrap_replicated"]


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[vocab_start, vocab_start + local_size)`` of a ``vocab_size`` head."""

    group: Any                 # torch.distributed ProcessGroup
    rank: int
    world_size: int
    vocab_start: int
    local_size: int
    vocab_size: int
    max_local_size: int        # the largest slice: sizes the default chunk the same on every rank


def _layout_device(group, device: torch.device) -> torch.device:
    # NCCL collectives take CUDA tensors; gloo (and others) CPU ones
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def gather_layout(group, local_size: int, num_tokens: int, chunk_size: Optional[int],
                  device: torch.device, second: Optional[tuple] = None) -> VocabShard:
    """The group's slice sizes, by one ``all_gather`` of ``(local_size, num_tokens, chunk_size)``.
    ``second``: ``(name, rows)`` of a second head's weight slice (the anchor's reference, a teacher),
    which must match ``local_size`` on every rank (the same vocabulary columns in both heads)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the given process group")
    width = 3 if second is None else 4
    mine = torch.tensor([local_size, num_tokens, -1 if chunk_size is None else chunk_size, *(
        () if second is None else (second[1],))], dtype=torch.int64, device=_layout_device(group, device))
    table = torch.empty(world * width, dtype=torch.int64, device=mine.device)
    # all_gather_single is all_gather_into_tensor's name from torch 2.13 on (the old one warns)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(table, mine, group=group)
    sizes, tokens, chunks, *second_sizes = (table.view(world, width).t().tolist())
    if second is not None and second_sizes[0] != sizes:
        raise ValueError(f"{second[0]}: each rank must hold the same vocabulary slice of both heads; the slice "
                         f"sizes in rank order are {sizes} for weight and {second_sizes[0]} for {second[0]}")
    if len(set(tokens)) != 1:
        raise ValueError(f"process_group: every rank must pass the same input and target (the whole batch); "
                         f"the ranks have {tokens} tokens")
    if len(set(chunks)) != 1:
        raise ValueError(f"chunk_size must be the same on every rank of process_group, got {chunks} "
                         "(-1: the default)")
    if min(sizes) < 1:
        raise ValueError(f"process_group: every rank must hold at least one vocabulary row; the slice sizes in "
                         f"rank order are {sizes}")
    return VocabShard(group=group, rank=rank, world_size=world, vocab_start=sum(sizes[:rank]), local_size=local_size,
                      vocab_size=sum(sizes), max_local_size=max(sizes))


def is_vocab_sharded(weight) -> bool:
    """Whether ``weight`` is a head the vocab-parallel loss takes as is: a DTensor sharded ``Shard(0)`` on a
    1-D mesh."""
    return is_dtensor(weight) and weight.device_mesh.ndim == 1 and _sharded_on(weight, 0)


def _sharded_on(t, dim: int) -> bool:
    from torch.distributed.tensor import Shard

    placements = t.placements
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim % t.dim() == dim


def _replicated(t) -> bool:
    from torch.distributed.tensor import Replicate

    return len(t.placements) == 1 and isinstance(t.placements[0], Replicate)


def _group_of(name: str, t, process_group):
    """The mesh's process group; ``process_group`` must be that group when given."""
    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{name} is a DTensor on a {mesh.ndim}-D device mesh; the vocab-parallel loss takes a "
                         f"1-D mesh (pass {name}.to_local() and the tensor-parallel group as process_group)")
    group = mesh.get_group()
    if process_group is not None and process_group is not group and (
            dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group)):
        raise ValueError(f"process_group is not the process group of {name}'s device mesh; pass the mesh's group "
                         "or leave process_group=None")
    return group


def unwrap_head(weight: Tensor, bias: Optional[Tensor], process_group):
    """``(weight, bias, group)`` as plain local tensors.

    A DTensor weight sharded ``Shard(0)`` on a 1-D mesh gives its local slice and the mesh's group;
    a replicated one its local copy (and ``process_group`` stays as given).  A DTensor bias must be
    laid out like the weight.  Local views keep autograd: the gradients reach the DTensors.
    """
    if not is_dtensor(weight):
        if is_dtensor(bias):
            raise TypeError("bias is a DTensor but weight is not; pass both as DTensors or both as local tensors")
        return weight, bias, process_group
    group = process_group
    if _sharded_on(weight, 0):
        group = _group_of("weight", weight, process_group)
    elif not (_replicated(weight) and weight.device_mesh.ndim == 1):
        raise ValueError(f"weight is a DTensor with placements {weight.placements} on a {weight.device_mesh.ndim}-D "
                         "mesh; the loss takes a head sharded over the vocabulary (Shard(0)) or replicated, on a "
                         "1-D mesh (call weight.full_tensor() for other layouts)")
    if bias is not None:
        if not is_dtensor(bias):
            raise TypeError("weight is a DTensor but bias is not; pass the bias as a DTensor laid out like the weight")
        if bias.device_mesh != weight.device_mesh or _sharded_on(bias, 0) != _sharded_on(weight, 0) or not (
                _sharded_on(bias, 0) or _replicated(bias)):
            raise ValueError(f"bias has placements {bias.placements}; it must be laid out like weight "
                             f"({weight.placements}) on the same mesh")
        bias = bias.to_local()
    return weight.to_local(), bias, group


class _LocalShard(torch.autograd.Function):
    """``t.to_local()`` whose gradient is a DTensor with exactly ``t``'s placements, shape and stride.

    DTensor's own ``to_local`` infers the gradient's global stride from the local shard, assuming even
    shards: for logits whose vocabulary does not split evenly (V = 257 over 2 ranks) it declares a
    stride ``t`` does not have, so autograd copies the gradient to ``t``'s layout before storing it,
    and torch 2.11's copy makes it a Replicate DTensor (all of dlogits on every rank) instead of
    ``t``'s Shard.  With the stride given, ``t.grad`` is the shard the loss computed, on any torch."""

    @staticmethod
    def forward(ctx, t):
        ctx.layout = (t.device_mesh, t.placements, t.shape, t.stride())
        local = t.to_local()  # grad mode is off here: the local tensor itself
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.layout
        return DTensor.from_local(grad.contiguous(), mesh, placements, run_check=False, shape=shape, stride=stride)


def unwrap_logits(logits: Tensor, process_group):
    """``(logits, group)``: a DTensor sharded over its last dim on a 1-D mesh gives its local slice and the
    mesh's group (``loss_parallel``-style logits), its gradient a DTensor laid out like it; a replicated one
    its local copy."""
    if not is_dtensor(logits):
        return logits, process_group
    if _sharded_on(logits, logits.dim() - 1):
        return _LocalShard.apply(logits), _group_of("logits", logits, process_group)
    if _replicated(logits) and logits.device_mesh.ndim == 1:
        return logits.to_local(), process_group
    raise ValueError(f"logits is a DTensor with placements {logits.placements}; the loss takes logits sharded over "
                     "the vocabulary (last) dimension or replicated, on a 1-D mesh")


def unwrap_replicated(name: str, t, partial_grad: bool = False):
    """A replicated DTensor ``t`` as its local tensor.  ``partial_grad``: its gradient is this rank's
    partial sum (DTensor all-reduces it where a replicated value is needed)."""
    if not is_dtensor(t):
        return t
    if not (_replicated(t) and t.device_mesh.ndim == 1):
        raise ValueError(f"{name} is a DTensor with placements {t.placements}; it must be replicated (the same on "
                         "every rank of the tensor-parallel group)")
    if partial_grad:
        from torch.distributed.tensor import Partial

        return t.to_local(grad_placements=[Partial()])
    return t.to_local()
