"""A dispatch-mode recorder of the tensors ops produce: used to show that no [tokens, vocab]
tensor is allocated (tests/test_memory.py, and the trainer smoke tests in integration/)."""

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
