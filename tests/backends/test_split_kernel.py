"""The split row kernel (dft_kernels.backends.split) of each backend on one slice, in one process, against
its float64 definition: pass 1's partial statistics and pass 2's gradient.  The combine over ranks is
tested on real process groups in tests/vocab_parallel/test_vocab_parallel.py."""

import logging

import pytest
import torch

from dft_kernels.backends import split
from dft_kernels.backends.split import RowGradCoefficients, resolve_split_backend
from dft_kernels.objectives import get_objective
from dft_kernels.options import LossParams
from helpers import rel_err

CPU = torch.device("cpu")
START, LOCAL = 37, 300   # this slice is columns [37, 337) of a larger vocabulary
N = 12


def _params(objective="dft", softcap=None, smoothing=0.0, stats=True):
    return LossParams(get_objective(objective), -100, softcap, smoothing, 0.0, stats)


def _logits_and_target(dtype):
    z = torch.randn(N, LOCAL, dtype=torch.float64) * 2
    z[1, [5, 80, 299]] = z[1].max() + 1.0          # three tied maxima
    z[2, :] = 0.5                                   # all tied
    z = z.to(dtype)
    # in the slice (first column, last column, middle), before it, after it, ignored
    t = torch.tensor([START, START + 80, START + 5, START + LOCAL - 1, 0, START - 1, START + LOCAL, 5000, -100,
                      START + 150, START + 7, -100])
    return z, t


def _capped(z0, softcap):
    z = z0.double()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,objective,smoothing,stats", [
    (None, "dft", 0.0, True), (3.0, "entropy", 0.1, True), (None, "entropy", 0.0, False), (5.0, "ce", 0.2, False)])
def test_pass1_partial_stats(backend, dtype, softcap, objective, smoothing, stats):
    params = _params(objective, softcap, smoothing, stats)
    z0, t = _logits_and_target(dtype)
    before = z0.clone()
    got = resolve_split_backend(backend, CPU).partial_row_stats(z0, t, START, params)
    assert torch.equal(z0, before), "pass 1 must not modify the logits"

    z = _capped(z0, softcap)
    m = z.amax(1)
    e = torch.exp(z - m[:, None])
    assert rel_err(got.max, m) <= 1e-6
    assert rel_err(got.rest, e.sum(1) - 1.0) <= 1e-5
    owned = (t >= START) & (t < START + LOCAL)
    want_zy = torch.where(owned, z.gather(1, (t - START).clamp(0, LOCAL - 1)[:, None]).squeeze(1), 0.0)
    assert rel_err(got.target_logit, want_zy) <= 1e-6
    if params.needs_entropy:
        assert rel_err(got.spread, (e * (m[:, None] - z)).sum(1)) <= 1e-5
    else:
        assert got.spread is None
    if smoothing:
        assert rel_err(got.z_sum, z.sum(1)) <= 1e-5
    else:
        assert got.z_sum is None
    if stats:
        assert torch.equal(got.argmax, z.argmax(1) + START)  # the first maximum, as a global index
        assert int(got.argmax[1]) == START + 5 and int(got.argmax[2]) == START
    else:
        assert got.argmax is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap,smoothing", [(None, 0.0), (3.0, 0.1)])
def test_pass2_gradient(backend, dtype, softcap, smoothing):
    params = _params("dft", softcap, smoothing)
    z0, t = _logits_and_target(dtype)
    raw = z0.double()
    z = _capped(z0, softcap)
    big_m = z.amax(1) + torch.rand(N, dtype=torch.float64)  # the global max is at least this slice's
    k = RowGradCoefficients(
        max=big_m.float(), inv_sum=(1.0 / (1.0 + 5 * torch.rand(N, dtype=torch.float64))).float(),
        a=torch.rand(N).float() + 0.5, c=(torch.rand(N) * 1e-3).float() if smoothing else None,
        target_grad=-torch.rand(N).float(), scale=torch.where(t == -100, 0.0, torch.rand(N) + 0.5).float())
    resolve_split_backend(backend, CPU).row_grad(z0, t, START, params, k)

    d = {f: None if v is None else v.double() for f, v in k._asdict().items()}
    want = d["a"][:, None] * torch.exp(z - d["max"][:, None]) * d["inv_sum"][:, None]
    if smoothing:
        want = want - d["c"][:, None]
    owned = (t >= START) & (t < START + LOCAL)
    rows = torch.nonzero(owned).squeeze(1)
    want[rows, t[rows] - START] = d["target_grad"][rows]
    if softcap is not None:
        want = want / torch.cosh(raw / softcap) ** 2
    want = want * d["scale"][:, None]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(z0, want) <= tol
    assert torch.all(z0[t == -100] == 0), "ignored rows are written as zeros"


def test_resolve_split_backend_names():
    assert resolve_split_backend("torch", CPU).NAME == "torch"
    assert resolve_split_backend("auto", CPU).NAME == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_split_backend("cudnn", CPU)
    with pytest.raises(TypeError, match="backend"):
        resolve_split_backend(3, CPU)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        resolve_split_backend("cuda", CPU)  # as on one rank


def test_cuda_backend_falls_back_with_a_logged_reason(monkeypatch, caplog):
    """Where the CUDA backend is available it has no split kernel: the next one runs, and the log says why."""
    import dft_kernels.backends as backends

    real = backends._availability
    monkeypatch.setattr(split, "_row_backend_availability",
                        lambda name, device: (True, "") if name == "cuda" else real(name, device))
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="dft_kernels"):
        chosen = resolve_split_backend("cuda", CPU)
    assert chosen.NAME == "torch"
    assert "no vocab-parallel (split) row kernel" in caplog.text
