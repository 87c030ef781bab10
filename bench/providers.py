"""The providers compared in one run: ours per backend, PyTorch baselines, peers, the GEMM floor.

Every provider computes the same thing on the same :class:`~bench.inputs.Inputs`: the
mean DFT loss ``sum_i sg(p_i) * -log p_i / #valid`` of the logits ``x w^T`` (softcapped
when the shape has a softcap), with gradients to ``x`` and ``w``.  Peers without a DFT
option get the weight applied to their per-token CE: ``l = -log p``, ``p = exp(-l).detach()``,
``loss = sum(p * l) / #valid``.  The floor is only the three bare GEMMs of the shape.

A provider's ``build(inputs, device)`` returns a :class:`Runner` or raises :class:`Skip`
with the reason (not installed, not available on this device, unsupported option).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import dft_kernels as dk
from dft_kernels.backends import BACKENDS, resolve_backend

from .check import Result, capture
from .inputs import IGNORE_INDEX, Inputs


class Skip(Exception):
    """The provider cannot run here; the message is the reason shown in the results."""


class Runner:
    """One provider bound to one set of inputs.

    ``loss()`` is the forward (returns the 0-d loss); ``step()`` is forward + backward,
    leaving the gradients in ``x.grad``/``w.grad`` and returning the detached loss.
    """

    def __init__(self, inputs: Inputs, loss_fn: Callable[[Inputs], Tensor]):
        self.inputs = inputs
        self.loss_fn = loss_fn

    def loss(self) -> Optional[Tensor]:
        return self.loss_fn(self.inputs)

    def step(self) -> Optional[Tensor]:
        self.inputs.clear_grads()
        loss = self.loss_fn(self.inputs)
        loss.backward()
        return loss.detach()

    def checked_step(self) -> Result:
        """One fwd+bwd for the loss check: the loss and the full ``dx``/``dW``."""
        return capture(self.step(), self.inputs.x, self.inputs.w)

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients this provider must return (not counted as extra memory)."""
        return self.inputs.grad_bytes


class FloorRunner(Runner):
    """The three GEMMs of a training step, in the input dtype: ``z = x W^T``,
    ``dx = dz W``, ``dW = dz^T x`` (``z`` stands in for ``dz``).  Forward is the first one."""

    def __init__(self, inputs: Inputs):
        super().__init__(inputs, None)

    def loss(self) -> None:
        x, w = self.inputs.x.detach(), self.inputs.w.detach()
        torch.mm(x, w.t())

    def step(self) -> None:
        x, w = self.inputs.x.detach(), self.inputs.w.detach()
        dz = torch.mm(x, w.t())
        torch.mm(dz, w)
        torch.mm(dz.t(), x)


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str          # "ours" | "baseline" | "peer" | "floor" (only "floor" is not loss-checked)
    build: Callable[[Inputs, torch.device], Runner]
    note: str = ""
    requires: tuple[str, str] = ()  # (import name, pip distribution) of an optional package it needs

    @property
    def checked(self) -> bool:
        return self.kind != "floor"


def dft_from_token_nll(nll: Tensor, target: Tensor) -> Tensor:
    """Mean DFT loss from a per-token NLL vector (zeros at ignored positions)."""
    nll = nll.float()
    p = torch.exp(-nll).detach()
    return (p * nll).sum() / (target != IGNORE_INDEX).sum().clamp_min(1)


def eager_dft(x: Tensor, w: Tensor, t: Tensor, softcap: Optional[float]) -> Tensor:
    """DFT the way a plain PyTorch training loop writes it: full logits, upcast to fp32."""
    logits = F.linear(x, w).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    nll = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
    return dft_from_token_nll(nll, t)


# ---------------------------------------------------------------- ours

def _require_backend(backend: str, device: torch.device) -> None:
    try:
        resolve_backend(backend, device)
    except ValueError as exc:
        raise Skip(str(exc)) from None


def ours(backend: str, suffix: str = "", **options) -> Provider:
    """Ours with ``options`` (none: the defaults), named ``ours[backend]`` + ``suffix``."""
    def build(inp: Inputs, device: torch.device) -> Runner:
        _require_backend(backend, device)
        return Runner(inp, lambda i: dk.linear_cross_entropy(i.x, i.w, i.t, objective="dft", softcap=i.softcap,
                                                             ignore_index=IGNORE_INDEX, backend=backend, **options))
    note = ", ".join(f"{k}={v}" for k, v in options.items()) or "dft_kernels at default settings"
    return Provider(f"ours[{backend}]{suffix}", "ours", build, note)


def ours_fast(backend: str, **options) -> Provider:
    """Ours in the fast mode: 16-bit chunk logits (``logits_dtype`` = the input dtype)."""
    def build(inp: Inputs, device: torch.device) -> Runner:
        _require_backend(backend, device)
        if inp.x.dtype not in (torch.bfloat16, torch.float16):
            raise Skip(f"the fast mode is for 16-bit inputs; this shape is {inp.x.dtype}")
        return Runner(inp, lambda i: dk.linear_cross_entropy(i.x, i.w, i.t, objective="dft", softcap=i.softcap,
                                                             ignore_index=IGNORE_INDEX, backend=backend,
                                                             logits_dtype=i.x.dtype, **options))
    note = "; ".join(["logits_dtype = the 16-bit input dtype"] + [f"{k}={v}" for k, v in options.items()])
    return Provider(f"ours[{backend}] fast", "ours", build, note)


def ours_two_pass(backend: str, fast: bool = False) -> Provider:
    """Ours with the two-pass row kernel (``factored=False``): the factored gradient's
    side-by-side control."""
    inner = (ours_fast if fast else ours)(backend, factored=False)
    return Provider(f"{inner.name} two-pass", "ours", inner.build, inner.note)


def liger_chunk_size(n: int, h: int, v: int) -> int:
    """Liger's token-chunk size: the next power of two >= ceil(N / ceil(V / H))."""
    inc = -(-v // h)
    rows = max(1, -(-n // inc))
    return 1 << (rows - 1).bit_length()


def ours_liger_config(backend: str) -> Provider:
    """Ours with Liger's settings: dW accumulated in the weight dtype, Liger's chunk size."""
    def build(inp: Inputs, device: torch.device) -> Runner:
        _require_backend(backend, device)
        chunk = liger_chunk_size(inp.x.shape[0], inp.x.shape[1], inp.w.shape[0])
        return Runner(inp, lambda i: dk.linear_cross_entropy(
            i.x, i.w, i.t, objective="dft", softcap=i.softcap, ignore_index=IGNORE_INDEX, backend=backend,
            accum_dtype=None, chunk_size=chunk))
    return Provider(f"ours[{backend}] liger-cfg", "ours", build, "accum_dtype=None, Liger's chunk size")


# ---------------------------------------------------------------- PyTorch baselines

def _eager(inp: Inputs, device: torch.device) -> Runner:
    return Runner(inp, lambda i: eager_dft(i.x, i.w, i.t, i.softcap))


def _compiled(inp: Inputs, device: torch.device) -> Runner:
    compiled = torch.compile(eager_dft, dynamic=False)
    return Runner(inp, lambda i: compiled(i.x, i.w, i.t, i.softcap))


def _torch_chunked(inp: Inputs, device: torch.device) -> Runner:
    # the op's own limit first: a softcap shape gives the same reason on every torch release
    if inp.softcap is not None:
        raise Skip("F.linear_cross_entropy has no logit softcap")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_cls is None or not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy (needs torch >= 2.13)")
    options = options_cls()

    def loss(i: Inputs) -> Tensor:
        nll = F.linear_cross_entropy(i.x, i.w, i.t, reduction="none", ignore_index=IGNORE_INDEX, options=options)
        return dft_from_token_nll(nll, i.t)
    return Runner(inp, loss)


# ---------------------------------------------------------------- peers

def _import_peer(module: str, dist: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a peer that fails at import on this machine
        raise Skip(f"{dist} not installed or not importable: {type(exc).__name__}: {exc}"
                   f" (pip install {dist})") from None


LIGER_PACKAGE = ("liger_kernel", "liger-kernel")
CCE_PACKAGE = ("cut_cross_entropy", "cut-cross-entropy")


def _require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} runs Triton GPU kernels and needs a CUDA device; this run is on {device.type}")


def _liger(inp: Inputs, device: torch.device) -> Runner:
    mod = _import_peer("liger_kernel.transformers", LIGER_PACKAGE[1])
    _require_cuda(device, "Liger-Kernel")
    loss_fn = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, softcap=inp.softcap,
                                                   reduction="mean", use_token_scaling=True)
    return Runner(inp, lambda i: loss_fn(i.w, i.x, i.t))


def _cce(inp: Inputs, device: torch.device) -> Runner:
    mod = _import_peer(*CCE_PACKAGE)
    _require_cuda(device, "Cut Cross-Entropy")

    def loss(i: Inputs) -> Tensor:
        nll = mod.linear_cross_entropy(i.x, i.w, i.t, ignore_index=IGNORE_INDEX, softcap=i.softcap,
                                       reduction="none")
        return dft_from_token_nll(nll, i.t)
    return Runner(inp, loss)


def _floor(inp: Inputs, device: torch.device) -> Runner:
    return FloorRunner(inp)


EAGER = Provider("torch eager", "baseline", _eager, "materialised logits, fp32 upcast, F.cross_entropy")
COMPILED = Provider("torch.compile", "baseline", _compiled, "torch.compile of the eager code")
TORCH_CHUNKED = Provider("torch chunked", "baseline", _torch_chunked,
                         "F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()) + DFT weight")
LIGER = Provider("liger", "peer", _liger, "LigerFusedLinearCrossEntropyLoss(use_token_scaling=True)",
                 requires=LIGER_PACKAGE)
CCE = Provider("cce", "peer", _cce, "cut_cross_entropy.linear_cross_entropy(reduction='none') + DFT weight",
               requires=CCE_PACKAGE)
FLOOR = Provider("gemm floor", "floor", _floor, "x W^T, dz W, dz^T x in the input dtype")


PREVIOUS_CPU_CHUNK_BYTES = 1 << 28


def default_providers(device: torch.device) -> list[Provider]:
    """Every provider, ours first (the first of ours that runs is the loss-check reference)."""
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch", "triton", "cuda")
    provs = [ours(b) for b in order if b in BACKENDS]
    provs.append(ours_fast(order[0]))
    if order[0] == "triton":  # the backend with a factored gradient: its two-pass control beside
        provs += [ours_two_pass("triton"), ours_two_pass("triton", fast=True)]
    if device.type == "cpu":  # the CPU chunk budget before it became 128 MiB: its side-by-side control
        provs.append(ours("torch", " 256MiB chunks", chunk_bytes=PREVIOUS_CPU_CHUNK_BYTES))
    provs.append(ours_liger_config(order[0]))
    provs += [EAGER, COMPILED, TORCH_CHUNKED, LIGER, CCE, FLOOR]
    return provs


def select(providers: list[Provider], names: Optional[list[str]]) -> list[Provider]:
    """Keep the providers whose name is in ``names`` (all when None); unknown names raise."""
    if not names:
        return providers
    known = {p.name: p for p in providers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {list(known)}")
    return [p for p in providers if p.name in names]
