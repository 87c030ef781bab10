"""What every rank of test_vocab_parallel.py runs: the vocab-parallel loss on this rank's slice of a
random head against the single-process float64 reference on the whole head.

Every rank builds the same inputs from the case's seed, keeps its slice of the vocabulary, and reports,
per case, ``{metric: [value, tolerance]}``: the relative errors of the loss, the stats, dX and this
rank's dW/db slices, and that the loss is bit-identical on every rank.  ``cases(world)`` is the list the
test module parametrises over (names only cross the process boundary).
"""

from __future__ import annotations

import itertools
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import dft_kernels as dk
from dft_kernels.options import LossParams
from helpers import OBJECTIVES, TOL, leaf, make_inputs, obj_id, rel_err

H = 16
VOCAB = {2: 257, 3: 1001}  # 1001 over 3 ranks: 334/334/333; the "skewed" split is ~1:2(:3)
REDUCTIONS = ("mean", "sum", "none")
STATS = ("num_tokens", "nll", "mean_prob", "accuracy", "entropy")
FIRST_ERROR = "first case that raised"  # a results key: the cases after it were not run


@dataclass(frozen=True)
class Case:
    name: str
    kind: str = "linear"  # linear logits ties dtensor dtensor_logits hf memory collectives autocast error
    objective: Any = "dft"
    reduction: str = "mean"
    bias: bool = True
    ignore: str = "some"
    stats: bool = True
    options: dict = field(default_factory=dict)
    token_weights: bool = False
    num_items_tensor: bool = False
    split: str = "even"
    dtype: torch.dtype = torch.float32
    backend: str = "torch"
    chunk_size: Optional[int] = 8
    allreduce_dgrad: bool = True
    n: int = 24
    lead: Optional[tuple] = None
    seed: int = 0


def _grid(world: int) -> list[Case]:
    """Every objective with every reduction; bias, ignored rows, stats, softcap, smoothing, z-loss, token
    weights, num_items_in_batch, shift and the split rotate over the grid so each is on and off."""
    cases = []
    # EAFT(top_k) has no vocab-parallel path (a ValueError, tests/test_eaft.py)
    objectives = [obj for obj in OBJECTIVES if dk.get_objective(obj).entropy_top_k is None]
    for i, (obj, red) in enumerate(itertools.product(objectives, REDUCTIONS)):
        nll_like = dk.get_objective(obj).is_weighted_nll
        opts = {}
        if i % 4 == 1:
            opts["softcap"] = 3.0
        if nll_like and i % 3 == 0:
            opts["label_smoothing"] = 0.1
        if nll_like and i % 3 == 1:
            opts["z_loss"] = 1e-3
        if red != "none" and i % 5 == 3:
            opts["num_items_in_batch"] = 23
        lead = None
        if i % 7 == 3:
            opts["shift"] = True
            lead = (3, 8)
        cases.append(Case(name=f"grid-{obj_id(obj)}-{red}", objective=obj, reduction=red, bias=i % 2 == 0,
                          ignore=("some", "some", "none")[i % 3], stats=i % 3 != 2, options=opts,
                          token_weights=i % 5 == 2, split=("even", "skewed")[i % 2], lead=lead, seed=1000 + i))
    return cases


def _options(world: int) -> list[Case]:
    """Each option on its own, with dft and entropy (global entropy) and a per-token and a reduced loss."""
    named = {
        "softcap": dict(options=dict(softcap=3.0)),
        "z_loss": dict(options=dict(z_loss=1e-2)),
        "label_smoothing": dict(options=dict(label_smoothing=0.2)),
        "smooth+zloss+softcap": dict(options=dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0)),
        "token_weights": dict(token_weights=True),
        "shift": dict(options=dict(shift=True), lead=(4, 6)),
        "num_items": dict(options=dict(num_items_in_batch=19)),
        "num_items_tensor": dict(num_items_tensor=True),
        "ignore_all": dict(ignore="all"),
        "ignore_none": dict(ignore="none"),
        "no_bias": dict(bias=False),
        "no_stats": dict(stats=False),
        "default_chunk": dict(chunk_size=None),
        "one_row_chunks": dict(chunk_size=1, n=5),
        "partial_dgrad": dict(allreduce_dgrad=False),
    }
    cases = []
    for j, ((opt, kw), obj, red) in enumerate(itertools.product(named.items(), ("dft", "entropy"), ("mean", "none"))):
        if opt.startswith("num_items") and red == "none":
            continue
        cases.append(Case(name=f"option-{opt}-{obj}-{red}", objective=obj, reduction=red, seed=2000 + j, **kw))
    # float64 end to end: the split kernels, the combine and the chunk driver (tolerance 1e-10)
    cases.append(Case(name="option-float64-dft-mean", dtype=torch.float64, seed=2900,
                      options=dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3)))
    cases.append(Case(name="option-float64-entropy-none", objective="entropy", reduction="none",
                      dtype=torch.float64, seed=2901))
    return cases


def _logits(world: int) -> list[Case]:
    base = [("dft", "mean", {}), ("entropy", "none", dict(label_smoothing=0.1, softcap=3.0)),
            ("focal", "sum", {}), ("ce", "mean", dict(z_loss=1e-3, shift=True)), ("prob", "none", {}),
            (dk.Power(alpha=0.5), "mean", dict(label_smoothing=0.1))]
    masked = [Case(name=f"masked-bias-{obj_id(o)}-{r}", objective=o, reduction=r, options=dict(opts, mask=True),
                   backend=backend, seed=3100 + k)
              for k, (o, r, opts, backend) in enumerate([
                  ("ce", "mean", {}, "torch"), ("entropy", "none", dict(softcap=3.0), "torch"),
                  ("focal", "sum", {}, "torch"), ("dft", "mean", dict(z_loss=1e-3), "triton")])]
    masked += [Case(name=f"masked-logits-{obj_id(o)}-{r}", kind="logits", objective=o, reduction=r,
                    options=dict(opts, mask=True), backend=backend, seed=3200 + k)
               for k, (o, r, opts, backend) in enumerate([
                   ("entropy", "mean", {}, "torch"), ("chord", "none", dict(softcap=2.0), "torch"),
                   ("prob", "sum", {}, "triton")])]
    return masked + [Case(name=f"logits-{obj_id(o)}-{r}", kind="logits", objective=o, reduction=r, options=opts,
                 lead=(4, 6) if opts.get("shift") else None, token_weights=k == 4, split=("even", "skewed")[k % 2],
                 seed=3000 + k) for k, (o, r, opts) in enumerate(base)]


def _special(world: int) -> list[Case]:
    cases = [
        # integer logits: many exact ties within and across slices; accuracy must take the smallest index
        Case(name="ties-linear-ce", kind="ties", objective="ce", seed=4000),
        Case(name="ties-linear-entropy-softcap", kind="ties", objective="entropy", options=dict(softcap=2.0),
             split="skewed", seed=4001),
        Case(name="ties-logits-dft", kind="ties", objective="dft", reduction="none", seed=4002),
        # the Triton split kernels under TRITON_INTERPRET=1
        Case(name="triton-entropy-smooth-zloss-softcap", backend="triton", objective="entropy",
             options=dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0), split="skewed", seed=4100),
        Case(name="triton-focal-none-weights", backend="triton", objective="focal", reduction="none",
             token_weights=True, seed=4101),
        Case(name="triton-logits-dft-sum", kind="logits", backend="triton", objective="dft", reduction="sum",
             seed=4102),
    ]
    if world == 2:
        cases += [
            Case(name="dtensor-weight-bias-dft", kind="dtensor", seed=4200),
            Case(name="dtensor-input-partial-dgrad-entropy", kind="dtensor", objective="entropy", reduction="none",
                 bias=False, allreduce_dgrad=False, seed=4201),
            Case(name="dtensor-logits-dft", kind="dtensor_logits", seed=4202),
            Case(name="hf-tp-plan-auto-dft", kind="hf", seed=4300),
            Case(name="hf-colwise-parallel-head-entropy", kind="hf", objective="entropy",
                 options=dict(plan="parallelize_module"), seed=4301),
        ]
    cases += [Case(name=f"memory-{red}", kind="memory", reduction=red, objective="entropy", n=64, seed=4400 + i)
              for i, red in enumerate(REDUCTIONS)]
    cases += [Case(name=f"collectives-{red}-{obj}", kind="collectives", reduction=red, objective=obj, n=20,
                   options=opts, seed=4500 + i)
              for i, (red, obj, opts) in enumerate([("mean", "dft", {}), ("none", "entropy", dict(label_smoothing=0.1)),
                                                    ("sum", "ce", {})])]
    cases += [Case(name="autocast-bf16-entropy", kind="autocast", objective="entropy", seed=4600)]
    cases += [Case(name=f"error-{what}", kind="error", options=dict(what=what))
              for what in ("chunk_size", "tokens", "empty_slice", "dtensor_shard1")]
    return cases


def cases(world: int) -> list[Case]:
    return _grid(world) + _options(world) + _logits(world) + _special(world)


# ------------------------------------------------------------------------------------------------ helpers


def _slices(split: str, vocab: int, world: int) -> list[tuple[int, int]]:
    if split == "even":
        sizes = [len(c) for c in torch.arange(vocab).tensor_split(world)]
    else:  # rank r gets a share r + 1
        total = world * (world + 1) // 2
        sizes = [vocab * (r + 1) // total for r in range(world)]
        sizes[-1] += vocab - sum(sizes)
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _aim_targets(logits: torch.Tensor, t: torch.Tensor) -> None:
    """Point every other valid target at its row's argmax, so accuracy is neither 0 nor 1."""
    flat, z = t.view(-1), logits.reshape(-1, logits.shape[-1])
    rows = torch.nonzero(flat != -100).squeeze(1)[::2]
    flat[rows] = z[rows].argmax(-1)


def _masked_columns(vocab: int, world: int) -> slice:
    """The masked (-inf) vocabulary of the "mask" cases: the last rank's whole slice (even split) and a
    few columns of the rank before, as a padded vocabulary with -inf bias would be."""
    return slice(vocab - vocab // world - 5, vocab)


def _mask(case: Case, world: int, logits_or_bias: torch.Tensor, t: torch.Tensor) -> None:
    """Set the masked columns to -inf and move the targets off them (in place)."""
    cols = _masked_columns(logits_or_bias.shape[-1], world)
    logits_or_bias[..., cols] = float("-inf")
    valid = t != -100
    t[valid] = t[valid] % cols.start


def _loss_kwargs(case: Case, t: torch.Tensor) -> dict:
    kw = dict(case.options, objective=case.objective, reduction=case.reduction, return_stats=case.stats)
    kw.pop("mask", None)
    if case.token_weights:
        kw["token_weights"] = torch.rand(t.shape, dtype=torch.float32) * 2
    if case.num_items_tensor:
        kw["num_items_in_batch"] = torch.tensor(17)
    return kw


def _identical_on_all_ranks(t: torch.Tensor, group) -> float:
    """Largest difference between this rank's value and any other rank's (0.0: bit-identical)."""
    t = t.detach().to(torch.float64).reshape(-1)
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, t, group=group)
    return max(float((g - t).abs().max()) if t.numel() else 0.0 for g in gathered)


class LocalTensorRecorder(TorchDispatchMode):
    """Largest element count of any tensor an op produces, at the level of local tensors: an op on
    DTensors is handed back to DTensor (``NotImplemented``), which runs it as local ops, and those (its
    redistributions and collectives among them) come back here.  Fake and meta tensors are not counted."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            # fake and meta tensors hold no memory (DTensor's sharding propagation makes global-shape ones)
            if (isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta"
                    and t.dtype != torch.uint8 and t.numel() > self.largest):
                self.largest, self.largest_op = t.numel(), func
        return out


class Metrics(dict):
    def add(self, name: str, value: float, tol: float) -> None:
        self[name] = [float(value), float(tol)]

    def compare_loss_and_stats(self, out, ref, stats: bool, tol: float, group) -> tuple:
        if stats:
            (out, st), (ref, rst) = out, ref
            for f in STATS:
                a, r = getattr(st, f), getattr(rst, f)
                assert (a is None) == (r is None), f"stats.{f}: {a} vs reference {r}"
                if a is not None:
                    self.add(f"stats.{f}", rel_err(a, r), tol)
        assert out.shape == ref.shape, (out.shape, ref.shape)
        self.add("loss", rel_err(out, ref), tol)
        self.add("loss identical on every rank", _identical_on_all_ranks(out, group), 0.0)
        return out, ref


# ------------------------------------------------------------------------------------------------ cases


def _run_linear(case: Case, rank: int, world: int, group) -> Metrics:
    vocab = VOCAB[world]
    x, w, b, t = make_inputs(case.n, H, vocab, torch.float64, bias=case.bias, ignore=case.ignore, seed=case.seed,
                             lead=case.lead)
    if case.options.get("mask"):
        _mask(case, world, b, t)
    _aim_targets(torch.nn.functional.linear(x, w, b), t)
    kw = _loss_kwargs(case, t)
    lo, hi = _slices(case.split, vocab, world)[rank]
    xs, ws = leaf(x.to(case.dtype)), leaf(w[lo:hi].to(case.dtype))
    bs = None if b is None else leaf(b[lo:hi].to(case.dtype))
    out = dk.linear_cross_entropy(xs, ws, t, bias=bs, process_group=group, backend=case.backend,
                                  chunk_size=case.chunk_size, allreduce_dgrad=case.allreduce_dgrad, **kw)
    xr, wr = leaf(x.to(case.dtype).double()), leaf(w.to(case.dtype).double())
    br = None if b is None else leaf(b.to(case.dtype).double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, **kw)
    m, tol = Metrics(), TOL[case.dtype]
    out, ref = m.compare_loss_and_stats(out, ref, case.stats, tol, group)
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5  # same on every rank (seeded per case)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    dx = xs.grad
    if not case.allreduce_dgrad:
        # this rank's partial: not the full gradient by itself, the full one once summed over the group
        m.add("partial dX is not already reduced", float(rel_err(dx, xr.grad) < 1e-3), 0.0)
        dx = dx.clone()
        dist.all_reduce(dx, group=group)
    m.add("dX", rel_err(dx, xr.grad), tol)
    m.add("dW slice", rel_err(ws.grad, wr.grad[lo:hi]), tol)
    if b is not None:
        m.add("db slice", rel_err(bs.grad, br.grad[lo:hi]), tol)
    return m


def _run_logits(case: Case, rank: int, world: int, group) -> Metrics:
    vocab = VOCAB[world]
    shape = case.lead if case.lead is not None else (case.n,)
    g = torch.Generator().manual_seed(case.seed)
    z = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    _, _, _, t = make_inputs(case.n, 2, vocab, seed=case.seed, lead=case.lead, ignore=case.ignore)
    if case.options.get("mask"):
        _mask(case, world, z, t)
        z[..., :: 7] = float("-inf")  # and scattered columns on every rank
        t[(t != -100) & (t % 7 == 0)] += 1
    _aim_targets(z, t)
    kw = _loss_kwargs(case, t)
    lo, hi = _slices(case.split, vocab, world)[rank]
    zs = leaf(z[..., lo:hi].to(case.dtype))
    out = dk.cross_entropy(zs, t, process_group=group, backend=case.backend, chunk_size=case.chunk_size, **kw)
    zr = leaf(z.to(case.dtype).double())
    ref = dk.reference.cross_entropy(zr, t, **kw)
    m, tol = Metrics(), TOL[case.dtype]
    out, ref = m.compare_loss_and_stats(out, ref, case.stats, tol, group)
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    m.add("dlogits slice", rel_err(zs.grad, zr.grad[..., lo:hi]), tol)
    return m


def _run_ties(case: Case, rank: int, world: int, group) -> Metrics:
    """Integer-valued inputs (exact logits in float32 and float64): ties at the max within and across slices;
    targets on the first or on a later maximum."""
    vocab = VOCAB[world]
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randint(-1, 2, (case.n, 4), generator=g).double()
    w = torch.randint(-1, 2, (vocab, 4), generator=g).double()
    z = x @ w.t()
    is_max = z == z.amax(-1, keepdim=True)
    first = is_max.double().argmax(-1)
    last = vocab - 1 - is_max.flip(-1).double().argmax(-1)
    t = torch.where(torch.arange(case.n) % 2 == 0, first, last)
    assert bool((first != last).any()), "the case should have ties"
    kw = dict(objective=case.objective, reduction=case.reduction, return_stats=True, **case.options)
    lo, hi = _slices(case.split, vocab, world)[rank]
    m = Metrics()
    if case.name.startswith("ties-logits"):
        out = dk.cross_entropy(z[:, lo:hi].float(), t, process_group=group, chunk_size=case.chunk_size, **kw)
        ref = dk.reference.cross_entropy(z, t, **kw)
    else:
        out = dk.linear_cross_entropy(x.float(), w[lo:hi].float(), t, process_group=group,
                                      chunk_size=case.chunk_size, **kw)
        ref = dk.reference.linear_cross_entropy(x, w, t, **kw)
    m.compare_loss_and_stats(out, ref, True, TOL[torch.float32], group)
    m.add("accuracy exact", abs(float(out[1].accuracy) - float(ref[1].accuracy)), 0.0)
    return m


def _run_dtensor(case: Case, rank: int, world: int, group) -> Metrics:
    """A DTensor head sharded Shard(0) on a 1-D mesh, passed as is (no process_group argument)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    vocab = VOCAB[world]
    x, w, b, t = make_inputs(case.n, H, vocab, torch.float64, bias=case.bias, seed=case.seed)
    _aim_targets(torch.nn.functional.linear(x, w, b), t)
    kw = _loss_kwargs(case, t)
    m, tol = Metrics(), TOL[torch.float32]
    xr, wr = leaf(x.float().double()), leaf(w.float().double())
    br = None if b is None else leaf(b.float().double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, **kw)

    if case.kind == "dtensor_logits":
        z = torch.nn.functional.linear(x, w, b).float()
        zd = distribute_tensor(z, mesh, [Shard(1)]).requires_grad_()
        zr = leaf(z.double())
        ref = dk.reference.cross_entropy(zr, t, **kw)
        out = dk.cross_entropy(zd, t, chunk_size=case.chunk_size, **kw)
        out, ref = m.compare_loss_and_stats(out, ref, case.stats, tol, group)
        out.backward()
        ref.backward()
        # V = 257 over 2 ranks: uneven shards, whose gradient torch 2.11's to_local() made Replicate
        assert isinstance(zd.grad, DTensor) and zd.grad.placements == (Shard(1),), zd.grad.placements
        assert zd.grad.to_local().shape == zd.to_local().shape and zd.grad.stride() == zd.stride()
        m.add("dlogits (gathered)", rel_err(zd.grad.full_tensor(), zr.grad), tol)
        return m

    wd = distribute_tensor(w.float(), mesh, [Shard(0)]).requires_grad_()
    bd = None if b is None else distribute_tensor(b.float(), mesh, [Shard(0)]).requires_grad_()
    xs = leaf(x.float())
    inp = DTensor.from_local(xs, mesh, [Replicate()]) if not case.allreduce_dgrad else xs
    out = dk.linear_cross_entropy(inp, wd, t, bias=bd, chunk_size=case.chunk_size,
                                  allreduce_dgrad=case.allreduce_dgrad, **kw)
    out, ref = m.compare_loss_and_stats(out, ref, case.stats, tol, group)
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    out.backward(grad_out.float())
    ref.backward(grad_out)
    # a DTensor input gets a Partial gradient that DTensor reduces into xs.grad: the full dX either way
    m.add("dX", rel_err(xs.grad, xr.grad), tol)
    assert isinstance(wd.grad, DTensor) and wd.grad.placements == (Shard(0),)
    m.add("dW (gathered)", rel_err(wd.grad.full_tensor(), wr.grad), tol)
    if bd is not None:
        m.add("db (gathered)", rel_err(bd.grad.full_tensor(), br.grad), tol)
    return m


def _run_memory(case: Case, rank: int, world: int, group) -> Metrics:
    """No tensor of ``N x V_local`` elements (beyond one chunk of them) in forward or backward."""
    vocab = VOCAB[world]
    x, w, b, t = make_inputs(case.n, H, vocab, seed=case.seed)
    lo, hi = _slices("even", vocab, world)[rank]
    xs, ws, bs = leaf(x), leaf(w[lo:hi]), leaf(b[lo:hi])
    with LocalTensorRecorder() as rec:
        loss = dk.linear_cross_entropy(xs, ws, t, bias=bs, process_group=group, chunk_size=case.chunk_size,
                                       objective=case.objective, reduction=case.reduction, return_stats=True)[0]
        loss.sum().backward()
    m = Metrics()
    m.add("largest tensor / (N x V_local)", rec.largest / (case.n * (hi - lo)), 0.999)
    m.add("the recorder saw the chunk logits", float(rec.largest < case.chunk_size * (hi - lo)), 0.0)
    return m


def _run_autocast(case: Case, rank: int, world: int, group) -> Metrics:
    """Under torch.autocast the operands are cast once to its dtype, as on one process: the same loss and
    gradients as a call on bfloat16 operands, within the 16-bit tolerance of the float64 reference."""
    vocab = VOCAB[world]
    x, w, b, t = make_inputs(case.n, H, vocab, seed=case.seed)
    lo, hi = _slices("even", vocab, world)[rank]
    kw = dict(process_group=group, chunk_size=case.chunk_size, objective=case.objective)
    xs, ws, bs = leaf(x), leaf(w[lo:hi]), leaf(b[lo:hi])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dk.linear_cross_entropy(xs, ws, t, bias=bs, **kw)
    out.backward()
    x16, w16, b16 = leaf(x.bfloat16()), leaf(w[lo:hi].bfloat16()), leaf(b[lo:hi].bfloat16())
    want = dk.linear_cross_entropy(x16, w16, t, bias=b16, **kw)
    want.backward()
    xr, wr, br = leaf(x.bfloat16().double()), leaf(w.bfloat16().double()), leaf(b.bfloat16().double())
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, objective=case.objective)
    ref.backward()
    m = Metrics()
    m.add("loss vs bfloat16 operands", rel_err(out, want), 0.0)
    for name, a, c in (("dX", xs, x16), ("dW slice", ws, w16), ("db slice", bs, b16)):
        assert a.grad.dtype == torch.float32  # the gradient comes back in the caller's dtype
        m.add(f"{name} vs bfloat16 operands", rel_err(a.grad, c.grad.float()), 0.0)
    m.add("loss vs reference", rel_err(out, ref), TOL[torch.bfloat16])
    m.add("dX vs reference", rel_err(xs.grad, xr.grad), TOL[torch.bfloat16])
    return m


class CollectiveRecorder(TorchDispatchMode):
    """``(op, [shapes of its tensor arguments])`` of every c10d collective run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("c10d::") and ("allreduce" in name or "allgather" in name or "all_gather" in name):
            shapes = [list(t.shape) for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
            self.calls.append((name, shapes))
        return func(*args, **(kwargs or {}))


def _run_collectives(case: Case, rank: int, world: int, group) -> Metrics:
    """Per chunk of C rows exactly one all-reduce of [C] (MAX) and one of [C, k] (SUM); per call one
    all-gather of the layout and one all-reduce of dX [N, H] (in forward, or in backward for 'none')."""
    vocab = VOCAB[world]
    x, w, b, t = make_inputs(case.n, H, vocab, seed=case.seed)
    lo, hi = _slices("even", vocab, world)[rank]
    xs, ws = leaf(x), leaf(w[lo:hi])
    with CollectiveRecorder() as rec:
        loss = dk.linear_cross_entropy(xs, ws, t, process_group=group, chunk_size=case.chunk_size,
                                       objective=case.objective, reduction=case.reduction, return_stats=case.stats,
                                       **case.options)[0]
        loss.sum().backward()
    params = LossParams(dk.get_objective(case.objective), -100, None, case.options.get("label_smoothing", 0.0),
                        0.0, case.stats)
    k = dk.vocab_parallel.packed_columns(params)
    assert k == 3 + params.needs_entropy + (params.label_smoothing != 0) + 2 * case.stats  # the documented width
    gather = ("allgather", [[3 * world], [3]])
    chunks = [min(case.chunk_size, case.n - s) for s in range(0, case.n, case.chunk_size)]
    statistics = [c for rows in chunks for c in (("allreduce", [[rows]]), ("allreduce", [[rows, k]]))]
    dgrad = [("allreduce", [[case.n, H]])]
    if case.reduction == "none":  # backward recomputes: the statistics again, then dX
        want = [gather] + statistics + statistics + dgrad
    else:
        want = [gather] + statistics + dgrad
    got = [("allgather" if "gather" in name else "allreduce", shapes) for name, shapes in rec.calls]
    m = Metrics()
    m.add(f"collectives {got} != {want}", float(got != want), 0.0)
    return m


def _run_error(case: Case, rank: int, world: int, group) -> Metrics:
    """Inconsistent calls raise the same ValueError on every rank (no rank left waiting in a collective)."""
    what = case.options["what"]
    vocab = VOCAB[world]
    x, w, b, t = make_inputs(12, H, vocab, seed=5000, bias=False)
    lo, hi = _slices("even", vocab, world)[rank]
    kw = dict(process_group=group)
    if what == "chunk_size":
        kw["chunk_size"] = 4 if rank == 0 else 8
    elif what == "tokens":
        x, t = (x, t) if rank == 0 else (x[:-1], t[:-1])
    elif what == "empty_slice":
        lo, hi = (0, vocab) if rank == 0 else (0, 0)
    if what == "dtensor_shard1":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        wd = distribute_tensor(w, init_device_mesh("cpu", (world,)), [Shard(1)])
        call = lambda: dk.linear_cross_entropy(x, wd, t)  # noqa: E731
        expected = "placements"
    else:
        call = lambda: dk.linear_cross_entropy(x, w[lo:hi], t, **kw)  # noqa: E731
        expected = {"chunk_size": "chunk_size", "tokens": "same input", "empty_slice": "at least one"}[what]
    try:
        call()
    except ValueError as exc:
        assert expected in str(exc), f"unexpected message: {exc}"
        return Metrics(raised=[0.0, 0.0])
    return Metrics(raised=[1.0, 0.0])


RUNNERS = {"linear": _run_linear, "logits": _run_logits, "ties": _run_ties, "dtensor": _run_dtensor,
           "dtensor_logits": _run_dtensor, "memory": _run_memory, "collectives": _run_collectives,
           "autocast": _run_autocast,
           "error": _run_error}


def run_cases(rank: int, world: int, payload) -> dict:
    """Every case of ``cases(world)`` (or the names in ``payload``); after a case raises, the rest are not
    run (the ranks may no longer be in step)."""
    from vocab_parallel_hf import run_hf_case

    runners = dict(RUNNERS, hf=run_hf_case)
    group = dist.group.WORLD
    wanted = None if payload is None else set(payload)
    results = {}
    for case in cases(world):
        if wanted is not None and case.name not in wanted:
            continue
        torch.manual_seed(case.seed)  # token weights, grad_output: the same on every rank
        try:
            results[case.name] = {"metrics": dict(runners[case.kind](case, rank, world, group))}
        except Exception:  # noqa: BLE001 - reported per case by the test module
            results[case.name] = {"error": traceback.format_exc()}
            results[FIRST_ERROR] = case.name
            break
    return results


__all__ = ["Case", "cases", "run_cases", "replace"]
