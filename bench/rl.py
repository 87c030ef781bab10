"""The RL suite (``python -m bench --rl``): per-token log-probs and entropy at the head, with gradients
through both (docs/rl.md).

Every provider computes, on the same :class:`~bench.inputs.Inputs` and at ``TEMPERATURE``, the
per-token ``logp = log softmax(x w^T / T)[t]`` and entropy ``H`` of ``softmax(x w^T / T)``, and the
scalar ``sum_i m_i (a_i logp_i + c_i H_i)`` with fixed per-token weights ``a`` (an advantage) and
``c`` (an entropy coefficient) and ``m`` the mask of the non-ignored targets, so the backward runs
through both outputs as a GRPO step with an entropy bonus does.  The loss check compares that
scalar and the gradients of ``x`` and ``w`` with the first provider (ours).  Peers without an
ignore index score every row (target clamped to 0) and are masked by ``m`` like the others.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

import dft_kernels as dk

from .inputs import IGNORE_INDEX, Inputs
from .providers import (
    FLOOR,
    LIGER_PACKAGE,
    Provider,
    Runner,
    Skip,
    _import_peer,
    _require_backend,
    _require_cuda,
)
from .shapes import Shape

TEMPERATURE = 0.7

# GPU: Qwen2.5-Math-1.5B's and Qwen2.5-7B's hidden sizes at V 151936, N 8192 (TRL #7244's case).
RL_GPU_SHAPES = [
    Shape("Qwen2.5-Math-1.5B", 8192, 1536, 151936, "bf16"),
    Shape("Qwen2.5-7B-H", 8192, 3584, 151936, "bf16"),
]
# Small enough for a 2-core CPU in about a minute per provider.
RL_CPU_SHAPES = [Shape("cpu-rl", 1024, 256, 32000, "fp32")]

PerToken = Callable[[Inputs], tuple[Tensor, Tensor]]


def upstream(inp: Inputs) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, c, m)``: fixed per-token weights of ``logp`` and ``H`` (the same for every provider of
    these inputs) and the float mask of the scored tokens."""
    g = torch.Generator(device=inp.x.device).manual_seed(1)
    n = inp.t.shape[0]
    a = torch.randn(n, generator=g, device=inp.x.device)
    c = 0.01 * torch.rand(n, generator=g, device=inp.x.device)
    return a, c, (inp.t != IGNORE_INDEX).float()


def rl_runner(inp: Inputs, per_token: PerToken) -> Runner:
    a, c, m = upstream(inp)

    def loss(i: Inputs) -> Tensor:
        logp, ent = per_token(i)
        return (m * (a * logp.float() + c * ent.float())).sum()
    return Runner(inp, loss)


def clamped_target(inp: Inputs) -> Tensor:
    return inp.t.clamp(min=0)


# ---------------------------------------------------------------- providers

def ours(backend: str) -> Provider:
    def build(inp: Inputs, device: torch.device) -> Runner:
        _require_backend(backend, device)
        return rl_runner(inp, lambda i: dk.linear_logprobs(i.x, i.w, i.t, temperature=TEMPERATURE,
                                                           ignore_index=IGNORE_INDEX, return_entropy=True,
                                                           backend=backend))
    return Provider(f"ours[{backend}]", "ours", build, "dk.linear_logprobs(return_entropy=True)")


def eager_logprobs(x: Tensor, w: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """A plain PyTorch RL step: full logits upcast to float32, log_softmax, gather, entropy."""
    z = (x @ w.t()).float() / TEMPERATURE
    logp = torch.log_softmax(z, dim=-1)
    ent = torch.logsumexp(z, dim=-1) - (logp.exp() * z).sum(-1)
    return logp.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), ent


def _eager(inp: Inputs, device: torch.device) -> Runner:
    return rl_runner(inp, lambda i: eager_logprobs(i.x, i.w, i.t))


TRL_PACKAGE = ("trl", "trl")
VERL_PACKAGE = ("verl", "verl")


def _trl(inp: Inputs, device: torch.device) -> Runner:
    kernels = _import_peer("trl.kernels", "trl")
    fn = getattr(kernels, "ChunkedLogProbFunction", None)
    if fn is None:
        raise Skip("this trl has no trl.kernels.ChunkedLogProbFunction (TRL >= 1.16)")
    params = inspect.signature(fn.forward).parameters
    if "outputs" not in params:
        raise Skip("this trl's ChunkedLogProbFunction has no outputs= (no entropy)")
    chunk = 32768   # TRL's own vocabulary chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in 1.16)

    def per_token(i: Inputs):
        out = fn.apply(i.x, i.w, None, clamped_target(i), TEMPERATURE, chunk, None, 1.0, ("log_probs", "entropy"))
        return out[0], out[1]
    return rl_runner(inp, per_token)


def _verl(inp: Inputs, device: torch.device) -> Runner:
    mod = _import_peer("verl.utils.experimental.torch_functional", "verl")
    head = mod.FusedLinearForPPO()   # its default token chunk (512)
    return rl_runner(inp, lambda i: head(i.x, i.w, clamped_target(i), temperature=TEMPERATURE))


def _liger(inp: Inputs, device: torch.device) -> Runner:
    mod = _import_peer("liger_kernel.transformers", LIGER_PACKAGE[1])
    _require_cuda(device, "Liger-Kernel")
    cls = mod.LigerFusedLinearCrossEntropyLoss
    if "return_entropy" not in inspect.signature(cls.__init__).parameters:
        raise Skip("this liger-kernel's LigerFusedLinearCrossEntropyLoss has no return_entropy")
    loss_fn = cls(ignore_index=IGNORE_INDEX, reduction="none", return_entropy=True)

    def per_token(i: Inputs):
        # Liger has no temperature: x / T gives the logits z / T (the gradient flows through the scaling)
        out = loss_fn(i.w, i.x / TEMPERATURE, i.t)
        entropy = getattr(out, "entropy", None)
        if entropy is None:
            raise RuntimeError("liger returned no per-token entropy")
        return -out.loss, entropy
    return rl_runner(inp, per_token)


EAGER = Provider("torch eager", "baseline", _eager, "materialised fp32 logits, log_softmax + entropy")
TRL = Provider("trl chunked", "peer", _trl, "trl.kernels.ChunkedLogProbFunction(outputs=(log_probs, entropy))",
               requires=TRL_PACKAGE)
VERL = Provider("verl torch", "peer", _verl, "verl FusedLinearForPPO (its torch path, chunk 512)",
                requires=VERL_PACKAGE)
LIGER = Provider("liger", "peer", _liger, "LigerFusedLinearCrossEntropyLoss(reduction='none', return_entropy=True)",
                 requires=LIGER_PACKAGE)


def rl_providers(device: torch.device) -> list[Provider]:
    """Ours first (the loss-check reference), then the baseline, the peers and the GEMM floor."""
    from dft_kernels.backends import BACKENDS

    order = ("triton", "torch") if device.type == "cuda" else ("torch", "triton")
    return [ours(b) for b in order if b in BACKENDS] + [EAGER, TRL, VERL, LIGER, FLOOR]
