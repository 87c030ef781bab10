"""A dispatch-mode recorder of the tensors ops produce: used to show that no [tokens, vocab]
tensor is allocated (tests/test_memory.py, and the trainer smoke tests in integration/)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dft_kernels as dk


class LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor produced by every op run under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None
        self.sizes = []  # (numel, storage address) of every output, views included

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = dk.ops.IMPLEMENTATIONS.get(func.name())
        if impl is not None:  # look inside our custom ops: run their eager code under the recorder
            with self:
                return impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            # uint8 tensors are raw storage bytes (Triton's interpreter copies kernel arguments'
            # storages this way), not N x V elements; no logits tensor is uint8
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.sizes.append((t.numel(), t.untyped_storage().data_ptr()))
                if t.numel() > self.largest:
                    self.largest, self.largest_op = t.numel(), func
        return out


class FreshTensors(TorchDispatchMode):
    """Records every *fresh* tensor ops produce (an output whose storage is none of the op's
    inputs': not a view, not an ``out=`` or in-place result) as ``(numel, shape, dtype, op)``,
    and the peak number of fresh tensors of at least ``watch_numel`` elements alive at once
    (a fresh tensor counts as alive while its Python object does: views keep it through
    ``._base``).  Looks inside the custom ops, like :class:`LargestOutput`."""

    def __init__(self, watch_numel: int):
        super().__init__()
        self.watch_numel = watch_numel
        self.fresh = []
        self.peak_alive = 0
        self._watched = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = dk.ops.IMPLEMENTATIONS.get(func.name())
        if impl is not None:
            with self:
                return impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dtype != torch.uint8 and t.numel() > 0
                    and t.untyped_storage().data_ptr() not in inputs):
                self.fresh.append((t.numel(), tuple(t.shape), t.dtype, func))
                if t.numel() >= self.watch_numel:
                    self._watched.append(weakref.ref(t))
        self._watched = [r for r in self._watched if r() is not None]
        self.peak_alive = max(self.peak_alive, len(self._watched))
        return out

    def count(self, numel: int) -> int:
        return sum(1 for n, *_ in self.fresh if n == numel)
