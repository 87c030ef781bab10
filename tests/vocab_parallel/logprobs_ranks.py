"""Rank side of tests/vocab_parallel/test_logprobs_parallel.py: every rank builds the same whole problem,
keeps its (uneven) slice of the head, runs dk.linear_logprobs with the process group, and returns its
relative errors against the float64 reference on the whole head (outputs, dX, its dW and db slices)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import dft_kernels as dk

CASES = {
    # name: (dtype, options, per-token temperature tensor?)
    "fp64-plain": (torch.float64, {}, False),
    "fp64-temp-softcap-bias-shift": (torch.float64, {"temperature": 0.7, "softcap": 3.0, "shift": True}, False),
    "fp64-per-token-temperature": (torch.float64, {"shift": True}, True),
    "fp32-temp": (torch.float32, {"temperature": 0.7, "chunk_size": 5}, False),
    "fp32-peaked": (torch.float32, {"temperature": 0.05}, False),
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

        xs = x.detach().clone().to(dtype).requires_grad_()
        ws = w[sl].detach().clone().to(dtype).contiguous().requires_grad_()
        bs = None if bias is None else bias[sl].detach().clone().to(dtype).contiguous().requires_grad_()
        if per_token:
            kwargs["temperature"] = kwargs["temperature"].to(dtype)
        logp, ent = dk.linear_logprobs(xs, ws, target, bias=bs, return_entropy=True, process_group=dist.group.WORLD,
                                       **kwargs)
        ((logp * up[0].to(logp.dtype)).sum() + (ent * up[1].to(ent.dtype)).sum()).backward()

        # the reference on the same values: the inputs rounded to dtype, then float64
        xr, wr = x.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
        br = None if bias is None else bias.to(dtype).double().requires_grad_()
        ref_kwargs = dict(kwargs)
        ref_kwargs.pop("chunk_size", None)
        if per_token:
            ref_kwargs["temperature"] = kwargs["temperature"].double()
        rl, re = dk.reference.linear_logprobs(xr, wr, target, bias=br, return_entropy=True, **ref_kwargs)
        ((rl * up[0]).sum() + (re * up[1]).sum()).backward()
        errs = {"dtype": str(logp.dtype), "logp": _rel(logp, rl), "entropy": _rel(ent, re),
                "dx": _rel(xs.grad, xr.grad), "dw": _rel(ws.grad, wr.grad[sl])}
        if bs is not None:
            errs["db"] = _rel(bs.grad, br.grad[sl])
        out[name] = errs
    out["verl"] = _verl_case(rank, world)
    try:
        dk.logprobs(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), process_group=dist.group.WORLD)
        out["logits_refused"] = ""
    except NotImplementedError as exc:
        out["logits_refused"] = str(exc)
    return out


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
