"""``python -m bench.gpu_check`` on a CPU machine: the no-CUDA exit, the dry run, and the GPU
branch's orchestration (time limits, log, JUnit counts, bench CSV, summary, verdict) with the
GPU faked and each step replaced by a small real command of the same kind."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Paths, Step, StepResult


def test_without_cuda_one_line_and_nonzero_exit():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even where there is one
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=gpu_check.ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == gpu_check.NO_CUDA and proc.stderr.count("\n") == 1


def test_dry_run_prints_the_exact_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--pip-arg=--break-system-packages"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert lines[0] == f"cd {shlex.quote(gpu_check.ROOT)}"
    commands = lines[1:]
    steps = gpu_check.plan(Paths(str(out), "<gpu>"), arch="<major.minor>",
                           pip_args=("--break-system-packages",))
    assert commands == [s.shell() for s in steps]
    assert not out.exists(), "a dry run writes nothing"
    install, ext, tests, bench = (shlex.split(c) for c in commands)
    py = shlex.quote(sys.executable)
    assert commands[0].endswith(f"{py} -m pip install --no-index --no-deps --no-build-isolation "
                                "--break-system-packages -e .")
    assert install[0] == "TORCH_CUDA_ARCH_LIST=<major.minor>"
    assert ext[-3:] == ["bench.gpu_check", "--step", "cuda-extension"]
    assert tests[1:5] == ["-m", "pytest", "-m", "gpu and not slow"]
    assert f"--junitxml={out}/gpu-check-<gpu>-tests.xml" in tests
    shapes = [bench[i + 1] for i, a in enumerate(bench) if a == "--shape"]
    assert shapes == ["4096,4096,128256,bf16", "16384,4096,128256,bf16"]
    assert bench[bench.index("--out-dir") + 1] == str(out) and bench[bench.index("--name") + 1] == "<gpu>"


def test_run_steps_limits_logs_and_budget(tmp_path):
    py = sys.executable
    steps = [
        Step("ok", [py, "-c", "print('hello from ok')"]),
        Step("fails", [py, "-c", "import sys; print('bad'); sys.exit(3)"]),
        Step("slow", [py, "-c", "import time; time.sleep(60)"], cap_s=6),
        Step("late", [py, "-c", "print('never')"], reserve_s=100),
    ]
    log = tmp_path / "check.log"
    start = time.monotonic()
    results = gpu_check.run_steps(steps, str(log), budget_s=120, echo=lambda msg: None)
    assert time.monotonic() - start < 60, "the slow step was not stopped at its limit"
    assert [(r.name, r.status) for r in results] == [("ok", "ok"), ("fails", "failed"), ("slow", "timeout"),
                                                     ("late", "ok")]
    assert results[1].returncode == 3
    text = log.read_text()
    assert "hello from ok" in text and "bad" in text and "=== slow: timeout" in text
    # a budget too small for a step's reserve-free share: it is reported, not run
    results = gpu_check.run_steps([Step("a", [py, "-c", "pass"], reserve_s=0), Step("b", [py, "-c", "pass"])],
                                  str(log), budget_s=3, echo=lambda msg: None)
    assert [r.status for r in results] == ["not run", "not run"]


def _rows(ours_ms=11.0, floor_ms=10.0, liger_ms=100.0):
    from bench.harness import add_ratios

    def row(provider, kind, ms, peak, status="ok"):
        return dict(shape="custom N4096 H4096 V128256 bf16", provider=provider, kind=kind, status=status,
                    reason="" if status == "ok" else "liger-kernel not installed", ms_median=ms, peak_mb=peak,
                    check="reference" if kind == "ours" else "ok (1e-03)")
    rows = [row("ours[triton]", "ours", ours_ms, 300.0), row("liger", "peer", liger_ms, 800.0),
            row("cce", "peer", None, None, status="skipped"), row("gemm floor", "floor", floor_ms, 1000.0)]
    add_ratios(rows)
    return rows


def test_summary_counts_ratios_and_verdict(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text(textwrap.dedent("""\
        <testsuites><testsuite name="pytest">
          <testcase classname="tests.test_a" name="test_ok"/>
          <testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>
          <testcase classname="tests.test_a" name="test_skip"><skipped message="y"/></testcase>
        </testsuite></testsuites>"""))
    counts = gpu_check.junit_counts(str(junit))
    assert counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "failing": ["tests.test_a::test_bad"]}
    steps = [StepResult(n, "ok", 1.0, 0) for n in ("install", "cuda-extension", "gpu-tests", "bench")]
    paths = Paths(str(tmp_path), "gpu")
    text = gpu_check.render_summary({"device": "Fake GPU"}, steps, counts, _rows(), paths)
    assert text.startswith("# gpu-check: FAIL")
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in text and "FAILED tests.test_a::test_bad" in text
    assert "ours[triton] 11.00 ms, 1.10x floor, 0.11x Liger, peak 300 MB (Liger 800 MB)" in text
    assert "cce" in text and "skipped: liger-kernel not installed" in text
    assert len(text.splitlines()) <= 40, "one screen"
    counts.update(failed=0, failing=[])
    assert gpu_check.render_summary({}, steps, counts, _rows(), paths).startswith("# gpu-check: PASS")
    assert not gpu_check.verdict(steps, counts, [])[0], "no bench rows: not a pass"
    assert not gpu_check.verdict(steps, None, _rows())[0], "no test report: not a pass"


def test_gpu_branch_end_to_end_with_small_real_steps(tmp_path, monkeypatch, capsys):
    """main() as on a GPU box: the GPU is faked; the steps are a real pytest run writing JUnit
    XML and a real ``python -m bench --cpu`` run writing the CSV, under the same names."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_one():\n    assert 1 + 1 == 2\n\ndef test_two():\n    assert True\n")
    py = sys.executable
    real_plan = gpu_check.plan

    def small_plan(paths, **kw):
        steps = real_plan(paths, **kw)
        assert paths.slug == "fake-gpu-80gb" and steps[0].env.get("TORCH_CUDA_ARCH_LIST", "9.0") == "9.0"
        return [
            Step("install", [py, "-c", "print('installed')"]),
            Step("cuda-extension", [py, "-c", "print('loaded')"]),
            Step("gpu-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={paths.junit}",
                               "--rootdir", str(tmp_path), str(sample)]),
            Step("bench", [py, "-m", "bench", "--cpu", "--shape", "64,16,512,fp32", "--providers",
                           "ours[torch],torch eager,gemm floor", "--reps", "2", "--warmup", "0",
                           "--out-dir", paths.out, "--name", paths.slug, "--no-plot"]),
        ]
    monkeypatch.setattr(gpu_check, "plan", small_plan)
    out = tmp_path / "results"
    rc = gpu_check.main(["--out", str(out), "--budget-s", "300"])
    printed = capsys.readouterr().out
    summary = (out / "gpu-check-fake-gpu-80gb.md").read_text()
    assert rc == 0, summary
    assert summary in printed and summary.startswith("# gpu-check: PASS")
    assert "gpu tests: 2 passed, 0 failed, 0 errors, 0 skipped" in summary
    assert "ours[torch]" in summary and "x floor" in summary
    log = (out / "gpu-check-fake-gpu-80gb.log").read_text()
    assert "installed" in log and "loaded" in log and "=== bench: ok" in log
    assert (out / "fake-gpu-80gb.csv").exists() and (out / "gpu-check-fake-gpu-80gb-tests.xml").exists()


@pytest.mark.gpu
def test_cuda_extension_step_on_a_gpu():
    assert gpu_check.check_cuda_extension() == 0
