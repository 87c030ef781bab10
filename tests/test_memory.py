"""No [N, V] tensor is ever created by the chunked path (docs/design.md, Data path)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dft_kernels as dk
from helpers import make_inputs


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


N, H, V, CHUNK = 256, 32, 1000, 64  # N * V = 256000 > V * H (dW) = 32000


def _record(fn, x, w, b, t, **kw):
    x, w, b = (a.detach().clone().requires_grad_() for a in (x, w, b))
    with LargestOutput() as rec:
        loss = fn(x, w, t, bias=b, **kw)
        loss.sum().backward()
    return rec


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("objective", ["dft", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tensor_of_n_times_v_elements(backend, reduction, objective, dtype):
    x, w, b, t = make_inputs(N, H, V, dtype=dtype)
    rec = _record(dk.linear_cross_entropy, x, w, b, t, backend=backend, chunk_size=CHUNK,
                  reduction=reduction, objective=objective, return_stats=False)
    assert rec.largest < N * V, f"{rec.largest_op} produced {rec.largest} elements"
    # the chunk logits themselves were seen: the recorder works
    assert rec.largest >= CHUNK * V


def test_recorder_catches_the_materialising_reference():
    x, w, b, t = make_inputs(N, H, V)
    rec = _record(dk.reference.linear_cross_entropy, x, w, b, t)
    assert rec.largest >= N * V


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_allocates_one_weight_sized_gradient(reduction):
    """Backward of mean/sum only scales the gradients computed in forward: one [V, H] tensor
    (no zero-filled gradients for the op's non-differentiable outputs)."""
    x, w, b, t = make_inputs(64, H, V)
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    loss = dk.linear_cross_entropy(x, w, t, bias=b, chunk_size=16, reduction=reduction)
    with LargestOutput() as rec:
        loss.backward()
    assert len({ptr for size, ptr in rec.sizes if size == V * H}) == 1, rec.sizes


def test_cross_entropy_backward_allocates_one_logits_sized_gradient():
    logits = torch.randn(64, V, requires_grad=True)
    t = torch.randint(0, V, (64,))
    loss = dk.cross_entropy(logits, t, chunk_size=16)
    with LargestOutput() as rec:
        loss.backward()
    assert len({ptr for size, ptr in rec.sizes if size == 64 * V}) == 1, rec.sizes
