"""Rank side of tests/vocab_parallel/test_pair_parallel.py: every rank builds the same whole problem (a
trained head and a frozen second head of V = 37 over hidden sizes 16 and 12), keeps its (uneven) slice of
both heads, runs the anchored dk.linear_cross_entropy (ASFT) or dk.linear_distill with the process group
(or as DTensors), and returns its relative errors against the float64 reference on the whole heads: the
loss, dX, its dW and db slices, and that the frozen head is untouched and gets no gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist

import dft_kernels as dk

ANCHOR_CASES = {
    # name: (dtype, options); every case has a bias on both heads when "bias" is in its name
    "anchor-fp64-dft-forward-bias": (torch.float64, dict(objective="dft", kl_coef=0.1, kl="forward",
                                                         chunk_size=5)),
    "anchor-fp64-dft-reverse-softcap-shift-weights": (torch.float64, dict(objective="dft", kl_coef=0.3, kl="reverse",
                                                                          softcap=3.0, shift=True, token_weights=True)),
    "anchor-fp64-eaft-forward-num-items": (torch.float64, dict(objective=dk.EAFT(), kl_coef=0.2, kl="forward",
                                                               num_items_in_batch=40)),
    "anchor-fp64-ce-reverse-none-stats": (torch.float64, dict(objective="ce", kl_coef=0.5, kl="reverse",
                                                              reduction="none", return_stats=True, chunk_size=4)),
    "anchor-fp64-chord-forward-sum-smoothing-zloss": (torch.float64, dict(objective="chord", kl_coef=0.1,
                                                                          reduction="sum", label_smoothing=0.1,
                                                                          z_loss=1e-3)),
    "anchor-fp32-dft-forward-bias": (torch.float32, dict(objective="dft", kl_coef=0.1, chunk_size=6)),
    "anchor-fp32-dft-reverse-none-triton": (torch.float32, dict(objective="dft", kl_coef=0.1, kl="reverse",
                                                                reduction="none", backend="triton")),
    "anchor-dtensor-fp64-dft-forward": (torch.float64, dict(objective="dft", kl_coef=0.1)),
}

DISTILL_CASES = {
    "distill-fp64-beta0": (torch.float64, dict(beta=0.0, chunk_size=5)),
    "distill-fp64-beta1-temp2-bias": (torch.float64, dict(beta=1.0, temperature=2.0)),
    "distill-fp64-beta05-shift-none": (torch.float64, dict(beta=0.5, shift=True, reduction="none")),
    "distill-fp64-beta03-temp2-sum": (torch.float64, dict(beta=0.3, temperature=2.0, reduction="sum",
                                                          chunk_size=4)),
    "distill-fp64-beta05-num-items": (torch.float64, dict(beta=0.5, num_items_in_batch=50)),
    "distill-fp32-beta05-temp2": (torch.float32, dict(beta=0.5, temperature=2.0, chunk_size=7)),
    "distill-dtensor-fp64-beta05": (torch.float64, dict(beta=0.5)),
}

CASES = {**ANCHOR_CASES, **DISTILL_CASES}
V, H, H_REF = 37, 16, 12


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm().detach() / b.norm().detach().clamp_min(1e-300))


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 11
    x = torch.randn(b, t, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    x2 = torch.randn(b, t, H_REF, generator=g, dtype=torch.float64)
    # the frozen head: near the trained one's distribution (as a reference model is) but not equal to it
    w2 = torch.randn(V, H_REF, generator=g, dtype=torch.float64) * 0.8
    bias2 = torch.randn(V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (b, t), generator=g)
    target[0, :4] = -100
    target[2, 5] = -100
    weights = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(b, t, generator=g, dtype=torch.float64)
    return x, w, bias, x2, w2, bias2, target, weights, up


def run_cases(rank: int, world: int, names):
    out = {}
    sizes = [19, 18] if world == 2 else [V // world + (i < V % world) for i in range(world)]
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    for name in names:
        dtype, opts = CASES[name]
        out[name] = _run_case(name, dtype, dict(opts), rank, world, sl)
    out["errors"] = _error_cases(rank, world, sl)
    out["memory"] = _memory_cases(rank, world)
    return out


def _memory_cases(rank, world):
    """Per call, ``largest tensor / (N x V_local)`` and ``largest / (chunk x V_local)`` over every tensor made
    in forward and backward (tests/vocab_parallel/vocab_parallel_ranks.py's recorder): one chunk of either
    head's logits, never all of a head's (N = 64 tokens in chunks of 8)."""
    from vocab_parallel_ranks import LocalTensorRecorder

    g = torch.Generator().manual_seed(9)
    # a wider head than the other cases' (V = 101, hidden sizes 4 and 3): every [N, H] tensor stays far
    # below one chunk of logits, so the largest tensor is a chunk-sized one, and only a [tokens, vocab] one
    # could reach N x V_local
    n, chunk, vocab, h, h_ref = 64, 8, 101, 4, 3
    x, x2 = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(n, h_ref, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, h, generator=g, dtype=torch.float64)
    w2 = torch.randn(vocab, h_ref, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (n,), generator=g)
    sizes = [vocab // world + (i < vocab % world) for i in range(world)]
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    local = sizes[rank]
    out = {}
    for kind in ("anchor-mean", "anchor-none", "distill-mean", "distill-none"):
        xs, ws = x.clone().requires_grad_(), w[sl].clone().requires_grad_()
        reduction = kind.split("-")[1]
        with LocalTensorRecorder() as rec:
            if kind.startswith("anchor"):
                loss = dk.linear_cross_entropy(xs, ws, target, ref_input=x2, ref_weight=w2[sl].clone(), kl_coef=0.1,
                                               reduction=reduction, chunk_size=chunk, process_group=dist.group.WORLD)
            else:
                loss = dk.linear_distill(xs, ws, x2, w2[sl].clone(), target, reduction=reduction, chunk_size=chunk,
                                         process_group=dist.group.WORLD)
            loss.sum().backward()
        out[kind] = (rec.largest / (n * local), rec.largest / (chunk * local))
    return out


def _run_case(name, dtype, opts, rank, world, sl):
    x, w, bias, x2, w2, bias2, target, weights, up = _problem(11)
    with_bias = "bias" in name
    anchor = name.startswith("anchor")
    if opts.pop("token_weights", False):
        opts["token_weights"] = weights.to(dtype)
    n_items = opts.pop("num_items_in_batch", None)
    if n_items is not None:
        opts["num_items_in_batch"] = n_items

    xs = x.to(dtype, copy=True).requires_grad_()
    x2s = x2.to(dtype, copy=True)
    w2_local = w2[sl].to(dtype, copy=True)
    b2_local = bias2[sl].to(dtype, copy=True) if with_bias else None
    w2_before = w2_local.clone()
    if name.split("-")[1] == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        wd = distribute_tensor(w.to(dtype), mesh, [Shard(0)]).requires_grad_()
        w2d = distribute_tensor(w2.to(dtype), mesh, [Shard(0)])
        xd = DTensor.from_local(xs, mesh, [Replicate()])
        if anchor:
            loss = dk.linear_cross_entropy(xd, wd, target, ref_input=x2s, ref_weight=w2d, **opts)
        else:
            loss = dk.linear_distill(xd, wd, x2s, w2d, target, **opts)
        ws, bs = wd, None
    else:
        ws = w[sl].to(dtype, copy=True).requires_grad_()
        bs = bias[sl].to(dtype, copy=True).requires_grad_() if with_bias else None
        group = dist.group.WORLD
        if anchor:
            loss = dk.linear_cross_entropy(xs, ws, target, bias=bs, ref_input=x2s, ref_weight=w2_local,
                                           ref_bias=b2_local, process_group=group, **opts)
        else:
            loss = dk.linear_distill(xs, ws, x2s, w2_local, target, bias=bs, teacher_bias=b2_local,
                                     process_group=group, **opts)
    stats = None
    if isinstance(loss, tuple):
        loss, stats = loss
    grad_up = up[..., :loss.shape[-1]].to(loss.dtype) if loss.dim() else torch.ones((), dtype=loss.dtype)
    (loss * grad_up).sum().backward()

    # the reference on the whole heads, on the same rounded values
    xr, wr = (t.to(dtype).to(torch.float64, copy=True).requires_grad_() for t in (x, w))
    br = bias.to(dtype).to(torch.float64, copy=True).requires_grad_() if with_bias else None
    x2r, w2r = (t.to(dtype).to(torch.float64, copy=True) for t in (x2, w2))
    b2r = bias2.to(dtype).to(torch.float64, copy=True) if with_bias else None
    ref_opts = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()
                if k not in ("chunk_size", "backend")}
    if anchor:
        ref = dk.reference.linear_cross_entropy(xr, wr, target, bias=br, ref_input=x2r, ref_weight=w2r, ref_bias=b2r,
                                                **ref_opts)
    else:
        ref = dk.reference.linear_distill(xr, wr, x2r, w2r, target, bias=br, teacher_bias=b2r, **ref_opts)
    ref_stats = None
    if isinstance(ref, tuple):
        ref, ref_stats = ref
    (ref * up[..., :ref.shape[-1]] if ref.dim() else ref).sum().backward()

    if is_dtensor(ws):
        assert ws.grad.placements == ws.placements, ws.grad
        grad_w = ws.grad.to_local()
    else:
        grad_w = ws.grad
    errs = {"dtype": str(dtype), "loss": _rel(loss, ref), "dx": _rel(xs.grad, xr.grad), "dw": _rel(grad_w, wr.grad[sl]),
            "frozen_head_changed": float(not torch.equal(w2_local, w2_before)),
            "loss_dtype_ok": float(loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32))}
    if bs is not None:
        errs["db"] = _rel(bs.grad, br.grad[sl])
    if stats is not None:
        errs["stats_nll"] = _rel(stats.nll, ref_stats.nll)
        errs["stats_entropy_missing"] = float(ref_stats.entropy is not None and stats.entropy is None)
    return errs


def is_dtensor(t) -> bool:
    from dft_kernels.options import is_dtensor as check

    return check(t)


def _error_cases(rank, world, sl):
    """Calls that must raise the same ValueError on every rank (no rank left waiting in a collective)."""
    x, w, bias, x2, w2, bias2, target, _, _ = _problem(5)
    group = dist.group.WORLD
    messages = {}
    # the second head's slice is not the first's: rank 0 holds one row less of it
    w2_bad = w2[sl] if rank else w2[sl][:-1]
    for kind in ("anchor", "distill"):
        try:
            if kind == "anchor":
                dk.linear_cross_entropy(x, w[sl], target, ref_input=x2, ref_weight=w2_bad, kl_coef=0.1,
                                        process_group=group)
            else:
                dk.linear_distill(x, w[sl], x2, w2_bad, target, process_group=group)
            messages[kind] = "no error"
        except ValueError as exc:
            messages[kind] = str(exc)
    return messages
