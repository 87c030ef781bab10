"""No [N, V] tensor is ever created by the chunked path (docs/design.md, Data path)."""

import pytest
import torch

import dft_kernels as dk
from dft_kernels import options
from dispatch_recorder import FreshTensors, LargestOutput
from helpers import cublas_mm_out_dtype, leaf, make_inputs, obj_id, skip_if_declined

N, H, V, CHUNK = 256, 32, 1000, 64  # N * V = 256000 > V * H (dW) = 32000


def _record(fn, x, w, b, t, **kw):
    x, w, b = (a.detach().clone().requires_grad_() for a in (x, w, b))
    with LargestOutput() as rec:
        loss = fn(x, w, t, bias=b, **kw)
        loss.sum().backward()
    return rec


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
# EAFT(top_k): torch.topk on each chunk's logits (the torch backend; triton declines it)
@pytest.mark.parametrize("objective", ["dft", "entropy", "eaft", dk.EAFT(top_k=20, normalizer=3.0)], ids=obj_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tensor_of_n_times_v_elements(backend, reduction, objective, dtype):
    skip_if_declined(backend, objective)
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


# ---- the chunk loop's allocations (docs/design.md, Data path) ----
# N * H (8192) and N * V (256000) differ from V * H (32000) and from C * V (64000): a tensor
# of V * H elements is weight-sized, one of >= C * V elements chunk-logits-sized.
POLICIES = {
    # name: (dtype, emulate the CUDA policy, logits_dtype, chunk buffers: logits (+ gradient))
    "fp32": (torch.float32, False, None, 1),
    "bf16-cuda-policy": (torch.bfloat16, True, None, 2),
    "fp16-cuda-policy": (torch.float16, True, None, 2),  # float32 logits/gradient + its float16 copy
    "bf16-fast-cuda-policy": (torch.bfloat16, True, torch.bfloat16, 1),
    "fp16-fast-cuda-policy": (torch.float16, True, torch.float16, 3),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_chunk_loop_allocations(backend, policy, reduction, monkeypatch):
    """Forward and backward together allocate: no tensor of V * H elements but the one ``dW``
    accumulator and the returned ``dW`` (two at most: one when they share a dtype); the
    chunk buffers once per call, not once per chunk (4 chunks here), so at most one chunk of
    logits (plus its gradient buffer) is alive at a time, besides the torch backend's working
    buffer and mask; and nothing of N * V elements."""
    dtype, emulate, logits_dtype, buffers = POLICIES[policy]
    if emulate:
        monkeypatch.setitem(options.MM_OUT_DTYPE, "cpu", cublas_mm_out_dtype)
    x, w, b, t = make_inputs(N, H, V, dtype=dtype, bias=False, ignore="none")
    x, w = leaf(x), leaf(w)
    with FreshTensors(watch_numel=CHUNK * V) as rec:
        loss = dk.linear_cross_entropy(x, w, t, backend=backend, chunk_size=CHUNK, reduction=reduction,
                                       logits_dtype=logits_dtype)
        loss.sum().backward()
    weight_sized = rec.count(V * H)
    assert 1 <= weight_sized <= 2, [f for f in rec.fresh if f[0] == V * H]
    assert w.grad.shape == (V, H) and torch.isfinite(w.grad).all()
    chunk_sized = [f for f in rec.fresh if f[0] >= CHUNK * V]
    assert all(f[0] < N * V for f in rec.fresh), max(rec.fresh)[:3]
    if backend == "triton":  # no working buffers: only the chunk loop's own
        # mean: the buffers once; none: the forward's logits buffer, then the backward's buffers
        assert len(chunk_sized) == (buffers if reduction == "mean" else 1 + buffers), chunk_sized
        assert rec.peak_alive <= buffers
    else:  # plus the torch backend's working buffer and boolean mask (backends/torch.py)
        assert rec.peak_alive <= buffers + 2, chunk_sized


# ---- the log-prob family (docs/rl.md): forward keeps O(tokens), backward recomputes the chunks ----


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_make_no_tensor_of_n_times_v_elements(backend, dtype, linear):
    """linear_logprobs with entropy, stats and a per-token temperature, forward and backward of both
    outputs: no tensor of N * V elements (the chunk logits are seen: the recorder works).  On given
    logits the only N * V tensors are the caller's logits and their one gradient."""
    x, w, b, t = make_inputs(N, H, V, dtype=dtype)
    x, w, b = (a.detach().clone().requires_grad_() for a in (x, w, b))
    temp = torch.rand(N) + 0.5
    logits = leaf(torch.randn(N, V, dtype=dtype)) if not linear else None
    with LargestOutput() as rec:
        if linear:
            logp, ent, _stats = dk.linear_logprobs(x, w, t, bias=b, temperature=temp, return_entropy=True,
                                                   return_stats=True, backend=backend, chunk_size=CHUNK)
        else:
            logp, ent, _stats = dk.logprobs(logits, t, temperature=temp, return_entropy=True, return_stats=True,
                                            backend=backend, chunk_size=CHUNK)
        (logp * torch.randn(N) + ent * torch.randn(N)).sum().backward()
    if linear:
        assert rec.largest < N * V, f"{rec.largest_op} produced {rec.largest} elements"
        assert rec.largest >= CHUNK * V
    else:
        fresh = {ptr for size, ptr in rec.sizes if size == N * V} - {logits.untyped_storage().data_ptr()}
        assert fresh == {logits.grad.untyped_storage().data_ptr()}, rec.sizes  # the gradient, once


@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
def test_logprobs_chunk_allocations(backend, linear, softcap):
    """The log-prob family's chunk loop, forward and backward of both outputs with stats and a
    per-token temperature: at most one chunk of logits (linear; on given logits the caller's) plus
    the torch backend's working rows (options._TORCH_LOGPROB_WORK_ROWS, which the plan's chunk
    budget counts) alive at a time; the triton backend has none."""
    x, w, b, t = make_inputs(N, H, V)
    x, w, b = leaf(x), leaf(w), leaf(b)
    logits = leaf(torch.randn(N, V)) if not linear else None
    temp = torch.rand(N) + 0.5
    kw = dict(temperature=temp, softcap=softcap, return_entropy=True, return_stats=True, backend=backend,
              chunk_size=CHUNK)
    with FreshTensors(watch_numel=CHUNK * V) as rec:
        if linear:
            logp, ent, _stats = dk.linear_logprobs(x, w, t, bias=b, **kw)
        else:
            logp, ent, _stats = dk.logprobs(logits, t, **kw)
        (logp * torch.randn(N) + ent * torch.randn(N)).sum().backward()
    chunk_sized = [f[1:] for f in rec.fresh if CHUNK * V <= f[0] < N * V]
    assert chunk_sized or (backend == "triton" and not linear), "the recorder saw no chunk"
    # linear: the chunk's logits buffer; on given logits: their [N, V] gradient (the chunks are views)
    buffers = 1
    work = 0 if backend == "triton" else options._TORCH_LOGPROB_WORK_ROWS
    assert rec.peak_alive <= buffers + work, chunk_sized


def test_logprobs_forward_keeps_three_numbers_per_row():
    """What the log-prob op saves for backward besides its inputs: [N, 3] row statistics."""
    x, w, b, t = make_inputs(N, H, V)
    x = leaf(x)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logp, ent = dk.linear_logprobs(x, w, t, bias=b, return_entropy=True, backend="torch", chunk_size=CHUNK)
    assert saved, "the recorder saw nothing"
    inputs = {a.untyped_storage().data_ptr() for a in (x, w, b, t)}
    extra = [tuple(s.shape) for s in saved if s.untyped_storage().data_ptr() not in inputs]
    assert extra == [(N, 3)], extra
