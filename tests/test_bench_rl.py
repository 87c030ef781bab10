"""The RL suite of the benchmark (``python -m bench --rl``, bench/rl.py) on CPU, tiny shapes."""

from __future__ import annotations

import pytest
import torch

from bench.cli import main
from bench.harness import run_shape
from bench.inputs import make_inputs
from bench.providers import Provider
from bench.report import read_csv
from bench.rl import EAGER, LIGER, TEMPERATURE, TRL, VERL, eager_logprobs, ours, rl_providers, rl_runner
from bench.shapes import Shape
from bench.timing import TimingConfig

CPU = torch.device("cpu")
FAST = TimingConfig(warmup=0, reps=2, max_seconds=5.0)
TINY = Shape("tiny-rl", 64, 16, 300, "fp32")


def _no_log(msg):
    pass


def _impostor(name, per_token):
    return Provider(name, "peer", lambda inp, dev: rl_runner(inp, per_token))


def _entropy_without_gradient(i):
    logp, ent = eager_logprobs(i.x, i.w, i.t)
    return logp, ent.detach()          # same values, the entropy bonus's gradient dropped


def _wrong_temperature(i):
    z = (i.x @ i.w.t()).float()
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, i.t.clamp(min=0)[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_rl_providers_are_checked_against_ours():
    provs = [ours("torch"), EAGER, _impostor("no entropy grad", _entropy_without_gradient),
             _impostor("temperature 1", _wrong_temperature)]
    rows = {r["provider"]: r for r in run_shape(TINY, provs, CPU, FAST, device_name="cpu", log=_no_log)}
    assert rows["ours[torch]"]["check"] == "reference" and rows["ours[torch]"]["status"] == "ok"
    assert rows["torch eager"]["status"] == "ok" and rows["torch eager"]["grad_rel_err"] <= 1e-5
    for name in ("no entropy grad", "temperature 1"):
        assert rows[name]["status"] == "failed-check", rows[name]
    # dropping the entropy's gradient leaves the loss value as it was: only the gradient check sees it
    assert rows["no entropy grad"]["loss_rel_err"] <= 1e-6 < rows["no entropy grad"]["grad_rel_err"]


def test_rl_peers_run_or_skip_with_reason():
    rows = {r["provider"]: r for r in run_shape(TINY, [ours("torch"), TRL, VERL, LIGER], CPU, FAST,
                                                  device_name="cpu", log=_no_log)}
    assert "CUDA" in rows["liger"]["reason"] or "not installed" in rows["liger"]["reason"]
    for name in ("trl chunked", "verl torch"):
        row = rows[name]
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert "not installed" in row["reason"] or "has no" in row["reason"], row
        else:
            assert row["check"] == "ok", row


def test_eager_matches_float64_definition():
    inp = make_inputs(TINY, CPU)
    logp, ent = eager_logprobs(inp.x, inp.w, inp.t)
    z = (inp.x.double() @ inp.w.double().t()) / TEMPERATURE
    lp = torch.log_softmax(z, -1)
    want = lp.gather(-1, inp.t.clamp(min=0)[:, None]).squeeze(-1)
    assert torch.allclose(logp.double(), want, atol=1e-5, rtol=0)
    assert torch.allclose(ent.double(), -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=0)


def test_cli_rl_writes_an_rl_csv(tmp_path, capsys):
    rc = main(["--rl", "--cpu", "--shape", "32,16,200,fp32", "--providers", "ours[torch],torch eager",
               "--out-dir", str(tmp_path), "--no-plot", "--reps", "1", "--warmup", "0"])
    assert rc == 0
    (csv,) = list(tmp_path.glob("*.csv"))
    assert csv.name.startswith("cpu-") and csv.name.endswith("-rl.csv")
    rows = read_csv(str(csv))
    assert [r["provider"] for r in rows] == ["ours[torch]", "torch eager"]
    assert all(r["status"] == "ok" and r["peak_mb"] != "" for r in rows)
    assert "| torch eager |" in capsys.readouterr().out


@pytest.mark.parametrize("device", [CPU])
def test_rl_provider_list_starts_with_ours(device):
    names = [p.name for p in rl_providers(device)]
    assert names[0] == "ours[torch]" and "torch eager" in names and names[-1] == "gemm floor"
