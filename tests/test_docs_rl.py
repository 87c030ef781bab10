"""The RL recipes of docs/rl.md (GRPO, CISPO, CHORD on top of ``dk.linear_logprobs``) run as written:
each Python block is executed on small float32 inputs with the library, and again on float64 copies
with the materialising float64 reference in place of ``dk.linear_logprobs``; the gradients the block's
own ``backward()`` leaves on ``hidden`` and ``lm_head.weight`` must agree (float32 bound, docs/design.md,
Tests).  So a recipe that stops running or computes something else than its formula fails here."""

from __future__ import annotations

import pathlib
import re
import types

import pytest
import torch

import dft_kernels as dk
from dft_kernels import reference
from helpers import TOL, rel_err

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "rl.md"
SECTIONS = ("GRPO on top of it", "CISPO on top of it", "CHORD: DFT-weighted SFT tokens")
B, T, H, V = 3, 9, 16, 97


def _block(heading: str) -> str:
    """The first ```python block after the ``## heading`` line of docs/rl.md."""
    text = DOC.read_text()
    start = text.index(f"## {heading}")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"docs/rl.md: no python block after '## {heading}'"
    return match.group(1)


def _namespace(dtype: torch.dtype, linear_logprobs, seed: int) -> dict:
    """Every name the recipes read, with fixed values in ``dtype`` (the same values for each dtype)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    input_ids = torch.randint(0, V, (B, T), generator=g)
    response_mask = torch.rand(B, T, generator=g) < 0.7
    response_mask[:, 0] = False  # the prompt
    old_logp = -torch.rand(B, T - 1, generator=g, dtype=torch.float64) * 3
    ref_logp = -torch.rand(B, T - 1, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    is_sft = torch.tensor([True, False, True])
    t_rows = torch.where(is_sft, 1.0, 0.7)[:, None].to(torch.float64)
    lm_head = types.SimpleNamespace(weight=weight.to(dtype).requires_grad_())
    return dict(
        torch=torch, dk=types.SimpleNamespace(linear_logprobs=linear_logprobs),
        hidden=hidden.to(dtype).requires_grad_(), lm_head=lm_head, input_ids=input_ids,
        response_mask=response_mask, labels=input_ids.masked_fill(~response_mask, -100),
        T=0.7, T_rows=t_rows.to(dtype), old_logp=old_logp.to(dtype), ref_logp=ref_logp.to(dtype),
        adv=adv.to(dtype), is_sft=is_sft, eps=0.2, eps_low=0.2, eps_high=0.28, beta=0.04, ent_coef=0.01,
        mu=0.3,
    )


@pytest.mark.parametrize("heading", SECTIONS)
def test_recipe_runs_and_matches_the_reference(backend, heading):
    code = _block(heading)
    ours = _namespace(torch.float32, lambda *a, **k: dk.linear_logprobs(*a, backend=backend, **k), seed=0)
    ref = _namespace(torch.float64, reference.linear_logprobs, seed=0)
    exec(compile(code, f"docs/rl.md ({heading})", "exec"), ours)
    exec(compile(code, f"docs/rl.md ({heading})", "exec"), ref)
    grads = {"hidden": lambda ns: ns["hidden"].grad, "lm_head.weight": lambda ns: ns["lm_head"].weight.grad}
    for name, get in grads.items():
        got, want = get(ours), get(ref)
        assert got is not None and want is not None, f"{heading}: the block left no gradient on {name}"
        assert want.abs().max() > 0, f"{heading}: a zero reference gradient on {name} checks nothing"
        err = rel_err(got, want)
        assert err <= TOL[torch.float32], f"{heading}: {name} rel err {err:.2e}"
