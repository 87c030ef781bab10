"""Shared test helpers: fresh random inputs, relative errors, tolerances (docs/design.md, Tests)."""

from __future__ import annotations

import re

import torch

import dft_kernels as dk

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Objectives with non-default parameters too, so every parameter path is exercised.  EAFT: the exact
# entropy with normalizer log(V) (every backend), and LLaMA-Factory's top-20 entropy over 3.0 with
# another alpha (the torch backend; the triton and cuda backends decline it, see check_linear_against_reference).
OBJECTIVES = [
    "ce", "dft", dk.DFT(min_weight=0.1), dk.Power(alpha=0.5), "focal", dk.Focal(gamma=0.5),
    "chord", "prob", dk.Prob(k=2.0), "entropy", dk.Entropy(scale=0.5),
    "eaft", dk.EAFT(alpha=0.5, top_k=20, normalizer=3.0),
]
WEIGHTED_NLL = ["ce", "dft", dk.Power(alpha=0.5), "chord", "entropy"]


# Loss options the correctness suites cross with every objective (values: kwargs, or a tag
# for arguments that need fresh tensors shaped like the target; see option_kwargs).
LOSS_OPTIONS = {
    "softcap": dict(softcap=3.0),
    "z_loss": dict(z_loss=1e-3),
    "label_smoothing": dict(label_smoothing=0.1),
    "smooth+zloss+softcap": dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0),
    "token_weights": "tw",
    "shift": dict(shift=True),
    "num_items": dict(num_items_in_batch=23),
    "num_items_tensor": "nit",
}
SMOOTHING_OPTIONS = ("z_loss", "label_smoothing", "smooth+zloss+softcap")


def option_kwargs(options: dict, name: str, t: torch.Tensor) -> dict:
    opt = options[name]
    if opt == "tw":
        return dict(token_weights=torch.rand(t.shape, dtype=torch.float32) * 2)
    if opt == "nit":
        return dict(num_items_in_batch=torch.tensor(19))
    return dict(opt)


def option_cases(options: dict) -> list:
    """Every objective x option x reduction that is defined (focal/prob reject smoothing and
    z-loss, num_items_in_batch rejects reduction='none': both are tested in test_errors)."""
    import pytest

    cases = []
    for objective in OBJECTIVES:
        for option in options:
            if option in SMOOTHING_OPTIONS and not dk.get_objective(objective).is_weighted_nll:
                continue
            for reduction in ("mean", "none"):
                if option.startswith("num_items") and reduction == "none":
                    continue
                cases.append(pytest.param(objective, option, reduction,
                                          id=f"{obj_id(objective)}-{option}-{reduction}"))
    return cases


def obj_id(obj) -> str:
    return obj if isinstance(obj, str) else repr(obj)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


def make_inputs(n, h, v, dtype=torch.float32, *, bias=True, ignore="some", seed=None, lead=None,
                ignore_index=-100, generator_device="cpu", device=None, ignore_fraction=0.25):
    """Random hidden states, head weight, bias and targets with logits of std ~2 (the suite's one
    input helper).  Drawn in float64 on ``generator_device``; with ``device`` (a GPU-sized head) drawn
    there in float32 instead, so that no float64 copy of it exists."""
    work = torch.float64 if device is None else torch.float32
    g = torch.Generator(device=generator_device if device is None else device)
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    gen = dict(generator=g, device=g.device)
    shape = lead if lead is not None else (n,)
    x = torch.randn(*shape, h, dtype=work, **gen)
    w = torch.randn(v, h, dtype=work, **gen) * (2.0 / h ** 0.5)
    b = torch.randn(v, dtype=work, **gen) * 0.5 if bias else None
    t = torch.randint(0, v, shape, **gen)
    if ignore == "some":
        mask = torch.rand(shape, **gen) < ignore_fraction
        t[mask] = ignore_index
    elif ignore == "all":
        t.fill_(ignore_index)
    cast = lambda a: None if a is None else a.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), t


def declined(backend: str, objective) -> str:
    """Why ``backend``'s row kernel does not run ``objective`` (its ``supports("rows", ...)``), or ""
    ("auto" declines nothing: it plans the backends that run the call)."""
    from dft_kernels.backends import BACKENDS, get_backend
    from dft_kernels.options import make_loss_params

    if backend not in BACKENDS:
        return ""
    return get_backend(backend).supports("rows", make_loss_params(objective))


def skip_if_declined(backend: str, objective) -> None:
    """Skip a test of ``backend`` on an objective it declines, with the backend's reason."""
    import pytest

    reason = declined(backend, objective)
    if reason:
        pytest.skip(f"the {backend} backend declines {obj_id(objective)}: {reason}")


def leaf(a):
    return None if a is None else a.detach().clone().requires_grad_(True)


def device_of(backend: str) -> torch.device:
    """Where a test of ``backend`` puts its tensors: the GPU for the cuda backend, else the CPU (the
    torch backend, and the triton one under the interpreter)."""
    return torch.device("cuda", 0) if backend == "cuda" else torch.device("cpu")


def check_linear_against_reference(x, w, b, t, dtype, *, backend="torch", chunk_size=16, check_grads=True,
                                   device=None, **kwargs):
    """Run ours in ``dtype`` and the reference in float64 on the same values; assert the tolerances of
    docs/design.md, Tests.

    ``device`` (default: the GPU for the cuda backend, else where the inputs are) moves the inputs,
    targets and token weights there first; the reference runs on that device too.  Where the backend
    declines the objective (``supports``), the call must raise a ValueError with its reason; the test
    is then skipped with it."""
    import pytest

    tol = TOL[dtype]
    reason = declined(backend, kwargs.get("objective", "dft"))
    if reason:
        with pytest.raises(ValueError, match=re.escape(reason)):
            dk.linear_cross_entropy(x.to(dtype), w.to(dtype), t, bias=None if b is None else b.to(dtype),
                                    backend=backend, chunk_size=chunk_size, **kwargs)
        pytest.skip(f"the {backend} backend declines {obj_id(kwargs['objective'])} (and says why): {reason}")
    if device is None and backend == "cuda":
        device = device_of(backend)
    if device is not None:
        x, w, b, t = (None if a is None else a.to(device) for a in (x, w, b, t))
        if isinstance(kwargs.get("token_weights"), torch.Tensor):
            kwargs["token_weights"] = kwargs["token_weights"].to(device)
    xs, ws, bs = leaf(x.to(dtype)), leaf(w.to(dtype)), leaf(None if b is None else b.to(dtype))
    xr, wr, br = leaf(xs.double()), leaf(ws.double()), leaf(None if bs is None else bs.double())
    out = dk.linear_cross_entropy(xs, ws, t, bias=bs, backend=backend, chunk_size=chunk_size, **kwargs)
    ref = dk.reference.linear_cross_entropy(xr, wr, t, bias=br, **kwargs)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= tol, f"loss rel err {err:.3e} > {tol}"
    if not check_grads:
        return
    grad_out = torch.rand(ref.shape, dtype=torch.float64, device=ref.device) + 0.5  # fresh, never all ones
    if dtype == torch.float16:
        # fp16 training runs with a loss scale (GradScaler); without one, gradients this small
        # underflow float16 itself, whatever computes them.  Per-token (sum/none) gradients
        # are ~N times larger than mean ones, so they get a smaller scale, as a GradScaler would.
        grad_out = grad_out * (2.0 ** 14 if kwargs.get("reduction", "mean") == "mean" else 2.0 ** 8)
    ins = [a for a in (xs, ws, bs) if a is not None]
    refs = [a for a in (xr, wr, br) if a is not None]
    grads = torch.autograd.grad(out, ins, grad_out.to(out.dtype))
    rgrads = torch.autograd.grad(ref, refs, grad_out)
    for name, g, rg, a in zip(("input", "weight", "bias"), grads, rgrads, ins):
        assert g.dtype == a.dtype and g.shape == a.shape
        assert torch.isfinite(g).all()
        if rg.norm() == 0:
            assert g.abs().max() == 0, f"{name} grad should be exactly zero"
            continue
        e = rel_err(g, rg)
        if e > tol and dtype == torch.float32:
            # A float32 gradient summed over a long vocabulary row can sit at the fixed bound
            # whatever computes it (the dX GEMM rounds V terms).  Then the bar is eager
            # PyTorch's own float32 error on the same values: ours may not exceed 3x it.
            e_eager = _eager_grad_err(name, x, w, b, t, grad_out, rg, **kwargs)
            assert e <= 3.0 * e_eager, f"{name} grad rel err {e:.3e} > {tol} and > 3x eager float32 {e_eager:.3e}"
            continue
        assert e <= tol, f"{name} grad rel err {e:.3e} > {tol}"


def _eager_grad_err(name, x, w, b, t, grad_out, rg, **kwargs) -> float:
    """Relative error of the materialising reference run in float32 (eager PyTorch's error)."""
    xe, we, be = leaf(x.float()), leaf(w.float()), leaf(None if b is None else b.float())
    ref32 = dk.reference.linear_cross_entropy(xe, we, t, bias=be, **kwargs)
    ins = {"input": xe, "weight": we, "bias": be}
    g32 = torch.autograd.grad(ref32, [ins[name]], grad_out.to(ref32.dtype))[0]
    return rel_err(g32, rg)


def cublas_mm_out_dtype(a, b, out_dtype, *, out=None, accumulate=False):
    """``torch.mm``/``torch.addmm`` with ``out_dtype=float32`` (an entry of
    ``dft_kernels.options.MM_OUT_DTYPE``) for 16-bit ``a``, ``b`` as cuBLAS computes them: the
    products of 16-bit numbers are exact in float32 and are summed in float32.  Computed in 128 x 128 blocks so that the
    emulation itself makes no temporary the size of an operand or of ``out`` (the recorder of
    tests/test_memory.py sees them)."""
    assert a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype and out_dtype == torch.float32
    if out is None:
        out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    step = 128
    for s in range(0, a.shape[0], step):
        for c in range(0, b.shape[1], step):
            block = torch.zeros((a[s:s + step].shape[0], b[:, c:c + step].shape[1]), dtype=torch.float32,
                                device=a.device)
            for k in range(0, a.shape[1], step):
                block += a[s:s + step, k:k + step].to(torch.float32) @ b[k:k + step, c:c + step].to(torch.float32)
            if accumulate:
                out[s:s + step, c:c + step] += block
            else:
                out[s:s + step, c:c + step] = block
    return out
