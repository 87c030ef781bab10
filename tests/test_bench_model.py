"""bench/model.py (the roofline model) prices the code path actually run: its trace on meta
tensors equals its trace of the same call on real CPU tensors, and its accounting of a tiny
shape is the one the chunk loop's structure implies."""

import pytest

from bench import model
from bench.shapes import Shape

N, H, V, C = 64, 16, 100, 16  # 4 chunks


def _steps(pred):
    return {s.name: (s.calls, s.flops, s.bytes) for s in pred.steps}


def test_meta_trace_is_the_cpu_trace():
    """The model runs on meta tensors; the same call on real CPU tensors records the same ops, flops and bytes."""
    shape = Shape("tiny", N, H, V, "fp32")
    meta = model.predict(shape, fast=False, chunk_size=C, device="meta", cuda_policy=False)
    cpu = model.predict(shape, fast=False, chunk_size=C, device="cpu", cuda_policy=False)
    assert _steps(meta) == _steps(cpu)


@pytest.mark.parametrize("fast", [False, True])
def test_accounting_of_a_tiny_shape_with_the_cuda_policy(fast):
    shape = Shape("tiny", N, H, V, "bf16")
    pred = model.predict(shape, fast=fast, chunk_size=C)
    steps = {s.name: s for s in pred.steps}
    chunks = N // C
    # the three GEMMs per chunk and nothing else do flops: exactly the floor's 6 N H V
    assert sum(s.flops for s in pred.steps) == 6 * N * H * V
    logits = steps["logits GEMM (bfloat16 out)" if fast else "logits GEMM (float32 out)"]
    assert logits.calls == chunks and logits.flops == 2 * N * H * V
    assert steps["dX GEMM"].calls == chunks
    # dW: written by the first chunk, accumulated in place by the others (no zero-fill, no temporary)
    assert steps["dW GEMM (first chunk, write fp32)"].calls == 1
    assert steps["dW GEMM (accumulate into fp32)"].calls == chunks - 1
    # the factored row kernel: reads the logits once and writes the gradient once, in bfloat16 (the
    # GEMMs' dtype), plus target, loss/nll/prob and the row factor per row
    row = steps["row kernel (loss + factored gradient, one read)"]
    logit_bytes = 2 if fast else 4
    assert row.calls == chunks
    assert row.bytes == N * V * (logit_bytes + 2) + N * (8 + 4 * 4)
    # the factor, applied on chunk-sized operands: the float32 dX product into dX, the x rows for dW
    scale = steps[f"mul [{C}x{H}]"]
    assert scale.calls == 2 * chunks and scale.in_loop
    assert scale.bytes == chunks * ((C * H * (4 + 2) + C * 4) + (C * H * (2 + 2) + C * 4))
    # nothing but the returned dW's one scale-and-cast pass touches V x H in backward
    # backward: one in-place scale of dX (read + write) and one scale-and-cast pass of the fp32 dW
    # accumulator into the returned bfloat16 dW (each + the 4-byte grad_output); nothing else
    backward = {s.name: (s.calls, s.bytes) for s in pred.steps if not s.in_loop and s.bytes > 8}
    assert backward == {f"mul [{N}x{H}]": (1, 2 * N * H * 2 + 4), f"mul [{V}x{H}]": (1, V * H * (4 + 2) + 4)}
    # no step converts chunk logits (the old cast pass) or copies a [V, H] tensor
    assert not any(s.name.startswith(("to [", "_to_copy [", "copy [")) and s.bytes >= C * V for s in pred.steps)
    assert pred.floor_s == pytest.approx(6 * N * H * V / 700e12)


@pytest.mark.parametrize("fast", [False, True])
def test_two_pass_row_kernel_reads_the_logits_twice(fast):
    pred = model.predict(Shape("tiny", N, H, V, "bf16"), fast=fast, chunk_size=C, factored=False)
    steps = {s.name: s for s in pred.steps}
    logit_bytes = 2 if fast else 4
    assert steps["row kernel (loss + gradient)"].bytes == N * V * (2 * logit_bytes + 2) + N * (8 + 3 * 4)
    assert f"mul [{C}x{H}]" not in steps  # no factor to apply
    # at a head where V >> H (as in LLMs) one read of the logits saves more than the chunk-sized passes cost
    wide = Shape("wide", N, H, 4000, "bf16")
    two = model.predict(wide, fast=fast, chunk_size=C, factored=False)
    assert model.predict(wide, fast=fast, chunk_size=C).total_s < two.total_s


def test_cli_prints_predictions(capsys):
    assert model.main(["--shape", f"{N},{H},{V},bf16"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTIONS" in out and "| default |" in out.replace(f"custom N{N} H{H} V{V} bf16 ", "")
    with pytest.raises(ValueError, match="expected N,H,V"):
        model.main(["--shape", "1,2"])


def test_llama_head_meets_the_predicted_bound():
    """Issue 13's bound at the Llama-3-8B head, N 16384, bf16 (a prediction, not a measurement)."""
    shape = Shape("Llama-3-8B", 16384, 4096, 128256, "bf16")
    assert model.predict(shape, fast=False).ratio <= 1.12


def test_fused_head_accounting():
    """The fused head: no logits GEMM and no row kernel; one Triton GEMM with the logits GEMM's
    flops, priced at the assumed rate (half the rate: its compute time doubles)."""
    shape = Shape("wide", N, H, 4000, "bf16")
    full = model.predict(shape, fast=False, chunk_size=C, fused_rate=1.0)
    steps = {s.name: s for s in full.steps}
    assert not any(name.startswith(("logits GEMM", "row kernel")) for name in steps)
    gemm = steps["fused logits GEMM + gradient (Triton)"]
    assert gemm.calls == N // C and gemm.flops == 2 * N * H * 4000
    assert sum(s.flops for s in full.steps) == 6 * N * H * 4000
    half = model.predict(shape, fast=False, chunk_size=C, fused_rate=0.5)
    slow = {s.name: s for s in half.steps}["fused logits GEMM + gradient (Triton)"]
    assert slow.seconds == pytest.approx(max(2 * gemm.flops / 700e12, gemm.bytes / 3e12))
