"""Triton row kernel specifics, on CPU under TRITON_INTERPRET=1 (set by conftest without CUDA).

The shared suite (test_correctness.py etc.) runs the triton backend with its default launch
configuration, where V <= 65536 fits one block.  Here the block is forced small so that
pass 1's online merge (max, r, entropy term, argmax across blocks) runs, with one row per
program as on GPUs and with several rows per program and a ragged tail; plus the
numerics the kernel is built for (p ~ 1, ties at the max) and its availability rules.
"""

import pytest
import torch

import dft_kernels as dk
from helpers import OBJECTIVES, check_linear_against_reference, leaf, make_inputs, obj_id, rel_err, skip_if_declined

tb = pytest.importorskip("dft_kernels.backends.triton")

# CPU tensors throughout: these run under the interpreter only (off on GPU boxes)
pytestmark = pytest.mark.skipif(not tb.is_available(torch.device("cpu"))[0],
                                reason=f"triton backend on CPU tensors: {tb.is_available(torch.device('cpu'))[1]}")

# (ROWS, BLOCK, num_warps): one row per program as on GPUs, and 4 rows per program
SMALL_BLOCKS = {"rows1-block64": (1, 64, 4), "rows4-block128": (4, 128, 4)}


@pytest.fixture(params=list(SMALL_BLOCKS))
def small_blocks(request, monkeypatch):
    cfg = SMALL_BLOCKS[request.param]
    monkeypatch.setattr(tb, "block_config", lambda vocab_size, **flags: cfg)
    return cfg


def _options(objective):
    if dk.get_objective(objective).is_weighted_nll:
        return dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3)
    return dict(softcap=4.0)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=obj_id)
def test_multi_block_rows_against_reference(small_blocks, objective):
    """Every objective with every option, loss, stats and logits gradient, over many blocks."""
    skip_if_declined("triton", objective)
    n, v = 7, 300
    z = torch.randn(n, v, dtype=torch.float64) * 3
    t = torch.randint(0, v, (n,))
    t[2] = -100
    t[5] = z[5].argmax()  # a row whose target is its argmax: accuracy > 0
    tw = torch.rand(n) + 0.5
    kw = dict(objective=objective, token_weights=tw, return_stats=True, **_options(objective))
    for reduction in ("mean", "none"):
        zs, zr = leaf(z.float()), leaf(z.float().double())
        loss, stats = dk.cross_entropy(zs, t, backend="triton", reduction=reduction, chunk_size=8, **kw)
        ref, rstats = dk.reference.cross_entropy(zr, t, reduction=reduction, **kw)
        assert rel_err(loss, ref) <= 1e-5
        grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
        loss.backward(grad_out.float())
        ref.backward(grad_out)
        assert rel_err(zs.grad, zr.grad) <= 1e-5
        for field in ("nll", "mean_prob", "accuracy"):
            assert rel_err(getattr(stats, field), getattr(rstats, field)) <= 1e-5, field
        if dk.get_objective(objective).needs_entropy:
            assert rel_err(stats.entropy, rstats.entropy) <= 1e-5


@pytest.mark.parametrize("dtype,config", [(torch.bfloat16, "rows1-block64"), (torch.float16, "rows4-block128")],
                         ids=["bf16-rows1", "fp16-rows4"])
def test_multi_block_linear_low_precision(monkeypatch, dtype, config):
    monkeypatch.setattr(tb, "block_config", lambda vocab_size, **flags: SMALL_BLOCKS[config])
    x, w, b, t = make_inputs(19, 16, 300)
    check_linear_against_reference(x, w, b, t, dtype, backend="triton", objective="entropy", reduction="none",
                                   chunk_size=16, softcap=6.0, label_smoothing=0.05)


def test_multi_block_large_vocab():
    """V = 32001 (not a multiple of anything) in the default GPU block of 8192: 4 blocks."""
    x, w, b, t = make_inputs(5, 16, 32001, ignore="none")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "block_config", lambda vocab_size, **flags: (1, tb.MAX_BLOCK, 16))
        for objective in ("dft", "entropy"):
            check_linear_against_reference(x, w, b, t, torch.float32, backend="triton", objective=objective,
                                           reduction="sum", chunk_size=4)


def test_n256_v1000_default_launch():
    x, w, b, t = make_inputs(256, 32, 1000)
    for objective in ("dft", dk.Focal(gamma=0.5)):
        check_linear_against_reference(x, w, b, t, torch.float32, backend="triton", objective=objective,
                                       chunk_size=128)


@pytest.mark.parametrize("objective", ["ce", "dft", "chord", "focal"])
def test_confident_rows_keep_relative_accuracy(small_blocks, objective):
    """p ~ 1 - 1e-9: -logp ~ 1e-9 must keep its relative accuracy in float32 (lse = m + log1p(r)
    with r excluding the max's own 1; target gradient via expm1)."""
    n, v = 6, 300
    z = torch.randn(n, v, dtype=torch.float64)
    t = torch.randint(0, v, (n,))
    z[torch.arange(n), t] = 28.0 + torch.rand(n, dtype=torch.float64)
    zs, zr = leaf(z.float()), leaf(z.float().double())
    loss = dk.cross_entropy(zs, t, objective=objective, reduction="none", backend="triton")
    ref = dk.reference.cross_entropy(zr, t, objective=objective, reduction="none")
    assert (ref.abs() < 1e-8).all() and (ref.abs() > 0).all()
    assert rel_err(loss, ref) <= 1e-5
    loss.sum().backward()
    ref.sum().backward()
    target_grad, ref_target_grad = zs.grad[torch.arange(n), t], zr.grad[torch.arange(n), t]
    assert rel_err(target_grad, ref_target_grad) <= 1e-5
    assert rel_err(zs.grad, zr.grad) <= 1e-5


def test_ties_at_the_max_across_blocks(small_blocks):
    """Two maximal entries in different blocks: r counts the second one, argmax is the first."""
    v = 300
    z = torch.randn(4, v).clamp(max=3.0)
    z[:, 10] = 5.0
    z[:, 200] = 5.0
    t = torch.tensor([10, 200, 7, 10])
    loss, stats = dk.cross_entropy(z, t, objective="entropy", reduction="none", return_stats=True,
                                   backend="triton")
    ref, rstats = dk.reference.cross_entropy(z.double(), t, objective="entropy", reduction="none",
                                             return_stats=True)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(stats.entropy, rstats.entropy) <= 1e-5
    assert stats.accuracy.item() == rstats.accuracy.item() == 0.5  # rows 0 and 3, not row 1


def test_invalid_targets_give_zero_rows_and_no_out_of_bounds(small_blocks):
    """Targets == ignore_index, < 0 or >= V: zero loss and zero gradient rows; the rows next to
    them (a poisoned neighbour would show an out-of-bounds write) are untouched by them."""
    from dft_kernels.options import make_loss_params

    v = 200
    z = torch.randn(6, v) * 2
    t = torch.tensor([3, -100, -7, v, 10**9, 150])
    params = make_loss_params("dft", with_stats=True)
    logits = z.clone()
    out = tb.row_loss_grad(logits, t, params, None, torch.tensor(1.0))
    for i in (1, 2, 3, 4):
        assert out.loss[i] == 0 and out.nll[i] == 0 and out.prob[i] == 0 and out.correct[i] == 0
        assert (logits[i] == 0).all()
    ref_logits = z.double().clone()
    ref = dk.backends.get_backend("torch").row_loss_grad(ref_logits, t, params, None, torch.tensor(1.0))
    assert rel_err(out.loss, ref.loss) <= 1e-5 and rel_err(logits, ref_logits) <= 1e-5


def test_forward_only_leaves_logits_untouched():
    from dft_kernels.options import make_loss_params

    z = torch.randn(5, 100)
    logits = z.clone()
    tb.row_loss_grad(logits, torch.randint(0, 100, (5,)), make_loss_params("ce"))
    assert torch.equal(logits, z)


def test_block_config_rule():
    rows, block, _ = tb.block_config(1000)
    assert block == 1024 and rows * block <= tb.INTERPRETER_ELEMENTS
    assert tb.block_config(3)[1] >= 3
    assert tb.block_config(10**6)[1] in (tb.MAX_BLOCK, tb.MAX_BLOCK_INTERPRETER)


def test_block_config_rule_on_gpus(monkeypatch):
    """8 entries a thread up to 16 warps; half the block with a softcap, smoothing or z-loss
    (tests/backends/test_triton_codegen.py compiles these tiers: no spill within ``MAX_REGISTERS``)."""
    monkeypatch.setattr(tb, "_interpreting", lambda: False)
    assert tb.block_config(128256) == (1, tb.MAX_BLOCK, 16) == (1, 8192, 16)
    assert tb.block_config(128256, options=True) == (1, 4096, 16)
    assert [tb.block_config(v)[1:] for v in (3, 1000, 2000, 4000)] == [(16, 4), (1024, 4), (2048, 8), (4096, 16)]
    assert tb.block_config(2000, options=True) == tb.block_config(2000)


def test_availability_reasons():
    ok, reason = tb.is_available(torch.device("meta"))
    assert not ok and "CUDA" in reason
    assert tb.is_available(torch.device("cpu"))[0] == tb._interpreting()
    with pytest.raises(TypeError, match="logits"):
        tb.row_loss_grad(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                         dk.options.make_loss_params("ce"))


@pytest.mark.parametrize("v", [1, 2])
def test_smoothing_target_entry_tiny_vocab(v):
    """With V = 1 the smoothed CE gradient is exactly the z-loss term: the target entry must
    not be a difference of nearly equal terms."""
    z = torch.randn(5, v) * 3
    t = torch.zeros(5, dtype=torch.long)
    kw = dict(objective="ce", label_smoothing=0.3, z_loss=1e-3, reduction="sum")
    zs, zr = leaf(z), leaf(z.double())
    dk.cross_entropy(zs, t, backend="triton", **kw).backward()
    dk.reference.cross_entropy(zr, t, **kw).backward()
    assert rel_err(zs.grad, zr.grad) <= 1e-5
