"""``python -m bench.model``: a roofline model of one forward + backward of the fused loss.

Nothing here runs on a GPU and every number it prints is a **prediction**.  The steps are
not written down by hand: one ``linear_cross_entropy(...).backward()`` runs on ``meta``
tensors (shapes only) through the real code path - the public function, the custom op's
implementation, the chunk loop of :mod:`dft_kernels.chunked`, the GEMMs of
:class:`dft_kernels.chunked.HeadGemms` with the CUDA policy (``mm``/``addmm`` with ``out_dtype``,
which run on ``meta``), and autograd's backward - under a ``TorchDispatchMode`` that records
every aten op with the bytes it reads and writes and, for GEMMs, its flops.  The row kernel
is a stand-in backend (:class:`RowKernelPasses`) that counts the triton kernel's passes over
memory: with a gradient, the factored kernel the chunk loop uses by default reads the chunk's
logits once and writes the gradient matrix once (into ``grad_out`` or in place), and the GEMMs
apply its per-row factor on chunk-sized operands (recorded as they run); the two-pass kernel
(``--two-pass``, i.e. ``factored=False``, and wherever the options are not factored)
reads them twice; plus its per-row vectors.

Each recorded kernel is priced as ``max(flops / peak, bytes / bandwidth)`` (H100 SXM
defaults: 700 TFLOP/s dense 16-bit, 3.0 TB/s; ``--tflops``/``--tbps`` override them) and the
steps are summed.  The floor is the three GEMMs alone, ``6 N H V`` flops at the peak.  With
a side stream (an overlap the library does not have: deleted until a GPU measures it) the chunk loop is priced at
``max(its GEMM time, its bytes / bandwidth)`` instead, i.e. perfect sharing of the GPU
between the GEMMs and the row kernel: an optimistic bound, printed separately.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dft_kernels as dk
from dft_kernels import ops, options
from dft_kernels.backends import RowOutputs

from .shapes import GPU_SHAPES, Shape

DEFAULT_TFLOPS = 700.0
DEFAULT_TBPS = 3.0

# ops that only make views or allocate: no memory traffic
_FREE = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "slice", "select", "as_strided", "expand",
    "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_like", "new_empty", "empty_strided",
    "lift_fresh", "_to_copy_meta", "unbind", "split", "narrow",
}
_GEMMS = {"mm", "addmm"}


@dataclass
class Step:
    """One kind of kernel of the run: how many launches, their flops and bytes, predicted time."""

    name: str
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    in_loop: bool = True


@dataclass
class Trace:
    steps: "OrderedDict[str, Step]" = field(default_factory=OrderedDict)

    def add(self, name: str, flops: float, nbytes: float, tflops: float, tbps: float, in_loop: bool = True):
        step = self.steps.setdefault(name, Step(name, in_loop=in_loop))
        step.calls += 1
        step.flops += flops
        step.bytes += nbytes
        step.seconds += max(flops / (tflops * 1e12), nbytes / (tbps * 1e12))


def _run_op(func, args, kwargs):
    """``func(*args, **kwargs)``, but ``addmm`` with ``out_dtype`` (the CUDA policy's accumulating dW GEMM)
    on ``meta`` tensors gets its result here: torch 2.11's meta decomposition of that overload takes
    ``out_dtype`` for ``beta`` and raises a TypeError (fixed by 2.13).  A meta result is only a shape
    and a dtype: ``out``, or a new ``[M, N]`` tensor of ``out_dtype``."""
    if func.overloadpacket is torch.ops.aten.addmm and func._overloadname in ("dtype", "dtype_out") \
            and args[0].device.type == "meta":
        mat1, mat2, out_dtype = args[1], args[2], args[3]
        shape = (mat1.shape[0], mat2.shape[1])
        out = kwargs.get("out")
        if out is None:
            return torch.empty(shape, dtype=out_dtype, device="meta")
        if tuple(out.shape) != shape or out.dtype != out_dtype:
            raise RuntimeError(f"addmm: out is {tuple(out.shape)} {out.dtype}, expected {shape} {out_dtype}")
        return out
    return func(*args, **kwargs)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RowKernelPasses:
    """A row backend (the contract of ``dft_kernels.backends``) that computes nothing and records
    the triton kernel's memory traffic: pass 1 reads the logits; with ``grad_scale``, pass 2 reads
    them again and writes the gradient once (``grad_out``'s dtype, or the logits' in place);
    per row: target (8 bytes), loss/nll/prob (+ entropy, correct) written (4 bytes each), token
    weight and a per-row scale read (4 bytes each)."""

    NAME = "row-kernel-model"

    def __init__(self, record, record_triton_gemm=None):
        self.record = record
        self.record_triton_gemm = record_triton_gemm  # None: no fused head (the default)

    def row_loss_grad(self, logits, target, params, token_weights=None, grad_scale=None, grad_out=None):
        n, v = logits.shape
        nbytes = _nbytes(logits)
        vectors = 3 + (1 if params.needs_entropy else 0) + (1 if params.with_stats else 0)
        per_row = 8 + 4 * vectors + (4 if token_weights is not None else 0)
        if grad_scale is not None:
            nbytes += _nbytes(logits) + (_nbytes(logits) if grad_out is None else _nbytes(grad_out))
            per_row += 4 if grad_scale.dim() == 1 else 0
        self.record("row kernel" + (" (loss + gradient)" if grad_scale is not None else " (loss only)"),
                    0.0, nbytes + n * per_row)
        return self._outputs(logits, params)

    def supports(self, path, params) -> str:
        """The triton backend's paths (its ``supports``), the fused head only with a rate to price it."""
        if path == "fused" and self.record_triton_gemm is None:
            return "no Triton GEMM rate given"
        from dft_kernels.backends.triton import supports

        return supports("factored" if path == "fused" else path, params)

    def row_loss_grad_factored(self, logits, target, params, token_weights, grad_scale, grad_out, row_scale):
        """The factored kernel: one read of the logits, the gradient matrix written once, and a
        float32 factor per row."""
        n, v = logits.shape
        vectors = 4 + (1 if params.needs_entropy else 0) + (1 if params.with_stats else 0)
        per_row = 8 + 4 * vectors + (4 if token_weights is not None else 0) + (4 if grad_scale.dim() == 1 else 0)
        nbytes = _nbytes(logits) + (_nbytes(logits) if grad_out is None else _nbytes(grad_out))
        self.record("row kernel (loss + factored gradient, one read)", 0.0, nbytes + n * per_row)
        return self._outputs(logits, params)

    def linear_loss_grad_fused(self, x, weight, target, params, token_weights, grad_scale, grad_out, row_scale):
        """The fused head (``fused_head=True``): one Triton GEMM reads ``x`` and ``W`` and
        writes the factored gradient (no logits), priced at the assumed Triton GEMM rate; plus
        the per-tile statistics (two to four float32 per row and 128-column tile, written and
        read), the target-logit dot products and the per-row vectors."""
        if self.record_triton_gemm is None or params.label_smoothing != 0.0 or params.z_loss != 0.0:
            return None
        n, h = x.shape
        v = weight.shape[0]
        nbytes = _nbytes(x) + _nbytes(weight) + (0 if grad_out is None else _nbytes(grad_out))
        self.record_triton_gemm("fused logits GEMM + gradient (Triton)", 2.0 * n * h * v, nbytes)
        partials = 2 + (1 if params.needs_entropy else 0) + (1 if params.with_stats else 0)
        tiles = -(-v // 128)
        vectors = 8 + 2 * x.element_size() * h  # target, x row and W row of the target
        self.record("fused head: tile statistics, merge, target logits", 0.0,
                    2 * n * tiles * 4 * partials + n * (vectors + 4 * 8))
        return self._outputs(x, params)

    @staticmethod
    def _outputs(logits, params):
        new = lambda: torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # noqa: E731
        return RowOutputs(new(), new(), new(), new() if params.needs_entropy else None,
                          new() if params.with_stats else None)


class _Recorder(TorchDispatchMode):
    """Prices every aten op run under it (looking inside the custom ops, as tests/dispatch_recorder.py)."""

    def __init__(self, trace: Trace, tflops: float, tbps: float, shape: tuple[int, int, int]):
        super().__init__()
        self.trace, self.tflops, self.tbps = trace, tflops, tbps
        self.n, self.h, self.v = shape
        self.in_loop = False

    def record(self, name: str, flops: float, nbytes: float) -> None:
        self.trace.add(name, flops, nbytes, self.tflops, self.tbps, self.in_loop)

    def _gemm_name(self, out: torch.Tensor, accumulate: bool) -> str:
        rows, cols = out.shape
        if (rows, cols) == (self.v, self.h):
            return "dW GEMM (accumulate into fp32)" if accumulate else "dW GEMM (first chunk, write fp32)"
        if cols == self.v:
            return f"logits GEMM ({str(out.dtype).removeprefix('torch.')} out)"
        if cols == self.h:
            return "dX GEMM"
        return f"GEMM {rows}x{cols}"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = ops.IMPLEMENTATIONS.get(func.name())
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        out = _run_op(func, args, kwargs)
        name = func.overloadpacket.__name__.rstrip("_")
        if name in _FREE:
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in _GEMMS:
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            dst = outs[0]
            accumulate = name == "addmm" and (kwargs.get("out") is args[0] or dst is args[0])
            flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            nbytes = _nbytes(a) + _nbytes(b) + _nbytes(dst) * (2 if name == "addmm" else 1)
            self.record(self._gemm_name(dst, accumulate), flops, nbytes)
            return out
        seen, nbytes = set(), 0
        if func.overloadpacket.__name__.endswith("_") and isinstance(args[0], torch.Tensor):
            nbytes += _nbytes(args[0])  # in place: read, and written below
        for t in ins + outs:  # each distinct tensor once: read or written
            key = (t.data_ptr() if t.device.type != "meta" else id(t), t.shape, t.stride())
            if key not in seen:
                seen.add(key)
                nbytes += _nbytes(t)
        big = max(outs + ins, key=lambda t: t.numel(), default=None)
        shape = "x".join(str(s) for s in big.shape) if big is not None else ""
        self.record(f"{name} [{shape}]", 0.0, nbytes)
        return out


@dataclass
class Prediction:
    shape: Shape
    mode: str
    chunk_size: int
    steps: list[Step]
    floor_s: float
    total_s: float
    overlap_s: float
    factored: bool = True
    fused_rate: Optional[float] = None  # the assumed Triton GEMM rate of a fused-head prediction

    @property
    def ratio(self) -> float:
        return self.total_s / self.floor_s

    @property
    def overlap_ratio(self) -> float:
        return self.overlap_s / self.floor_s


def predict(shape: Shape, fast: bool, tflops: float = DEFAULT_TFLOPS, tbps: float = DEFAULT_TBPS,
            chunk_size: Optional[int] = None, objective: str = "dft", device: str = "meta",
            cuda_policy: bool = True, factored: bool = True, fused_rate: Optional[float] = None) -> Prediction:
    """Trace one forward + backward (``mean``, no ignored rows) on ``device`` tensors and price it;
    ``factored`` False prices the two-pass row kernel (``factored=False``); ``fused_rate``
    (a fraction of ``tflops``) prices the fused head (``fused_head=True``) with its Triton
    GEMM at that rate: an assumption until a GPU measures it."""
    dtype = shape.torch_dtype
    trace = Trace()
    x = torch.empty(shape.n, shape.h, dtype=dtype, device=device, requires_grad=True)
    w = torch.empty(shape.v, shape.h, dtype=dtype, device=device, requires_grad=True)
    t = torch.zeros(shape.n, dtype=torch.int64, device=device)
    rec = _Recorder(trace, tflops, tbps, (shape.n, shape.h, shape.v))
    triton_gemm = None
    if fused_rate is not None:
        def triton_gemm(name, flops, nbytes):
            trace.add(name, flops, nbytes, tflops * fused_rate, tbps, rec.in_loop)
    backend = RowKernelPasses(rec.record, triton_gemm)
    policy = options._cuda_mm_out_dtype if cuda_policy else None
    logits_dtype = dtype if fast and dtype != torch.float32 else None
    fused = fused_rate is not None
    # the plan of a CUDA device with the triton backend (priced by ``backend``), whatever device traces it
    budget = options.CHUNK_BYTES["cuda"]
    with contextlib.ExitStack() as stack:
        for cm in (_policy(policy), _no_autocast(),
                   mock.patch.object(dk.backends, "candidates", lambda name, dev: ("triton",)),
                   mock.patch.object(dk.backends, "get_backend", lambda name: backend),
                   mock.patch.object(dk.chunked, "get_backend", lambda name: backend)):
            stack.enter_context(cm)
        if fused:
            stack.enter_context(mock.patch("dft_kernels.experimental.fused_head.linear_loss_grad_fused",
                                           backend.linear_loss_grad_fused))
        if chunk_size is None:
            chunk_size = options.plan_linear(
                options.LossOptions(chunk_bytes=budget, logits_dtype=logits_dtype, fused_head=fused),
                x.reshape(-1, shape.h), w, None, True, True, False).chunk_size
        with rec:
            rec.in_loop = True
            loss = dk.linear_cross_entropy(x, w, t, objective=objective, chunk_size=chunk_size,
                                           logits_dtype=logits_dtype, softcap=shape.softcap, validate=False,
                                           factored=factored or fused, fused_head=fused)
            rec.in_loop = False
            loss.backward()
    floor = 6.0 * shape.n * shape.h * shape.v / (tflops * 1e12)
    steps = list(trace.steps.values())
    total = sum(s.seconds for s in steps)
    loop = [s for s in steps if s.in_loop]
    loop_gemm = sum(s.flops for s in loop) / (tflops * 1e12)
    loop_bytes = sum(s.bytes for s in loop) / (tbps * 1e12)
    overlap = max(loop_gemm, loop_bytes) + sum(s.seconds for s in steps if not s.in_loop)
    return Prediction(shape, "fast" if fast else "default", chunk_size, steps, floor, total, overlap, factored,
                      fused_rate)


@contextlib.contextmanager
def _no_autocast():
    """``torch.autocast`` knows no ``meta`` device: the entry point's autocast check and the ops'
    autocast-off wrapper become no-ops (they move no data)."""
    with mock.patch("torch.autocast", lambda *a, **k: contextlib.nullcontext()), \
            mock.patch("torch.is_autocast_enabled", lambda *a: False):
        yield


@contextlib.contextmanager
def _policy(mm):
    """The CUDA GEMM policy (``mm``/``addmm`` with ``out_dtype``) on ``meta`` and CPU tensors."""
    saved = {k: options.MM_OUT_DTYPE.get(k, "absent") for k in ("meta", "cpu")}
    for k in saved:
        options.MM_OUT_DTYPE[k] = mm
    try:
        yield
    finally:
        for k, v in saved.items():
            if v == "absent":
                options.MM_OUT_DTYPE.pop(k, None)
            else:
                options.MM_OUT_DTYPE[k] = v


def step_table(p: Prediction) -> str:
    kernel = "" if p.factored else ", two-pass row kernel"
    if p.fused_rate is not None:
        kernel = f", fused head (Triton GEMM assumed at {p.fused_rate:.0%} of the peak)"
    lines = [f"### {p.shape.name}, {p.mode} mode{kernel} (chunk {p.chunk_size} rows)", "",
             "| step | launches | GFLOP | GB moved | predicted ms | in chunk loop |",
             "|---|---:|---:|---:|---:|:-:|"]
    small = [s for s in p.steps if s.flops == 0 and s.bytes < 1e7]
    for s in p.steps:
        if s in small:
            continue
        lines.append(f"| {s.name} | {s.calls} | {s.flops / 1e9:.0f} | {s.bytes / 1e9:.3f} | {s.seconds * 1e3:.3f} | "
                     f"{'yes' if s.in_loop else 'backward'} |")
    if small:
        calls = sum(s.calls for s in small)
        lines.append(f"| {len(small)} kinds of small ops (scalars, per-row vectors) | {calls} | 0 "
                     f"| {sum(s.bytes for s in small) / 1e9:.3f} | {sum(s.seconds for s in small) * 1e3:.3f} | |")
    lines.append(f"| **total** | | {sum(s.flops for s in p.steps) / 1e9:.0f} | "
                 f"{sum(s.bytes for s in p.steps) / 1e9:.3f} | **{p.total_s * 1e3:.2f}** | |")
    lines += ["", f"floor (6 N H V flops at the peak): {p.floor_s * 1e3:.2f} ms; predicted ours / floor: "
              f"**{p.ratio:.3f}**; with the side-stream overlap (perfect sharing, optimistic): "
              f"{p.overlap_s * 1e3:.2f} ms, {p.overlap_ratio:.3f}", ""]
    return "\n".join(lines)


def summary_table(preds: list[Prediction], two_pass: Optional[list[Prediction]] = None,
                  fused: Optional[list[Prediction]] = None) -> str:
    """One row per prediction; with ``two_pass`` (the same calls with the two-pass row kernel) and
    ``fused`` (with the fused head) a column of their ratio beside."""
    extra, rule = "", ""
    if two_pass:
        extra, rule = extra + " two-pass kernel / floor |", rule + "---:|"
    if fused:
        extra, rule = extra + f" fused head / floor (Triton GEMM at {fused[0].fused_rate:.0%}) |", rule + "---:|"
    lines = ["| shape | mode | chunk | predicted ms | floor ms | ours / floor | with overlap |" + extra,
             "|---|---|---:|---:|---:|---:|---:|" + rule]
    for i, p in enumerate(preds):
        row = (f"| {p.shape.name} | {p.mode} | {p.chunk_size} | {p.total_s * 1e3:.2f} | {p.floor_s * 1e3:.2f} "
               f"| {p.ratio:.3f} | {p.overlap_ratio:.3f} |")
        row += f" {two_pass[i].ratio:.3f} |" if two_pass else ""
        row += f" {fused[i].ratio:.3f} |" if fused else ""
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="GEMM peak, TFLOP/s (default 700)")
    parser.add_argument("--tbps", type=float, default=DEFAULT_TBPS, help="memory bandwidth, TB/s (default 3.0)")
    parser.add_argument("--shape", action="append", help="N,H,V[,dtype[,softcap]] (repeatable); default: "
                        "the GPU benchmark shapes of bench/shapes.py")
    parser.add_argument("--steps", action="store_true", help="print the step table of every shape and mode")
    parser.add_argument("--two-pass", action="store_true", help="also price the two-pass row kernel "
                        "(factored=False): a column in the table, and its step tables with --steps")
    parser.add_argument("--fused", type=float, nargs="?", const=1.0, metavar="RATE",
                        help="also price the fused head (fused_head=True) with its Triton GEMM at RATE "
                        "times the peak (default 1.0: as fast as cuBLAS; an assumption until measured)")
    args = parser.parse_args(argv)
    from .shapes import parse_shape

    shapes = [parse_shape(s) for s in args.shape] if args.shape else GPU_SHAPES
    preds = [predict(s, fast, args.tflops, args.tbps) for s in shapes for fast in (False, True)]
    two = None
    if args.two_pass:
        two = [predict(s, fast, args.tflops, args.tbps, factored=False) for s in shapes for fast in (False, True)]
    fused = None
    if args.fused is not None:
        fused = [predict(s, fast, args.tflops, args.tbps, fused_rate=args.fused) for s in shapes
                 for fast in (False, True)]
    print(f"PREDICTIONS (roofline model, nothing measured): {args.tflops:g} TFLOP/s, {args.tbps:g} TB/s\n")
    print(summary_table(preds, two, fused))
    if args.steps:
        for p in preds + (two or []) + (fused or []):
            print()
            print(step_table(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
