"""``python -m bench.gpu_check [--out DIR] [--dry-run]``: a GPU verdict in one command.

On a CUDA machine with no network, in under 10 minutes, from the repository root:

1. ``install``: the offline editable install ``pip install --no-index --no-deps
   --no-build-isolation -e .`` (builds the CUDA extension for this GPU's architecture
   when nvcc is there);
2. ``cuda-extension``: loads the cuda backend's op (prebuilt, else built now) and checks one
   loss and gradient against the float64 reference;
3. ``gpu-tests``: ``pytest -m "gpu and not slow"`` (JUnit XML kept for the counts);
4. ``bench``: ``python -m bench`` at the Llama-3-8B head (H 4096, V 128256, N 4096 and 16384,
   bf16) for every provider installed (the others are listed as skipped, with the reason).

Each step is a subprocess with a time limit inside one overall budget; its output goes to
the log.  Written to ``--out`` (default ``bench/results/``), with ``<gpu>`` the GPU name as
``python -m bench`` names its files: ``<gpu>.csv`` (+ ``.png`` when matplotlib is there) from
the bench, ``gpu-check-<gpu>.log``, ``gpu-check-<gpu>-tests.xml`` and the one-screen summary
``gpu-check-<gpu>.md`` (also printed): pass/fail counts, ours / floor, ours / Liger and peak
memory.  Exit status 0 when every step passed.  Without CUDA: one line, exit status 2.
``--dry-run`` prints the commands, exactly as they would run, and runs nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results")
BUDGET_S = 570  # the whole check, under 10 minutes
# the Llama-3-8B head (docs/benchmarks.md, Shapes): N,H,V,dtype
BENCH_SHAPES = ("4096,4096,128256,bf16", "16384,4096,128256,bf16")
NO_CUDA = "gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"


@dataclass(frozen=True)
class Step:
    """One command of the check.  ``cap_s``: its own time limit; ``reserve_s``: time kept back
    from the budget for it while the steps before it run."""

    name: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    cap_s: int = 300
    reserve_s: int = 0

    def shell(self) -> str:
        """The command as one shell line (environment overrides first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


@dataclass
class StepResult:
    name: str
    status: str           # "ok" | "failed" | "timeout" | "not run"
    seconds: float = 0.0
    returncode: Optional[int] = None
    note: str = ""


@dataclass(frozen=True)
class Paths:
    out: str
    slug: str

    @property
    def log(self) -> str:
        return os.path.join(self.out, f"gpu-check-{self.slug}.log")

    @property
    def junit(self) -> str:
        return os.path.join(self.out, f"gpu-check-{self.slug}-tests.xml")

    @property
    def summary(self) -> str:
        return os.path.join(self.out, f"gpu-check-{self.slug}.md")

    @property
    def csv(self) -> str:
        return os.path.join(self.out, f"{self.slug}.csv")


def plan(paths: Paths, *, python: str = sys.executable, arch: Optional[str] = None, plot: bool = True,
         pip_args: tuple[str, ...] = ()) -> list[Step]:
    """The commands of the check, in order.  ``arch`` (e.g. ``"9.0"``) limits the CUDA
    extension's build to this GPU, unless TORCH_CUDA_ARCH_LIST is already set."""
    build_env = {"TORCH_CUDA_ARCH_LIST": arch} if arch and "TORCH_CUDA_ARCH_LIST" not in os.environ else {}
    bench = [python, "-m", "bench"]
    for shape in BENCH_SHAPES:
        bench += ["--shape", shape]
    bench += ["--out-dir", paths.out, "--name", paths.slug] + ([] if plot else ["--no-plot"])
    return [
        Step("install", [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                         *pip_args, "-e", "."], build_env, cap_s=180),
        Step("cuda-extension", [python, "-m", "bench.gpu_check", "--step", "cuda-extension"], build_env,
             cap_s=120, reserve_s=20),
        # "not slow": -m replaces the default deselection of the slow (minutes, ~10 GB) tests
        Step("gpu-tests", [python, "-m", "pytest", "-m", "gpu and not slow", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={paths.junit}", "tests"], cap_s=240, reserve_s=120),
        Step("bench", bench, cap_s=300, reserve_s=180),
    ]


def run_steps(steps: list[Step], log_path: str, budget_s: float = BUDGET_S, echo=print) -> list[StepResult]:
    """Run the steps in order, each within min(its cap, what the budget leaves after the
    reserves of the steps still to come); every step runs even if an earlier one failed."""
    deadline = time.monotonic() + budget_s
    results = []
    with open(log_path, "w") as log:
        for i, step in enumerate(steps):
            later = sum(s.reserve_s for s in steps[i + 1:])
            limit = min(step.cap_s, deadline - time.monotonic() - later)
            if limit < 5:
                results.append(StepResult(step.name, "not run", note="no time left in the budget"))
                log.write(f"\n=== {step.name}: not run (no time left in the budget)\n")
                continue
            echo(f"gpu-check: {step.name} (limit {limit:.0f} s): {step.shell()}")
            log.write(f"\n=== {step.name} (limit {limit:.0f} s)\n$ {step.shell()}\n")
            log.flush()
            results.append(_run_one(step, log, limit))
            r = results[-1]
            log.write(f"=== {step.name}: {r.status} in {r.seconds:.0f} s (exit {r.returncode})\n")
            log.flush()
            echo(f"gpu-check:   -> {r.status} in {r.seconds:.0f} s")
    return results


def _run_one(step: Step, log, limit_s: float) -> StepResult:
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env={**os.environ, **step.env}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return StepResult(step.name, "timeout", time.monotonic() - start, None,
                          f"stopped after {limit_s:.0f} s")
    return StepResult(step.name, "ok" if rc == 0 else "failed", time.monotonic() - start, rc,
                      "" if rc == 0 else f"exit status {rc}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the step and the processes it started (its own session's process group)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- reading the results

def junit_counts(path: str) -> Optional[dict]:
    """passed/failed/errors/skipped counts and failing test ids from pytest's JUnit XML."""
    if not os.path.exists(path):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _f(row: dict, key: str) -> Optional[float]:
    value = row.get(key)
    return None if value in (None, "") else float(value)


def bench_lines(rows: list[dict]) -> list[str]:
    """Per shape: every provider's fwd+bwd time, x floor, x Liger and peak extra memory."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        header = f"  {'provider':26s} {'ms':>9s} {'x floor':>8s} {'x Liger':>8s} {'peak MB':>9s}  check"
        lines += ["", shape, header]
        for r in group:
            if r.get("status") != "ok":
                lines.append(f"  {r['provider']:26s} {r.get('status', '')}: {r.get('reason', '')}"[:118])
                continue
            ms, xf, xl, mb = (_f(r, k) for k in ("ms_median", "x_floor", "x_liger", "peak_mb"))
            cells = [f"{ms:9.2f}" if ms is not None else f"{'-':>9s}",
                     f"{xf:7.2f}x" if xf is not None else f"{'-':>8s}",
                     f"{xl:7.2f}x" if xl is not None else f"{'-':>8s}",
                     f"{mb:9.0f}" if mb is not None else f"{'-':>9s}"]
            lines.append(f"  {r['provider']:26s} {' '.join(cells)}  {r.get('check', '')}")
    return lines


def headline(rows: list[dict]) -> list[str]:
    """ours (the first of ours that ran at default settings) against the floor and Liger, per shape."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        ours = next((r for r in group if r.get("kind") == "ours" and r.get("status") == "ok"
                     and "liger-cfg" not in r["provider"]), None)
        liger = next((r for r in group if r["provider"] == "liger" and r.get("status") == "ok"), None)
        if ours is None:
            lines.append(f"  {shape}: no 'ours' provider ran")
            continue
        xf, xl, mb = _f(ours, "x_floor"), _f(ours, "x_liger"), _f(ours, "peak_mb")
        text = f"  {shape}: {ours['provider']} {_f(ours, 'ms_median'):.2f} ms"
        text += f", {xf:.2f}x floor" if xf is not None else ", floor not measured"
        text += f", {xl:.2f}x Liger" if xl is not None else ", Liger not run"
        text += f", peak {mb:.0f} MB" if mb is not None else ""
        if liger is not None and _f(liger, "peak_mb") is not None:
            text += f" (Liger {_f(liger, 'peak_mb'):.0f} MB)"
        lines.append(text)
    return lines


def verdict(results: list[StepResult], tests: Optional[dict], rows: list[dict]) -> tuple[bool, list[str]]:
    """PASS when every step exited 0, pytest ran tests with no failure or error, and ours ran."""
    problems = [f"{r.name}: {r.status}" + (f" ({r.note})" if r.note else "") for r in results if r.status != "ok"]
    if tests is None:
        problems.append("gpu-tests: no JUnit report")
    elif tests["failed"] or tests["errors"]:
        problems.append(f"gpu-tests: {tests['failed']} failed, {tests['errors']} errors")
    elif tests["passed"] == 0:
        problems.append("gpu-tests: nothing passed")
    if not any(r.get("kind") == "ours" and r.get("status") == "ok" for r in rows):
        problems.append("bench: no 'ours' provider ran")
    return not problems, problems


def render_summary(context: dict, results: list[StepResult], tests: Optional[dict], rows: list[dict],
                   paths: Paths) -> str:
    ok, problems = verdict(results, tests, rows)
    lines = [f"# gpu-check: {'PASS' if ok else 'FAIL'}",
             "",
             "```",
             f"{context.get('device', '?')} | torch {context.get('torch', '-')} | triton {context.get('triton', '-')} "
             f"| liger-kernel {context.get('liger-kernel', '-')} | cut-cross-entropy "
             f"{context.get('cut-cross-entropy', '-')} | commit {context.get('commit', '-')}",
             "steps: " + " | ".join(f"{r.name} {r.status} {r.seconds:.0f}s" for r in results)]
    if tests is not None:
        lines.append(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped")
        lines += [f"  FAILED {name}"[:118] for name in tests["failing"][:8]]
        if len(tests["failing"]) > 8:
            lines.append(f"  ... and {len(tests['failing']) - 8} more (see the log)")
    if rows:
        lines += ["ours at default settings:"] + headline(rows) + bench_lines(rows)
    if problems:
        lines += [""] + [f"problem: {p}" for p in problems]
    lines += ["```", "", f"Log: `{paths.log}`; tests: `{paths.junit}`; bench: `{paths.csv}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the cuda-extension step

def check_cuda_extension() -> int:
    """Load the cuda backend's op (prebuilt ``dft_kernels._C``, else built now) and compare one
    entropy-objective loss and logits gradient with the float64 reference."""
    import torch

    import dft_kernels as dk
    from dft_kernels.backends import cuda as cuda_backend

    t0 = time.monotonic()
    cuda_backend.load_extension()  # raises with the reason
    how = "prebuilt dft_kernels._C" if cuda_backend._prebuilt_error is None else "built just in time"
    print(f"cuda extension loaded ({how}) in {time.monotonic() - t0:.1f} s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(64, 32003, device="cuda", generator=gen) * 3
    t = torch.randint(0, 32003, (64,), device="cuda", generator=gen)
    t[::7] = -100
    zs, zr = z.clone().requires_grad_(), z.double().requires_grad_()
    loss = dk.cross_entropy(zs, t, objective="entropy", softcap=20.0, backend="cuda")
    ref = dk.reference.cross_entropy(zr, t, objective="entropy", softcap=20.0)
    loss.backward()
    ref.backward()
    errs = [float((a.double() - b).norm() / b.norm()) for a, b in ((loss, ref), (zs.grad, zr.grad))]
    print(f"loss rel err {errs[0]:.2e}, logits grad rel err {errs[1]:.2e} (limit 1e-5)")
    return 0 if max(errs) <= 1e-5 else 1


# ---------------------------------------------------------------- entry point

def _context(device_name: str) -> dict:
    from . import env

    return dict(env.versions(), device=device_name, commit=env.git_commit())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the CSV, log and summary go (default bench/results)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands it would run, run nothing")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"time for all steps (default {BUDGET_S})")
    ap.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the pip install (repeatable), e.g. --pip-arg=--break-system-packages")
    ap.add_argument("--step", choices=["cuda-extension"], help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.step == "cuda-extension":
        return check_cuda_extension()
    try:
        import torch
    except ImportError as exc:
        print(f"gpu-check: torch is not importable with {sys.executable} ({exc}); nothing to check", file=sys.stderr)
        return 2

    from . import env

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(NO_CUDA, file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if cuda:
        name = env.device_name(torch.device("cuda", torch.cuda.current_device()))
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    else:
        name, arch = "<gpu name>", "<major.minor>"
    paths = Paths(out, env.device_slug(name) if cuda else "<gpu>")
    steps = plan(paths, arch=arch, plot=importlib.util.find_spec("matplotlib") is not None,
                 pip_args=tuple(args.pip_arg))
    if args.dry_run:
        if not cuda:
            print("# no CUDA here: <gpu> and <major.minor> stand for the GPU's file name and compute capability")
        print(f"cd {shlex.quote(ROOT)}")
        for step in steps:
            print(step.shell())
        print(f"# log {paths.log}, summary {paths.summary}")
        return 0

    os.makedirs(out, exist_ok=True)
    started = time.time()
    if os.path.exists(paths.junit):
        os.remove(paths.junit)  # a report left by an earlier run must not be read as this one's
    results = run_steps(steps, paths.log, budget_s=args.budget_s)
    tests = junit_counts(paths.junit)
    from .report import read_csv

    fresh_csv = os.path.exists(paths.csv) and os.path.getmtime(paths.csv) >= started
    rows = read_csv(paths.csv) if fresh_csv else []
    summary = render_summary(_context(name), results, tests, rows, paths)
    with open(paths.summary, "w") as f:
        f.write(summary)
    print(summary)
    return 0 if verdict(results, tests, rows)[0] else 1


if __name__ == "__main__":
    sys.exit(main())
