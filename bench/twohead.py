"""The two-head suite (``python -m bench --two-heads``): ASFT (DFT anchored to a frozen reference head)
and distillation (a student head against a frozen teacher head), docs/objectives.md.

Each suite runs on its own copy of the shape, named ``asft ...`` / ``distill ...``, with
:class:`TwoHeadInputs`: the trained head's ``x [N, H]``, ``w [V, H]`` (leaves that require grad),
the targets ``t`` (~5% ignored), and the frozen second head's ``ref_x``, ``ref_w`` (no grad):
the trained head's values plus independent noise, so the two distributions are close but not equal,
as a reference model or a teacher's are.  The second head is made before any measurement, so it is
an input, not extra memory.

ASFT (LLaMA-Factory's ``use_asft_loss``): the causal shift (position ``i`` predicts ``t[i + 1]``),
mean DFT over the valid tokens plus ``KL_COEF`` times the mean forward KL ``KL(pi_ref || pi_theta)``
over the same tokens.  Distillation (TRL GKD's ``generalized_jsd_loss``): the generalized JSD at
``BETA`` and ``TEMPERATURE`` per valid token, mean over the valid tokens (TRL's ``batchmean``), no
shift (TRL's function takes logits already aligned with the labels).

Providers: ours per backend; ``eager`` (both heads' whole logits in float32, the formula written
here); the peers' own functions on the same materialised float32 logits where installed
(LLaMA-Factory's ``asft_loss_func``, TRL's ``GKDTrainer.generalized_jsd_loss``); and the GEMM floor:
both heads' logits GEMMs forward plus the trained head's two backward GEMMs.  Every provider's loss and
gradients (``x``, ``w``) are checked against the first (ours) before it is timed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import dft_kernels as dk

from .inputs import IGNORE_INDEX, Inputs, make_inputs
from .providers import FloorRunner, Provider, Runner, Skip, _import_peer, _require_backend
from .shapes import Shape

KL_COEF = 0.1        # LLaMA-Factory's default asft_alpha
BETA = 0.5           # TRL GKD's default beta
TEMPERATURE = 1.0    # what GKD's compute_loss passes
REF_NOISE = 0.5      # the second head = the trained head's values + this much independent noise (relative)

SUITES = ("asft", "distill")

# GPU: the Llama-3-8B head at N 4096, bf16 (both heads the same size).  CPU: the RL suite's CPU shape.
TWOHEAD_GPU_SHAPES = [Shape("Llama-3-8B", 4096, 4096, 128256, "bf16")]
TWOHEAD_CPU_SHAPES = [Shape("cpu", 1024, 256, 32000, "fp32")]

LLAMAFACTORY_PACKAGE = ("llamafactory", "llamafactory")
TRL_PACKAGE = ("trl", "trl")


@dataclass
class TwoHeadInputs(Inputs):
    """:class:`~bench.inputs.Inputs` plus the frozen second head: ``ref_x [N, H]``, ``ref_w [V, H]``
    (the reference model's or the teacher's hidden states and head), which require no grad."""

    ref_x: Optional[Tensor] = None
    ref_w: Optional[Tensor] = None


def make_two_head_inputs(shape: Shape, device: torch.device, seed: int = 0) -> TwoHeadInputs:
    """Deterministic in ``seed``: :func:`~bench.inputs.make_inputs` for the trained head, and the
    second head = the same values plus ``REF_NOISE`` times independent noise of their scale."""
    base = make_inputs(shape, device, seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1)
    x, w = base.x.detach().float(), base.w.detach().float()
    ref_x = x + REF_NOISE * torch.randn(x.shape, generator=g, device=device)
    ref_w = w + REF_NOISE * w.std() * torch.randn(w.shape, generator=g, device=device)
    dt = shape.torch_dtype
    return TwoHeadInputs(base.x, base.w, base.t, base.softcap, ref_x.to(dt), ref_w.to(dt))


def suite_shape(suite: str, shape: Shape) -> Shape:
    """The shape as one suite's rows name it: ``asft <model> N.. H.. V..``."""
    return dataclasses.replace(shape, model=f"{suite} {shape.model}")


# ---------------------------------------------------------------- the formulas on materialised logits

def logits_pair(i: TwoHeadInputs) -> tuple[Tensor, Tensor]:
    """Both heads' whole logits, upcast to float32 (the reference's without a graph)."""
    z = F.linear(i.x, i.w).float()
    with torch.no_grad():
        zr = F.linear(i.ref_x, i.ref_w).float()
    if i.softcap is not None:
        z = i.softcap * torch.tanh(z / i.softcap)
        zr = i.softcap * torch.tanh(zr / i.softcap)
    return z, zr


def eager_asft(z: Tensor, zr: Tensor, t: Tensor, kl_coef: float = KL_COEF) -> Tensor:
    """ASFT on whole logits ``[N, V]``: shift, then mean over the valid tokens of
    ``-sg(p) log p`` plus ``kl_coef`` times the mean of ``sum_j q_j (log q_j - log pi_j)``."""
    z, zr, t = z[:-1], zr[:-1], t[1:]
    valid = t != IGNORE_INDEX
    count = valid.sum().clamp_min(1)
    nll = F.cross_entropy(z, t, ignore_index=IGNORE_INDEX, reduction="none")
    dft = (torch.exp(-nll).detach() * nll).sum() / count
    logq = torch.log_softmax(zr, dim=-1)
    kl = (logq.exp() * (logq - torch.log_softmax(z, dim=-1))).sum(-1)
    return dft + kl_coef * torch.where(valid, kl, 0.0).sum() / count


def eager_gjsd(z: Tensor, zr: Tensor, t: Tensor, beta: float = BETA, temperature: float = TEMPERATURE) -> Tensor:
    """Generalized JSD of student ``z`` to teacher ``zr`` on whole logits, mean over the valid tokens:
    ``beta KL(teacher || m) + (1 - beta) KL(student || m)`` with ``m = (1 - beta) student + beta teacher``
    (``beta`` 0 and 1: the plain KLs, teacher || student and student || teacher)."""
    s = torch.log_softmax(z / temperature, dim=-1)
    r = torch.log_softmax(zr / temperature, dim=-1)
    if beta == 0:
        per = (r.exp() * (r - s)).sum(-1)
    elif beta == 1:
        per = (s.exp() * (s - r)).sum(-1)
    else:
        logm = torch.logaddexp(s + math.log1p(-beta), r + math.log(beta))
        per = beta * (r.exp() * (r - logm)).sum(-1) + (1 - beta) * (s.exp() * (s - logm)).sum(-1)
    valid = t != IGNORE_INDEX
    return torch.where(valid, per, 0.0).sum() / valid.sum().clamp_min(1)


# ---------------------------------------------------------------- providers

def _no_softcap(inp: Inputs, what: str) -> None:
    if inp.softcap is not None:
        raise Skip(f"{what} has no logit softcap")


def _require_path(backend: str, device: torch.device, path: str) -> None:
    """Skip when ``backend`` is not available on ``device`` or declines the two-head ``path``
    (``"anchor"`` or ``"distill"``) with its own reason, as ``backend="auto"`` would skip it."""
    _require_backend(backend, device)
    from dft_kernels.backends import get_backend

    reason = get_backend(backend).supports(path, None)
    if reason:
        raise Skip(f"backend {backend!r} declines the {path!r} path: {reason}")


def ours_asft(backend: str) -> Provider:
    def build(inp: TwoHeadInputs, device: torch.device) -> Runner:
        _require_path(backend, device, "anchor")
        return Runner(inp, lambda i: dk.linear_cross_entropy(
            i.x, i.w, i.t, objective="dft", softcap=i.softcap, ignore_index=IGNORE_INDEX, shift=True,
            ref_input=i.ref_x, ref_weight=i.ref_w, kl_coef=KL_COEF, kl="forward", backend=backend))
    return Provider(f"ours[{backend}]", "ours", build,
                    f"dk.linear_cross_entropy(objective='dft', shift=True, kl_coef={KL_COEF}, kl='forward', ref_*)")


def ours_distill(backend: str) -> Provider:
    def build(inp: TwoHeadInputs, device: torch.device) -> Runner:
        _require_path(backend, device, "distill")
        _no_softcap(inp, "dk.linear_distill")
        return Runner(inp, lambda i: dk.linear_distill(
            i.x, i.w, i.ref_x, i.ref_w, i.t, beta=BETA, temperature=TEMPERATURE, ignore_index=IGNORE_INDEX,
            backend=backend))
    return Provider(f"ours[{backend}]", "ours", build,
                    f"dk.linear_distill(beta={BETA}, temperature={TEMPERATURE})")


def _eager_asft(inp: TwoHeadInputs, device: torch.device) -> Runner:
    return Runner(inp, lambda i: eager_asft(*logits_pair(i), i.t))


def _eager_distill(inp: TwoHeadInputs, device: torch.device) -> Runner:
    _no_softcap(inp, "the distillation formula (as TRL's)")
    return Runner(inp, lambda i: eager_gjsd(*logits_pair(i), i.t))


def _llamafactory(inp: TwoHeadInputs, device: torch.device) -> Runner:
    mod = _import_peer("llamafactory.train.trainer_utils", LLAMAFACTORY_PACKAGE[1])
    fn = getattr(mod, "asft_loss_func", None)
    if fn is None:
        raise Skip("this llamafactory has no train.trainer_utils.asft_loss_func")
    _no_softcap(inp, "LLaMA-Factory's asft_loss_func")

    def loss(i: TwoHeadInputs) -> Tensor:
        # their function shifts [B, T, V] logits and [B, T] labels itself: one sequence of N tokens
        z, zr = logits_pair(i)
        return fn({"logits": z[None]}, i.t[None], zr[None], asft_alpha=KL_COEF)
    return Runner(inp, loss)


def trl_generalized_jsd() -> Callable:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd`` in TRL 1.x, ``trl.trainer``
    before); :class:`~bench.providers.Skip` when neither imports."""
    reasons = []
    for module in ("trl.experimental.gkd", "trl.trainer.gkd_trainer"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = _import_peer(module, TRL_PACKAGE[1])
        except Skip as exc:
            reasons.append(str(exc))
            continue
        trainer = getattr(mod, "GKDTrainer", None)
        if trainer is not None and hasattr(trainer, "generalized_jsd_loss"):
            return trainer.generalized_jsd_loss
        reasons.append(f"{module} has no GKDTrainer.generalized_jsd_loss")
    raise Skip("; ".join(reasons))


def _trl(inp: TwoHeadInputs, device: torch.device) -> Runner:
    fn = trl_generalized_jsd()
    _no_softcap(inp, "TRL's generalized_jsd_loss")

    def loss(i: TwoHeadInputs) -> Tensor:
        z, zr = logits_pair(i)
        return fn(z, zr, labels=i.t, beta=BETA, temperature=TEMPERATURE, reduction="batchmean")
    return Runner(inp, loss)


class TwoHeadFloorRunner(FloorRunner):
    """The GEMMs of a two-head step in the input dtype: both heads' logits ``z = x W^T``,
    ``z_ref = x_ref W_ref^T``, then the trained head's ``dx = dz W`` and ``dW = dz^T x`` (``z`` stands
    in for ``dz``).  Forward is the two logits GEMMs."""

    def loss(self) -> None:
        i = self.inputs
        torch.mm(i.x.detach(), i.w.detach().t())
        torch.mm(i.ref_x, i.ref_w.t())

    def step(self) -> None:
        i = self.inputs
        x, w = i.x.detach(), i.w.detach()
        dz = torch.mm(x, w.t())
        torch.mm(i.ref_x, i.ref_w.t())
        torch.mm(dz, w)
        torch.mm(dz.t(), x)


def _floor(inp: TwoHeadInputs, device: torch.device) -> Runner:
    return TwoHeadFloorRunner(inp)


EAGER_ASFT = Provider("eager asft", "baseline", _eager_asft,
                      "both heads' whole fp32 logits: shift, DFT mean + kl_coef * F.kl_div-style forward KL mean")
LLAMAFACTORY = Provider("llamafactory asft", "peer", _llamafactory,
                        f"llamafactory asft_loss_func(asft_alpha={KL_COEF}) on both heads' whole fp32 logits",
                        requires=LLAMAFACTORY_PACKAGE)
EAGER_DISTILL = Provider("eager gjsd", "baseline", _eager_distill,
                         "both heads' whole fp32 logits: generalized JSD, mean over valid tokens")
TRL = Provider("trl gjsd", "peer", _trl,
               "TRL GKDTrainer.generalized_jsd_loss(reduction='batchmean') on both heads' whole fp32 logits",
               requires=TRL_PACKAGE)
FLOOR = Provider("gemm floor", "floor", _floor,
                 "both heads' logits GEMMs + the trained head's dz W, dz^T x, in the input dtype")


def _backends(device: torch.device) -> list[str]:
    from dft_kernels.backends import BACKENDS

    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch", "triton", "cuda")
    return [b for b in order if b in BACKENDS]


def asft_providers(device: torch.device) -> list[Provider]:
    """Ours first (the loss-check reference), then the eager formula, LLaMA-Factory's, the floor."""
    return [ours_asft(b) for b in _backends(device)] + [EAGER_ASFT, LLAMAFACTORY, FLOOR]


def distill_providers(device: torch.device) -> list[Provider]:
    """Ours first (the loss-check reference), then the eager formula, TRL's, the floor."""
    return [ours_distill(b) for b in _backends(device)] + [EAGER_DISTILL, TRL, FLOOR]


SUITE_PROVIDERS = {"asft": asft_providers, "distill": distill_providers}


def two_head_providers(device: torch.device) -> list[Provider]:
    """Every provider of both suites, each name once (for ``--list`` and the dependency notes)."""
    seen, out = set(), []
    for suite in SUITES:
        for p in SUITE_PROVIDERS[suite](device):
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
    return out


def two_head_plan(device: torch.device, shapes: list[Shape], names: Optional[list[str]] = None,
                  suites: tuple[str, ...] = SUITES) -> list[tuple[Shape, list[Provider]]]:
    """``(suite shape, providers)`` for each suite and shape: the providers named in ``names`` (all
    when None; a name may belong to either suite or both); ValueError for a name in neither."""
    if names:
        known = {p.name for s in suites for p in SUITE_PROVIDERS[s](device)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; known: {sorted(known)}")
    plan = []
    for suite in suites:
        provs = SUITE_PROVIDERS[suite](device)
        if names:
            provs = [p for p in provs if p.name in names]
        if provs:
            plan += [(suite_shape(suite, s), provs) for s in shapes]
    return plan
