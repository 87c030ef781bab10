"""The installed ``dft-train`` console script, run as a user runs it: a subprocess of the script that
pip wrote into the environment's bin/, so that the entry point, the imports and the exit codes are
the ones a shell sees.  Each error is one line on stderr that names the option, with exit code 2."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def _script() -> Path:
    try:
        dist = importlib.metadata.distribution("dft_kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dft_kernels is not installed (run from a source tree): no dft-train script to run")
    assert any(ep.name == "dft-train" and ep.group == "console_scripts" for ep in dist.entry_points), \
        "the installed dft_kernels declares no dft-train console script"
    script = Path(sys.executable).parent / "dft-train"
    assert script.is_file(), f"dft_kernels is installed but {script} is missing"
    return script


def _run(tmp_path, *args, timeout=300):
    env = dict(os.environ, COLUMNS="100")
    # cwd: a fresh directory, so that a run that got further than it should writes nothing here
    return subprocess.run([str(_script()), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args", [["--help"], ["--demo", "--help"]], ids=["help", "demo-help"])
def test_help_exits_0_with_the_usage(tmp_path, args):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dft-train "), proc.stdout[:300]
    for flag in ("--train_file", "--objective", "--config", "--demo"):
        assert flag in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "--help wrote files (did the demo run?)"


@pytest.mark.parametrize("args,line", [
    (["--train_file", "missing.jsonl"], "dft-train: error: train_file: file not found: missing.jsonl"),
    (["--train_file", "data.jsonl", "--eval_file", "missing.jsonl"],
     "dft-train: error: eval_file: file not found: missing.jsonl"),
    (["--config", "missing.yaml"], "dft-train: error: config: file not found: missing.yaml"),
    (["--lr", "fast"], "dft-train: error: argument --lr: invalid float value: 'fast'"),
    (["--precision", "fp8"], "dft-train: error: precision: expected one of ('auto', 'bf16', 'fp32'), got 'fp8'"),
], ids=["missing-train-file", "missing-eval-file", "missing-config", "bad-float", "bad-choice"])
def test_errors_are_one_line_naming_the_option_with_exit_2(tmp_path, args, line):
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    proc = _run(tmp_path, *args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"], "the failed run wrote files"
