"""The benchmark harness on CPU: pytest-benchmark timings of ours (torch backend) vs the
eager reference on a small shape, and the harness's own guarantees (loss check, skips,
memory method, README generation).  Speed is never asserted here; bench/ reports it."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from bench import cli, memory, readme
from bench.check import Result, compare
from bench.harness import run_shape
from bench.inputs import IGNORE_INDEX, make_inputs
from bench.providers import CCE, EAGER, FLOOR, LIGER, Provider, Runner, Skip, default_providers, eager_dft, ours, select
from bench.report import read_csv, write_csv
from bench.shapes import Shape, parse_shape
from bench.timing import TimingConfig, summarize

CPU = torch.device("cpu")
SMALL = Shape("test", 256, 64, 4096, "fp32")
FAST = TimingConfig(warmup=0, reps=2, min_reps=1, max_seconds=5.0)


def _no_log(msg: str) -> None:
    pass


# ------------------------------------------------------------ pytest-benchmark: ours vs eager

@pytest.mark.parametrize("provider", [ours("torch"), EAGER], ids=lambda p: p.name)
def test_benchmark_fwd_bwd_cpu(benchmark, provider):
    inp = make_inputs(SMALL, CPU, seed=1)
    runner = provider.build(inp, CPU)
    benchmark.group = f"dft fwd+bwd {SMALL.name}"
    loss = benchmark.pedantic(runner.step, rounds=5, warmup_rounds=1, iterations=1)
    # What was timed is the DFT loss with its gradients, checked against an independent eager copy.
    x, w = inp.x.detach().clone().requires_grad_(True), inp.w.detach().clone().requires_grad_(True)
    want = eager_dft(x.double(), w.double(), inp.t, None)
    want.backward()
    want = want.detach()
    assert abs(float(loss) - float(want)) <= 1e-4 * abs(float(want))
    got = Result(float(loss), inp.x.grad, inp.w.grad)
    assert compare(got, Result(float(want), x.grad, w.grad), torch.float32).ok


# ------------------------------------------------------------ the loss check

def _impostor(name, fn):
    return Provider(name, "peer", lambda inp, dev: Runner(inp, fn))


def _plain_ce(i):
    # The ordinary SFT loss: a different objective, so it must not be timed as a DFT provider.
    logits = torch.nn.functional.linear(i.x, i.w).float()
    return torch.nn.functional.cross_entropy(logits, i.t, ignore_index=IGNORE_INDEX)


def _dft_without_stop_gradient(i):
    # Same loss value as DFT, wrong gradient (p is differentiated): only the gradient check can tell.
    logits = torch.nn.functional.linear(i.x, i.w).float()
    nll = torch.nn.functional.cross_entropy(logits, i.t, ignore_index=IGNORE_INDEX, reduction="none")
    return (torch.exp(-nll) * nll).sum() / (i.t != IGNORE_INDEX).sum()


def test_harness_checks_every_provider_against_ours():
    provs = [ours("torch"), EAGER, _impostor("plain ce", _plain_ce),
             _impostor("dft no sg", _dft_without_stop_gradient), FLOOR]
    rows = {r["provider"]: r for r in run_shape(SMALL, provs, CPU, FAST, device_name="cpu", log=_no_log)}
    assert rows["ours[torch]"]["check"] == "reference"
    for name in ("ours[torch]", "torch eager", "gemm floor"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["ms_median"] > 0 and rows[name]["fwd_ms_median"] > 0
        assert rows[name]["ms_p20"] <= rows[name]["ms_median"] <= rows[name]["ms_p80"]
    assert rows["torch eager"]["check"] == "ok"
    assert rows["torch eager"]["grad_rel_err"] <= 1e-4
    assert rows["gemm floor"]["x_floor"] == pytest.approx(1.0)
    for name in ("plain ce", "dft no sg"):
        row = rows[name]
        assert row["status"] == "failed-check", row
        assert row["ms_median"] is None and row["peak_mb"] is None, "a failed provider must not be timed"
        assert "mismatch" in row["check"]
    assert rows["dft no sg"]["loss_rel_err"] <= 1e-5 < rows["dft no sg"]["grad_rel_err"]


def test_compare_rejects_nonfinite_and_accepts_identical():
    g = torch.randn(4, 3)
    ref = Result(1.0, g, g)
    assert compare(Result(1.0, g.clone(), g.clone()), ref, torch.float32).ok
    assert not compare(Result(float("nan"), g, g), ref, torch.float32).ok
    assert not compare(Result(1.0, g * (1 + 1e-3), g), ref, torch.float32).ok
    assert compare(Result(1.0, g * (1 + 1e-3), g), ref, torch.bfloat16).ok


# ------------------------------------------------------------ skips with a reason

def test_unavailable_providers_are_skipped_with_reason():
    provs = select(default_providers(CPU), ["ours[cuda]", "liger", "cce"])
    tiny = Shape("tiny", 8, 16, 64, "fp32", 30.0)
    provs.append(select(default_providers(CPU), ["torch chunked"])[0])
    rows = run_shape(tiny, provs, CPU, FAST, device_name="cpu", log=_no_log)
    for row in rows:
        assert row["status"] == "skipped", row
        assert row["reason"] and row["ms_median"] is None
    by = {r["provider"]: r["reason"] for r in rows}
    assert "softcap" in by["torch chunked"]
    for name in ("liger", "cce"):
        assert "CUDA" in by[name] or "not installed" in by[name]


def test_peers_never_run_on_cpu():
    inp = make_inputs(Shape("tiny", 8, 16, 64, "fp32"), CPU)
    for prov in (LIGER, CCE):
        with pytest.raises(Skip):
            prov.build(inp, CPU)


# ------------------------------------------------------------ memory method

def test_cpu_memory_method_sees_a_known_allocation():
    ok, reason = memory.configure_cpu()
    if not ok:
        pytest.skip(reason)
    size = 48 << 20

    def alloc():
        t = torch.empty(size // 4, dtype=torch.float32)
        t.fill_(1.0)
        del t
    peaks = [memory.peak_bytes(alloc, CPU) for _ in range(3)]
    assert any(0.95 * size <= p <= 1.1 * size for p in peaks), peaks
    assert memory.peak_bytes(lambda: None, CPU) < 4 << 20


# ------------------------------------------------------------ timing statistics

def test_summarize_percentiles():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.samples) == (3.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)


def test_parse_shape():
    s = parse_shape("4096,2304,256000,bf16,30")
    assert (s.n, s.h, s.v, s.dtype, s.softcap) == (4096, 2304, 256000, "bf16", 30.0)
    with pytest.raises(ValueError):
        parse_shape("1,2")
    with pytest.raises(ValueError):
        parse_shape("1,2,3,int8")


# ------------------------------------------------------------ README generator

ROWS = [
    dict(device="CPU test", shape="s1", model="m", n=8, h=4, v=16, dtype="fp32", softcap="", provider="ours[torch]",
         kind="ours", status="ok", reason="", ms_median=1.5, ms_p20=1.4, ms_p80=1.7, fwd_ms_median=0.5, peak_mb=2.0,
         mem_method="rss-hwm", x_floor=1.1, x_liger=None, loss=0.1, grad_checksum=2.0, check="reference",
         check_against="ours[torch]"),
    dict(device="CPU test", shape="s1", model="m", n=8, h=4, v=16, dtype="fp32", softcap="", provider="liger",
         kind="peer", status="skipped", reason="needs a | CUDA device"),
]
CONTEXT = {"torch": "2.x", "triton": "3.x", "commit": "abc123"}


def _write_results(tmp_path, rows):
    results = tmp_path / "results"
    write_csv(rows, str(results / "cpu-test.csv"), CONTEXT)
    return results


GPU_ROWS = [dict(ROWS[0], device="NVIDIA H100 test", mem_method="cuda-max-allocated")]
DOC = "# Benchmarks\n\n## Results\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"


def test_readme_block_is_a_function_of_the_csv(tmp_path):
    """CPU runs go to docs/benchmarks.md; the README says there is no GPU result and points there."""
    results = _write_results(tmp_path, ROWS)
    text = "# Title\n\nintro\n\n## Benchmarks\n<!-- bench:start -->\nhand-typed numbers\n<!-- bench:end -->\n\nafter\n"
    path, doc = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    path.write_text(text)
    doc.parent.mkdir()
    doc.write_text(DOC)
    args = ["--readme", str(path), "--doc", str(doc), "--results", str(results)]
    assert readme.main(args) == 0
    first, first_doc = path.read_text(), doc.read_text()
    assert first.startswith("# Title\n\nintro\n\n## Benchmarks\n<!-- bench:start -->\n")
    assert first.endswith("<!-- bench:end -->\n\nafter\n")
    assert "hand-typed" not in first and "| s1 |" not in first                  # no CPU table on the first page
    assert "No GPU results yet" in first and "[docs/benchmarks.md](docs/benchmarks.md)" in first
    assert "| s1 | ours[torch] | 1.5 (1.4-1.7) |" in first_doc and "old" not in first_doc
    assert "- `liger` (all shapes): needs a | CUDA device" in first_doc
    assert "No GPU results yet" in first_doc and "[`../results/cpu-test.csv`](../results/cpu-test.csv)" in first_doc
    assert readme.main(args + ["--check"]) == 0
    assert readme.main(args) == 0 and path.read_text() == first and doc.read_text() == first_doc  # idempotent
    path.write_text(text)
    assert readme.main(args) == 0 and path.read_text() == first          # deterministic
    changed = [dict(ROWS[0], ms_median=9.0), ROWS[1]]
    _write_results(tmp_path, changed)
    assert readme.main(args + ["--check"]) == 1
    assert path.read_text() == first and doc.read_text() == first_doc    # --check never writes


def test_readme_shows_gpu_results(tmp_path):
    results = _write_results(tmp_path, ROWS)
    write_csv(GPU_ROWS, str(results / "nvidia-h100-test.csv"), CONTEXT)
    path, doc = tmp_path / "README.md", tmp_path / "benchmarks.md"
    path.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    doc.write_text(DOC)
    assert readme.main(["--readme", str(path), "--doc", str(doc), "--results", str(results)]) == 0
    first, first_doc = path.read_text(), doc.read_text()
    assert "### NVIDIA H100 test" in first and "### CPU test" not in first and "No GPU results" not in first
    assert "### NVIDIA H100 test" in first_doc and "### CPU test" in first_doc


def test_readme_requires_one_marker_pair():
    with pytest.raises(ValueError):
        readme.update("no markers here\n", "x")
    with pytest.raises(ValueError):
        readme.update(f"{readme.END}\n{readme.START}\n", "x")


# ------------------------------------------------------------ the CLI end to end

def test_cli_cpu_writes_csv_png_and_table(tmp_path, capsys):
    rc = cli.main(["--cpu", "--shape", "128,32,1000,fp32", "--providers", "ours[torch],torch eager,gemm floor,liger",
                   "--out-dir", str(tmp_path), "--name", "cpu-test", "--reps", "2", "--warmup", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.lstrip().startswith("Device:") and "| custom N128 H32 V1000 fp32 | torch eager |" in out
    rows = read_csv(str(tmp_path / "cpu-test.csv"))
    assert [r["provider"] for r in rows] == ["ours[torch]", "torch eager", "liger", "gemm floor"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok"]
    assert all(r["commit"] and r["torch"] == torch.__version__ for r in rows)
    assert float(rows[0]["peak_mb"]) >= 0 and float(rows[0]["ms_median"]) > 0
    with open(tmp_path / "cpu-test.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "cpu-test.csv") as f:
        assert next(csv.reader(f))[:3] == ["device", "shape", "model"]


def test_cli_rejects_unknown_provider(tmp_path):
    assert cli.main(["--cpu", "--providers", "nope", "--out-dir", str(tmp_path)]) == 2
    assert not os.listdir(tmp_path)


def test_cli_checks_optional_dependencies_before_running(tmp_path, monkeypatch, capsys):
    """Without matplotlib (the bench extra) the CLI stops before any provider runs and names the extra."""
    installed = {"matplotlib": False, "liger_kernel": False, "cut_cross_entropy": True}
    monkeypatch.setattr(cli, "_installed", lambda module: installed[module])

    def must_not_run(*args, **kwargs):
        raise AssertionError("a provider ran before the dependency check")
    monkeypatch.setattr(cli, "run_shape", must_not_run)
    assert cli.main(["--cpu", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and 'pip install -e ".[bench]"' in err and "--no-plot" in err
    assert "'liger' will be skipped: liger-kernel is not installed" in err and "'cce'" not in err
    assert not os.listdir(tmp_path)


def test_csv_keeps_small_values(tmp_path):
    row = dict(ROWS[0], loss=2.1612345e-4, grad_checksum=4.5123456e-05, ms_median=24611.123)
    write_csv([row], str(tmp_path / "r.csv"), CONTEXT)
    back = read_csv(str(tmp_path / "r.csv"))[0]
    for key in ("loss", "grad_checksum", "ms_median"):
        assert float(back[key]) == pytest.approx(row[key], rel=1e-6)


# ------------------------------------------------------------ the factored gradient's controls

def test_fast_and_two_pass_providers(monkeypatch):
    """``ours[triton] two-pass`` really runs the two-pass kernel (``factored=False``), the
    default ``ours[triton]`` the factored one; the fast mode skips fp32 shapes with a reason."""
    from bench.providers import ours_fast, ours_two_pass
    from dft_kernels.backends import triton as tb

    calls = []
    real = tb.row_loss_grad_factored
    monkeypatch.setattr(tb, "row_loss_grad_factored", lambda *a: calls.append(1) or real(*a))
    shape = Shape("tiny-bf16", 64, 32, 500, "bf16")
    for provider, factored in ((ours("triton"), True), (ours_two_pass("triton"), False),
                               (ours_two_pass("triton", fast=True), False), (ours_fast("triton"), True)):
        calls.clear()
        runner = provider.build(make_inputs(shape, CPU, seed=2), CPU)
        assert torch.isfinite(runner.step())
        assert bool(calls) == factored, provider.name
    with pytest.raises(Skip, match="16-bit"):
        ours_fast("torch").build(make_inputs(SMALL, CPU, seed=2), CPU)
