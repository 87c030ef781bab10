"""Rank side of tests/vocab_parallel/test_logprobs_parallel.py: every rank builds the same whole problem,
keeps its (uneven) slice of the head (or of the logits), runs dk.linear_logprobs (dk.logprobs) with the
process group or as DTensors, and returns its relative errors against the float64 reference on the whole
head (outputs, the statistics, dX, its dW and db slices; its dlogits slice)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import dft_kernels as dk

CASES = {
    # name: (dtype, options, per-token temperature tensor?); "logits-" cases run dk.logprobs on the rank's
    # slice of the logits, "dtensor-" cases pass DTensors (no process_group argument)
    "fp64-plain": (torch.float64, {}, False),
    "fp64-temp-softcap-bias-shift": (torch.float64, {"temperature": 0.7, "softcap": 3.0, "shift": True}, False),
    "fp64-per-token-temperature": (torch.float64, {"shift": True}, True),
    "fp32-temp": (torch.float32, {"temperature": 0.7, "chunk_size": 5}, False),
    "fp32-peaked": (torch.float32, {"temperature": 0.05}, False),
    "fp64-stats": (torch.float64, {"temperature": 0.7, "return_stats": True, "chunk_size": 4}, False),
    "fp32-stats-softcap-shift": (torch.float32, {"softcap": 3.0, "shift": True, "return_stats": True}, False),
    "logits-fp64-temp-softcap-stats": (torch.float64, {"temperature": 0.7, "softcap": 3.0, "return_stats": True,
                                                       "chunk_size": 5}, False),
    "logits-fp64-per-token-temperature-shift": (torch.float64, {"shift": True}, True),
    "logits-fp32-peaked": (torch.float32, {"temperature": 0.05}, False),
    "logits-bf16": (torch.bfloat16, {"temperature": 0.7}, False),
    "dtensor-fp64-head-stats": (torch.float64, {"temperature": 0.7, "return_stats": True}, False),
    "dtensor-logits-fp64": (torch.float64, {"shift": True}, True),
}


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm().detach() / b.norm().detach().clamp_min(1e-300))


def run_cases(rank: int, world: int, names):
    out = {}
    for name in names:
        dtype, opts, per_token = CASES[name]
        g = torch.Generator().manual_seed(7)
        b, t, h, v = 3, 11, 16, 37
        x = torch.randn(b, t, h, generator=g, dtype=torch.float64)
        w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.8
        bias = torch.randn(v, generator=g, dtype=torch.float64) if "softcap" in opts else None
        target = torch.randint(0, v, (b, t), generator=g)
        target[0, :4] = -100
        target[2, 5] = -100
        kwargs = dict(opts)
        if per_token:
            kwargs["temperature"] = 0.3 + torch.rand(b, t, generator=g, dtype=torch.float64)
        up = [torch.randn(b, t - 1 if opts.get("shift") else t, generator=g, dtype=torch.float64) for _ in range(2)]
        sizes = [19, 18] if world == 2 else [v // world + (i < v % world) for i in range(world)]
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])

        stats = None
        if name.startswith("logits-") or name.startswith("dtensor-logits"):
            out[name] = _logits_case(name, rank, world, x, w, bias, target, kwargs, up, dtype, sizes, sl)
            continue
        xs = x.detach().clone().to(dtype).requires_grad_()
        ws = w[sl].detach().clone().to(dtype).contiguous().requires_grad_()
        bs = None if bias is None else bias[sl].detach().clone().to(dtype).contiguous().requires_grad_()
        if per_token:
            kwargs["temperature"] = kwargs["temperature"].to(dtype)
        if name.startswith("dtensor-"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            wd = distribute_tensor(w.to(dtype), mesh, [Shard(0)]).requires_grad_()
            xd = DTensor.from_local(xs, mesh, [Replicate()])
            outs = dk.linear_logprobs(xd, wd, target, return_entropy=True, **kwargs)
            assert wd.to_local().shape == ws.shape  # Shard(0) slices 37 rows as 19 + 18, as the group cases do
        else:
            outs = dk.linear_logprobs(xs, ws, target, bias=bs, return_entropy=True, process_group=dist.group.WORLD,
                                      **kwargs)
        logp, ent = outs[:2]
        if kwargs.get("return_stats"):
            stats = outs[2]
        ((logp * up[0].to(logp.dtype)).sum() + (ent * up[1].to(ent.dtype)).sum()).backward()

        # the reference on the same values: the inputs rounded to dtype, then float64
        xr, wr = x.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
        br = None if bias is None else bias.to(dtype).double().requires_grad_()
        ref_kwargs = dict(kwargs)
        ref_kwargs.pop("chunk_size", None)
        if per_token:
            ref_kwargs["temperature"] = kwargs["temperature"].double()
        rl, re, *ref_stats = dk.reference.linear_logprobs(xr, wr, target, bias=br, return_entropy=True, **ref_kwargs)
        ((rl * up[0]).sum() + (re * up[1]).sum()).backward()
        if name.startswith("dtensor-"):
            grad_w = wd.grad
            assert isinstance(grad_w, DTensor) and grad_w.placements == (Shard(0),), grad_w
            errs = {"dtype": str(logp.dtype), "logp": _rel(logp, rl), "entropy": _rel(ent, re),
                    "dx": _rel(xs.grad, xr.grad), "dw": _rel(grad_w.to_local(), wr.grad[sl])}
        else:
            errs = {"dtype": str(logp.dtype), "logp": _rel(logp, rl), "entropy": _rel(ent, re),
                    "dx": _rel(xs.grad, xr.grad), "dw": _rel(ws.grad, wr.grad[sl])}
        if bs is not None:
            errs["db"] = _rel(bs.grad, br.grad[sl])
        if stats is not None:
            errs.update(_stats_errors(stats, ref_stats[0]))
        out[name] = errs
    out["verl"] = _verl_case(rank, world)
    out["ties"] = _ties_case(rank, world)
    return out


def _stats_errors(stats, ref) -> dict:
    """sum_sq_probs as a relative error; is_top1 as the count of tokens where it differs (must be 0)."""
    return {"sum_sq_probs": _rel(stats.sum_sq_probs, ref.sum_sq_probs),
            "is_top1_mismatches": float((stats.is_top1 != ref.is_top1).sum()),
            "is_top1_dtype_bool": float(stats.is_top1.dtype != torch.bool)}


def _logits_case(name, rank, world, x, w, bias, target, kwargs, up, dtype, sizes, sl):
    """dk.logprobs on this rank's slice of the logits ``x @ w.T`` (or that slice as a DTensor sharded over
    the vocabulary): outputs, statistics and this rank's slice of dlogits against the whole-row reference."""
    z = (x @ w.t()).detach()
    zs = z[..., sl].to(dtype).contiguous().requires_grad_()
    kwargs = dict(kwargs)
    if "temperature" in kwargs and isinstance(kwargs["temperature"], torch.Tensor):
        kwargs["temperature"] = kwargs["temperature"].to(torch.promote_types(dtype, torch.float32))
    if name.startswith("dtensor-"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        zd = distribute_tensor(z.to(dtype), mesh, [Shard(2)]).requires_grad_()
        outs = dk.logprobs(zd, target, return_entropy=True, **kwargs)
    else:
        outs = dk.logprobs(zs, target, return_entropy=True, process_group=dist.group.WORLD, **kwargs)
    logp, ent = outs[:2]
    ((logp * up[0].to(logp.dtype)).sum() + (ent * up[1].to(ent.dtype)).sum()).backward()
    if name.startswith("dtensor-"):
        assert isinstance(zd.grad, DTensor) and zd.grad.placements == (Shard(2),), zd.grad
        grad = zd.grad.to_local()
    else:
        grad = zs.grad
    zr = z.to(dtype).double().requires_grad_()
    ref_kwargs = dict(kwargs)
    ref_kwargs.pop("chunk_size", None)
    if isinstance(ref_kwargs.get("temperature"), torch.Tensor):
        ref_kwargs["temperature"] = ref_kwargs["temperature"].double()
    rl, re, *ref_stats = dk.reference.logprobs(zr, target, return_entropy=True, **ref_kwargs)
    ((rl * up[0]).sum() + (re * up[1]).sum()).backward()
    errs = {"dtype": str(dtype), "logp": _rel(logp, rl), "entropy": _rel(ent, re),
            "dlogits": _rel(grad, zr.grad[..., sl])}
    if kwargs.get("return_stats"):
        errs.update(_stats_errors(outs[2], ref_stats[0]))
    return errs


def _ties_case(rank: int, world: int):
    """is_top1 with the maximal logit tied across the two slices: the target is the argmax only at the
    first maximal (global) index, as torch.argmax decides on one process."""
    v = 37
    z = torch.zeros(4, v, dtype=torch.float64)
    z[:, 3] = 5.0   # on rank 0 (0..18)
    z[:, 30] = 5.0  # on rank 1 (19..36)
    target = torch.tensor([3, 30, 7, -100])
    sl = slice(0, 19) if rank == 0 else slice(19, 37)
    _, stats = dk.logprobs(z[:, sl].contiguous(), target, return_stats=True, process_group=dist.group.WORLD)
    _, ref = dk.reference.logprobs(z, target, return_stats=True)
    return {"ours": stats.is_top1.tolist(), "reference": ref.is_top1.tolist()}


def _verl_case(rank: int, world: int):
    """The verl drop-in with verl's tensor-parallel group: this rank's slice of the head, global labels."""
    from dft_kernels.integrations.verl import linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(37, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 37, (2, 9), generator=g)
    up = [torch.randn(18, generator=g, dtype=torch.float64) for _ in range(2)]
    sl = slice(0, 19) if rank == 0 else slice(19, 37)
    h = hidden.clone().requires_grad_()
    w = weight[sl].clone().requires_grad_()
    logp, ent = linear_cross_entropy(h, w, labels, 0.7, "none", dist.group.WORLD)
    ((logp * up[0]).sum() + (ent * up[1]).sum()).backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rl, re = dk.reference.linear_logprobs(hr, wr, labels, temperature=0.7, return_entropy=True)
    ((rl.reshape(-1) * up[0]).sum() + (re.reshape(-1) * up[1]).sum()).backward()
    return {"dtype": "torch.float64", "shape": int(logp.shape == (18,) and ent.shape == (18,)) * 1.0,
            "logp": _rel(logp, rl.reshape(-1)), "entropy": _rel(ent, re.reshape(-1)), "dx": _rel(h.grad, hr.grad),
            "dw": _rel(w.grad, wr.grad[sl])}
