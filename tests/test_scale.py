"""The loss past int32 indexing: N * V > 2^31 logits (docs/design.md, Tests).

* In CI (fast): the row kernels on a ``[3, V]`` float16 view whose rows lie ``2^30 + 64``
  elements apart, so that the last row starts past element ``2^31`` (an int32 row offset
  would wrap).  The view sits in a ~4 GiB allocation of which only the three rows and a few
  guard elements around them are ever touched, so it costs a few pages of real memory.
  CPU: the Triton kernel under the interpreter; GPU (``gpu``): Triton and CUDA.
* ``slow`` (``pytest -m slow tests/test_scale.py -s``, deselected by default):
  ``dk.cross_entropy`` on bfloat16 logits of 32769 x 65537 (N V = 2^31 + 98305, 4.3 GB) and
  ``dk.linear_cross_entropy`` at N 40000, V 60000 (N V = 2.4e9), on the torch backend,
  against the float64 reference computed chunk by chunk over every row.
* GPU and ``slow``: ``dk.cross_entropy`` on 32769 x 65537 logits in one kernel launch.
"""

from __future__ import annotations

import resource
import time

import pytest
import torch

import dft_kernels as dk
from dft_kernels.backends import get_backend
from dft_kernels.options import make_loss_params
from helpers import TOL, rel_err

INT32_MAX = 2**31 - 1
ROW_GAP = 2**30 + 64  # fits int32, as a contiguous tensor's row stride would; 2 * ROW_GAP does not
GUARD = 64            # elements checked on both sides of every row: nothing outside a row is written
SENTINEL = 1234.0

# dk.cross_entropy at scale: N V just over 2^31 with the smallest bfloat16 logits tensor
CE_N, CE_V = 32769, 65537
# dk.linear_cross_entropy at scale (the shape)
LCE_N, LCE_V, LCE_H = 40000, 60000, 16


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _rows_past_int32(n: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A float16 ``[n, vocab]`` view with row stride ``ROW_GAP`` into a fresh, untouched buffer.
    Returns ``(view, buffer)``; the rows and the guards around them hold values, nothing else."""
    numel = (n - 1) * ROW_GAP + vocab + GUARD
    assert (n - 1) * ROW_GAP > INT32_MAX, "the last row must start past int32"
    try:
        buffer = torch.empty(numel, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:  # no overcommit: the ~4 GiB really would be needed
        pytest.skip(f"cannot reserve {numel * 2 / 2**30:.1f} GiB of address space on {device}: {exc}")
    for r in range(n):
        start = r * ROW_GAP
        buffer[max(0, start - GUARD):start].fill_(SENTINEL)
        buffer[start + vocab:start + vocab + GUARD].fill_(SENTINEL)
    return buffer.as_strided((n, vocab), (ROW_GAP, 1)), buffer


def _guards_intact(buffer: torch.Tensor, n: int, vocab: int) -> bool:
    for r in range(n):
        start = r * ROW_GAP
        for s, e in ((max(0, start - GUARD), start), (start + vocab, start + vocab + GUARD)):
            if not (buffer[s:e] == SENTINEL).all():
                return False
    return True


def check_row_kernel_past_int32(backend_name: str, device) -> None:
    """The backend's ``row_loss_grad`` on rows at element offsets 0, 2^30 + 64 and 2^31 + 128:
    every output and the in-place gradient against the float64 reference of the same rows."""
    backend = get_backend(backend_name)
    n, vocab = 3, 70001  # V above the interpreter's widest block: the column loop runs twice
    view, buffer = _rows_past_int32(n, vocab, device)
    z = torch.randn(n, vocab, dtype=torch.float64, device=device) * 2
    # (random target, the last logit of the row past 2^31); second call: that row ignored
    targets = [torch.tensor([int(torch.randint(0, vocab, ())), 17, vocab - 1], device=device),
               torch.tensor([vocab - 1, int(torch.randint(0, vocab, ())), -100], device=device)]
    objective = dk.DFT(min_weight=0.05)
    kw = dict(softcap=20.0, label_smoothing=0.1, z_loss=1e-3)
    params = make_loss_params(objective, with_stats=True, **kw)
    for target in targets:
        valid = target != -100
        z[valid, target[valid]] += 6.0  # probabilities far from 0, so the DFT weight matters
        view.copy_(z.to(torch.float16))
        z16 = view.clone()  # contiguous copy of the exact inputs, for the reference
        tw = torch.rand(n, device=device) + 0.5
        grad_scale = torch.rand(n, device=device) + 0.5
        out = backend.row_loss_grad(view, target, params, tw, grad_scale)
        assert _guards_intact(buffer, n, vocab), "the kernel wrote outside the rows"

        ref_in = z16.double().requires_grad_()
        ref, stats = dk.reference.cross_entropy(ref_in, target, objective=objective, reduction="none",
                                                token_weights=tw, return_stats=True, **kw)
        (ref_grad,) = torch.autograd.grad(ref, ref_in, grad_scale.double())
        eager_in = z16.clone().requires_grad_()  # eager PyTorch on the same float16 inputs
        eager = dk.reference.cross_entropy(eager_in, target, objective=objective, reduction="none",
                                           token_weights=tw, **kw)
        (eager_grad,) = torch.autograd.grad(eager, eager_in, grad_scale.to(torch.float16))

        assert rel_err(out.loss, ref) <= TOL[torch.float32]  # float32 math on exact float16 inputs
        logp = -out.nll[valid].double()
        ref_logp = torch.log_softmax(20.0 * torch.tanh(z16.double() / 20.0), -1)[valid, target[valid]]
        assert rel_err(logp, ref_logp) <= TOL[torch.float32]
        assert rel_err(out.prob[valid], ref_logp.exp()) <= TOL[torch.float32]
        assert (out.nll[~valid] == 0).all() and (out.loss[~valid] == 0).all()
        assert float(out.correct.sum()) == round(float(stats.accuracy * stats.num_tokens))
        got = view.detach().clone()
        bound = min(TOL[torch.float16], 3 * rel_err(eager_grad, ref_grad) + 1e-6)
        err = rel_err(got, ref_grad)
        assert err <= bound, f"{backend_name}: grad rel err {err:.3e} > {bound:.3e}"
        for r in range(n):  # row by row, so one wrong row cannot hide in the norm
            if valid[r]:
                assert rel_err(got[r], ref_grad[r]) <= TOL[torch.float16], f"row {r}"
            else:
                assert (got[r] == 0).all(), f"ignored row {r} must get a zero gradient"
    del view, buffer


def test_triton_row_offsets_past_int32():
    """Under the interpreter, pointer offsets are numpy integers of the kernel's own types: an
    int32 ``row * stride`` would wrap to a negative offset here (read or write out of bounds)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok, reason = get_backend("triton").is_available(torch.device(device))
    if not ok:
        pytest.skip(reason)
    check_row_kernel_past_int32("triton", device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_row_offsets_past_int32(backend):
    ok, reason = get_backend(backend).is_available(torch.device("cuda"))
    if not ok:
        pytest.skip(reason)
    check_row_kernel_past_int32(backend, "cuda")


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rows_too_long_for_int32_columns_are_rejected(backend):
    """Column offsets are int32 inside both kernels: a row that could wrap them is refused (the
    ~4 GiB row is address space only; the check comes before anything reads it)."""
    device = "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"
    ok, reason = get_backend(backend).is_available(torch.device(device))
    if not ok:
        pytest.skip(reason)
    limit = 2**31 - 1 - (2**16 if backend == "triton" else 4096)
    try:
        logits = torch.empty(1, limit + 1, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve 4 GiB of address space on {device}: {exc}")
    error = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(error, match=f"at most {limit}"):
        get_backend(backend).row_loss_grad(logits, torch.zeros(1, dtype=torch.int64, device=device),
                                           make_loss_params("dft"))


# ------------------------------------------------------------------ public API at N V > 2^31


def _big_logits(n: int, vocab: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 ``[n, vocab]`` logits of std 2, filled block by block; targets with a quarter
    ignored, a bump of U(0, 12) on half of the target logits (so p spans (0, 1)), and the
    last two rows' targets at the last column (the row that crosses 2^31 and the one past it)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n, vocab, dtype=torch.bfloat16, device=device)
    for s in range(0, n, 1024):
        logits[s:s + 1024].normal_(0.0, 2.0, generator=g)
    target = torch.randint(0, vocab, (n,), generator=g, device=device)
    target[torch.rand(n, generator=g, device=device) < 0.25] = -100
    target[-2:] = vocab - 1
    rows = torch.nonzero((target != -100) & (torch.rand(n, generator=g, device=device) < 0.5)).squeeze(1)
    bump = torch.rand(rows.numel(), generator=g, device=device) * 12
    logits[rows, target[rows]] = (logits[rows, target[rows]].float() + bump).to(torch.bfloat16)
    return logits, target


class _ChunkedReference:
    """float64 reference of ``dk.cross_entropy(reduction="none")`` over row blocks: the
    per-token losses, stats sums, and (given ours) per-row and global gradient errors."""

    def __init__(self, rows: int = 128):
        self.rows = rows

    def run(self, logits, target, grad_out, ours_grad, objective, eager_rows):
        n = logits.shape[0]
        loss = torch.empty(n, dtype=torch.float64, device=logits.device)
        sums = dict(nll=0.0, prob=0.0, correct=0.0, count=0.0)
        diff2 = ref2 = worst_row = 0.0
        eager_err = []
        for s in range(0, n, self.rows):
            e = min(s + self.rows, n)
            z = logits[s:e].double().requires_grad_(ours_grad is not None)
            ref, st = dk.reference.cross_entropy(z, target[s:e], objective=objective, reduction="none",
                                                 return_stats=True)
            loss[s:e] = ref.detach()
            k = float(st.num_tokens)
            sums["count"] += k
            sums["nll"] += float(st.nll.double()) * k
            sums["prob"] += float(st.mean_prob.double()) * k
            sums["correct"] += round(float(st.accuracy.double()) * k)
            if ours_grad is None:
                continue
            (rg,) = torch.autograd.grad(ref, z, grad_out[s:e].double())
            got = ours_grad[s:e].double()
            diff2 += float((got - rg).square().sum())
            ref2 += float(rg.square().sum())
            row_norm = rg.norm(dim=1)
            row_err = (got - rg).norm(dim=1) / row_norm.clamp_min(1e-300)
            zero_rows = row_norm == 0
            assert (got[zero_rows] == 0).all(), f"rows {s}..{e}: ignored rows must get zero gradients"
            worst_row = max(worst_row, float(row_err[~zero_rows].max()) if (~zero_rows).any() else 0.0)
            if s in eager_rows:  # eager PyTorch in bfloat16 on the same rows, for the 16-bit bound
                ze = logits[s:e].clone().requires_grad_()
                eg = dk.reference.cross_entropy(ze, target[s:e], objective=objective, reduction="none")
                (eg,) = torch.autograd.grad(eg, ze, grad_out[s:e].to(torch.bfloat16))
                eager_err.append((rel_err(eg, rg), rel_err(got, rg)))
        grad_err = (diff2 / ref2) ** 0.5 if ours_grad is not None else None
        return loss, sums, grad_err, worst_row, eager_err


def _check_cross_entropy_at_scale(backend: str, device, chunk_none: int | None) -> None:
    n, vocab = CE_N, CE_V
    assert n * vocab > 2**31 and (n - 1) * vocab > INT32_MAX  # the last row starts past int32
    objective = "dft"
    t0 = time.perf_counter()
    logits, target = _big_logits(n, vocab, device, seed=int(torch.randint(0, 2**31 - 1, ())))
    print(f"\ncross_entropy N {n} V {vocab} (N*V = {n * vocab} = 2^31 + {n * vocab - 2**31}), bf16 logits "
          f"{logits.numel() * 2 / 1e9:.2f} GB, backend {backend}; made in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    with torch.no_grad():
        mean, stats = dk.cross_entropy(logits, target, objective=objective, backend=backend, return_stats=True)
    print(f"  mean + stats (default chunk size): {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    leaf = logits.requires_grad_()
    per_token = dk.cross_entropy(leaf, target, objective=objective, backend=backend, reduction="none",
                                 chunk_size=chunk_none)
    grad_out = torch.rand(n, device=device) + 0.5
    per_token.backward(grad_out)
    ours_grad = leaf.grad
    logits = leaf.detach()
    del leaf
    print(f"  none + backward (chunk_size {chunk_none}): {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    eager_rows = {0, (n // 2) // 128 * 128, (n - 1) // 128 * 128}
    ref, sums, grad_err, worst_row, eager = _ChunkedReference().run(logits, target, grad_out, ours_grad,
                                                                    objective, eager_rows)
    print(f"  float64 reference over every row: {time.perf_counter() - t0:.1f} s")
    count = sums["count"]
    errs = {
        "mean": abs(float(mean) - float(ref.sum()) / count) / abs(float(ref.sum()) / count),
        "per-token (none)": rel_err(per_token, ref),
        "sum of per-token": abs(float(per_token.detach().double().sum()) - float(ref.sum())) / abs(float(ref.sum())),
        "rows past 2^31": rel_err(per_token[-2:], ref[-2:]),
        "stats.nll": abs(float(stats.nll) - sums["nll"] / count) / (sums["nll"] / count),
        "stats.mean_prob": abs(float(stats.mean_prob) - sums["prob"] / count) / (sums["prob"] / count),
        "stats.accuracy": abs(float(stats.accuracy) - sums["correct"] / count),
    }
    for name, e in errs.items():
        print(f"  {name:18s} rel err {e:.2e}")
    print(f"  logits grad: rel err {grad_err:.2e} (all {n * vocab} entries), worst row {worst_row:.2e}; "
          f"eager bf16 vs ours on 3 row blocks: {', '.join(f'{a:.2e}/{b:.2e}' for a, b in eager)}")
    print(f"  stats.num_tokens {int(stats.num_tokens)}; peak RSS of this process so far {_peak_rss_gb():.2f} GiB")
    assert float(stats.num_tokens) == count
    for name, e in errs.items():
        assert e <= TOL[torch.float32], f"{name}: rel err {e:.3e}"  # float32 math on exact bf16 inputs
    assert grad_err <= TOL[torch.bfloat16] and worst_row <= TOL[torch.bfloat16]
    for eager_err, ours_err in eager:
        assert ours_err <= 3 * eager_err + 1e-6


@pytest.mark.slow
def test_cross_entropy_past_int32_torch_backend():
    """Peak memory: the logits and their gradient (4.3 GB each) plus one 2048-row chunk."""
    _check_cross_entropy_at_scale("torch", "cpu", chunk_none=2048)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cross_entropy_past_int32_one_launch_gpu(backend):
    """chunk_size = N: one kernel launch over all 2^31 + 98305 logits."""
    ok, reason = get_backend(backend).is_available(torch.device("cuda"))
    if not ok:
        pytest.skip(reason)
    _check_cross_entropy_at_scale(backend, "cuda", chunk_none=CE_N)


@pytest.mark.slow
def test_linear_cross_entropy_past_int32_torch_backend():
    """N V = 2.4e9 through the chunk loop (default chunk size), loss, stats and every gradient
    against the float64 reference accumulated over blocks of 512 rows."""
    n, vocab, hidden = LCE_N, LCE_V, LCE_H
    assert n * vocab > 2**31
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (3.0 / hidden ** 0.5)
    b = torch.randn(vocab, generator=g) * 0.5
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.25] = -100
    t[-1] = vocab - 1  # the very last logit, at flat index N V - 1
    objective = "dft"
    print(f"\nlinear_cross_entropy N {n} V {vocab} H {hidden} (N*V = {n * vocab}), fp32, torch backend")

    t0 = time.perf_counter()
    xs, ws, bs = (a.clone().requires_grad_() for a in (x, w, b))
    loss, stats = dk.linear_cross_entropy(xs, ws, t, bias=bs, objective=objective, backend="torch",
                                          return_stats=True)
    grad_out = float(torch.rand(()) + 0.5)
    loss.backward(torch.tensor(grad_out))
    print(f"  ours fwd+bwd (default chunk size): {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    count = float((t != -100).sum())
    ref_sum, nll_sum = 0.0, 0.0
    dx_ref = torch.empty(n, hidden, dtype=torch.float64)
    for s in range(0, n, 512):
        e = min(s + 512, n)
        xr = x[s:e].double().requires_grad_()
        r, st = dk.reference.linear_cross_entropy(xr, wr, t[s:e], bias=br, objective=objective,
                                                  reduction="sum", return_stats=True)
        (r * (grad_out / count)).backward()  # wr.grad, br.grad accumulate in float64
        dx_ref[s:e] = xr.grad
        ref_sum += float(r.detach())
        nll_sum += float(st.nll.double()) * float(st.num_tokens)
    print(f"  float64 reference over every row: {time.perf_counter() - t0:.1f} s")
    past = (2**31 + vocab - 1) // vocab  # first row whose logits start past int32
    errs = {
        "loss (mean)": abs(float(loss) - ref_sum / count) / abs(ref_sum / count),
        "stats.nll": abs(float(stats.nll) - nll_sum / count) / (nll_sum / count),
        "d input": rel_err(xs.grad, dx_ref),
        f"d input, rows {past}..{n - 1}": rel_err(xs.grad[past:], dx_ref[past:]),
        "d weight": rel_err(ws.grad, wr.grad),
        "d bias": rel_err(bs.grad, br.grad),
    }
    for name, e in errs.items():
        print(f"  {name:24s} rel err {e:.2e}")
    print(f"  stats.num_tokens {int(stats.num_tokens)}; peak RSS of this process so far {_peak_rss_gb():.2f} GiB")
    assert float(stats.num_tokens) == count
    assert (xs.grad[t == -100] == 0).all()
    for name, e in errs.items():
        assert e <= TOL[torch.float32], f"{name}: rel err {e:.3e}"
