"""The two-head suite of the benchmark (``python -m bench --two-heads``, bench/twohead.py) on CPU, tiny shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.cli import main
from bench.harness import run_shape
from bench.providers import Provider, Runner
from bench.report import read_csv
from bench.shapes import Shape
from bench.timing import TimingConfig
from bench.twohead import (
    BETA,
    EAGER_ASFT,
    EAGER_DISTILL,
    FLOOR,
    KL_COEF,
    LLAMAFACTORY,
    TRL,
    eager_asft,
    eager_gjsd,
    logits_pair,
    make_two_head_inputs,
    ours_asft,
    ours_distill,
    suite_shape,
    two_head_plan,
)

CPU = torch.device("cpu")
FAST = TimingConfig(warmup=0, reps=2, max_seconds=5.0)
TINY = Shape("tiny", 64, 16, 300, "fp32")


def _no_log(msg):
    pass


def _run(suite, provs):
    shape = suite_shape(suite, TINY)
    rows = run_shape(shape, provs, CPU, FAST, device_name="cpu", log=_no_log,
                     inputs=make_two_head_inputs(shape, CPU))
    return {r["provider"]: r for r in rows}


def _impostor(name, loss):
    return Provider(name, "peer", lambda inp, dev: Runner(inp, loss))


def test_asft_providers_agree_with_ours_and_wrong_formulas_fail():
    unshifted = _impostor("no shift", lambda i: eager_asft(*(torch.cat([z, z[:1]]) for z in logits_pair(i)),
                                                           torch.cat([i.t[:1], i.t])))
    no_anchor = _impostor("kl_coef 0", lambda i: eager_asft(*logits_pair(i), i.t, kl_coef=0.0))
    rows = _run("asft", [ours_asft("torch"), EAGER_ASFT, LLAMAFACTORY, unshifted, no_anchor, FLOOR])
    assert rows["ours[torch]"]["check"] == "reference" and rows["ours[torch]"]["status"] == "ok"
    eager = rows["eager asft"]
    assert eager["status"] == "ok" and eager["loss_rel_err"] <= 1e-5 and eager["grad_rel_err"] <= 1e-5, eager
    for name in ("no shift", "kl_coef 0"):
        assert rows[name]["status"] == "failed-check", rows[name]
    lf = rows["llamafactory asft"]
    if lf["status"] == "skipped":
        assert "not installed" in lf["reason"] or "has no" in lf["reason"], lf
    else:
        assert lf["status"] == "ok" and lf["check"] == "ok", lf
    assert rows["gemm floor"]["status"] == "ok" and rows["gemm floor"]["check"] == "n/a (no loss)"
    assert all(r["peak_mb"] is not None for r in rows.values() if r["status"] == "ok")


def test_distill_providers_agree_with_ours_and_wrong_formulas_fail():
    # (at beta 0.5 the generalized JSD is symmetric: swapping the heads would not be seen)
    hot = _impostor("temperature 2", lambda i: eager_gjsd(*logits_pair(i), i.t, temperature=2.0))
    beta0 = _impostor("beta 0", lambda i: eager_gjsd(*logits_pair(i), i.t, beta=0.0))
    rows = _run("distill", [ours_distill("torch"), EAGER_DISTILL, TRL, hot, beta0])
    assert rows["ours[torch]"]["check"] == "reference"
    eager = rows["eager gjsd"]
    assert eager["status"] == "ok" and eager["loss_rel_err"] <= 1e-5 and eager["grad_rel_err"] <= 1e-5, eager
    for name in ("temperature 2", "beta 0"):
        assert rows[name]["status"] == "failed-check", rows[name]
    trl = rows["trl gjsd"]
    assert trl["status"] in ("ok", "skipped"), trl
    if trl["status"] == "ok":
        assert trl["check"] == "ok" and trl["grad_rel_err"] <= 1e-5, trl
    else:
        assert "not installed" in trl["reason"] or "has no" in trl["reason"], trl


def test_eager_formulas_match_float64_definitions():
    inp = make_two_head_inputs(TINY, CPU)
    z, zr = (F.linear(inp.x, inp.w).double(), F.linear(inp.ref_x, inp.ref_w).double())
    t = inp.t
    # ASFT: position i predicts t[i + 1]; DFT and KL(ref || policy) means over the valid tokens
    zs, zrs, ts = z[:-1], zr[:-1], t[1:]
    valid = ts != -100
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zrs, -1)
    logp_t = lp[valid].gather(-1, ts[valid][:, None]).squeeze(-1)
    want = (-logp_t.exp() * logp_t).mean() + KL_COEF * (lq.exp() * (lq - lp)).sum(-1)[valid].mean()
    assert torch.allclose(eager_asft(z, zr, t), want, rtol=1e-12, atol=0)
    # generalized JSD at BETA, temperature 1: the mixture m = (1 - beta) student + beta teacher
    s, r = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    m = (1 - BETA) * s.exp() + BETA * r.exp()
    per = BETA * (r.exp() * (r - m.log())).sum(-1) + (1 - BETA) * (s.exp() * (s - m.log())).sum(-1)
    assert torch.allclose(eager_gjsd(z, zr, t), per[t != -100].mean(), rtol=1e-12, atol=0)


def test_second_head_is_frozen_and_close():
    inp = make_two_head_inputs(TINY, CPU)
    assert inp.x.requires_grad and inp.w.requires_grad
    assert not inp.ref_x.requires_grad and not inp.ref_w.requires_grad
    assert inp.ref_w.shape == inp.w.shape and not torch.equal(inp.ref_w, inp.w)
    ours_asft("torch").build(inp, CPU).step()
    assert inp.ref_x.grad is None and inp.ref_w.grad is None


def test_plan_splits_suites_and_filters_names():
    plan = two_head_plan(CPU, [TINY])
    assert [s.name for s, _ in plan] == ["asft tiny N64 H16 V300 fp32", "distill tiny N64 H16 V300 fp32"]
    assert [p.name for p in plan[0][1]][0] == "ours[torch]" and plan[0][1][-1].name == "gemm floor"
    only_trl = two_head_plan(CPU, [TINY], ["ours[torch]", "trl gjsd"])
    assert [(s.model, [p.name for p in provs]) for s, provs in only_trl] == [
        ("asft tiny", ["ours[torch]"]), ("distill tiny", ["ours[torch]", "trl gjsd"])]


def test_cli_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    rc = main(["--two-heads", "--cpu", "--dry-run", "--out-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("ours[torch]", "eager asft", "llamafactory asft", "eager gjsd", "trl gjsd", "gemm floor"):
        assert name in out
    assert "asft cpu N1024 H256 V32000 fp32" in out and "distill cpu N1024 H256 V32000 fp32" in out
    assert "-twohead.csv" in out and not list(tmp_path.iterdir())


def test_cli_dry_run_without_a_gpu_shows_the_gpu_plan(capsys):
    assert main(["--two-heads", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3-8B N4096 H4096 V128256 bf16" in out and "ours[triton]" in out


def test_cli_unknown_provider_is_an_error(capsys):
    assert main(["--two-heads", "--cpu", "--dry-run", "--providers", "nope"]) == 2
    assert "unknown provider" in capsys.readouterr().err


def test_cli_two_heads_writes_a_twohead_csv(tmp_path, capsys):
    rc = main(["--two-heads", "--cpu", "--shape", "32,16,200,fp32", "--providers",
               "ours[torch],eager asft,eager gjsd,gemm floor", "--out-dir", str(tmp_path), "--no-plot",
               "--reps", "1", "--warmup", "0"])
    assert rc == 0
    (csv,) = list(tmp_path.glob("*.csv"))
    assert csv.name.startswith("cpu-") and csv.name.endswith("-twohead.csv")
    rows = read_csv(str(csv))
    assert [(r["model"], r["provider"]) for r in rows] == [
        ("asft custom", "ours[torch]"), ("asft custom", "eager asft"), ("asft custom", "gemm floor"),
        ("distill custom", "ours[torch]"), ("distill custom", "eager gjsd"), ("distill custom", "gemm floor")]
    assert all(r["status"] == "ok" and r["peak_mb"] != "" and r["load_avg"] for r in rows)
    assert rows[1]["check"] == "ok" and rows[4]["check"] == "ok"
    assert "| distill custom N32 H16 V200 fp32 | eager gjsd |" in capsys.readouterr().out


def test_llamafactory_provider_passes_their_calling_convention(monkeypatch):
    """Their ``asft_loss_func(outputs, labels, ref_logits, asft_alpha)`` takes ``[B, T, V]`` logits in a
    dict and ``[B, T]`` labels and shifts itself: a stand-in module with that signature (the formula,
    re-derived) must agree with ours through the provider."""
    import sys
    import types

    def asft_loss_func(outputs, labels, ref_logits, asft_alpha=0.1, ignore_index=-100):
        logits = outputs["logits"].float()
        assert logits.dim() == 3 and labels.dim() == 2 and ref_logits.shape == logits.shape
        assert logits.shape[0] == 1   # one sequence: eager_asft's own shift is theirs
        return eager_asft(logits[0], ref_logits[0].float(), labels[0], kl_coef=asft_alpha)

    fake = types.ModuleType("llamafactory.train.trainer_utils")
    fake.asft_loss_func = asft_loss_func
    monkeypatch.setitem(sys.modules, "llamafactory", types.ModuleType("llamafactory"))
    monkeypatch.setitem(sys.modules, "llamafactory.train", types.ModuleType("llamafactory.train"))
    monkeypatch.setitem(sys.modules, "llamafactory.train.trainer_utils", fake)
    rows = _run("asft", [ours_asft("torch"), LLAMAFACTORY])
    lf = rows["llamafactory asft"]
    assert lf["status"] == "ok" and lf["check"] == "ok" and lf["grad_rel_err"] <= 1e-5, lf


def test_cli_list_shows_each_suites_providers(capsys):
    assert main(["--two-heads", "--list"]) == 0
    out = capsys.readouterr().out
    asft, distill = out.split("distill:\n")
    assert asft.startswith("asft:\n") and "kl_coef=0.1" in asft and "eager asft" in asft and "trl gjsd" not in asft
    assert "dk.linear_distill" in distill and "trl gjsd" in distill and "gemm floor" in distill
