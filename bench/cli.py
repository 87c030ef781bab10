"""Command line: ``python -m bench [--rl | --two-heads] [--cpu | --quick] [--shape N,H,V[,dtype[,softcap]]] ...``.

Runs every provider on every shape (same inputs per shape, one process), writes
``<out-dir>/<device>.csv`` and ``<device>.png``, and prints the markdown table last.  ``--rl`` runs
the RL suite instead (:mod:`bench.rl`: per-token log-probs and entropy, backward through both),
written to ``<device>-rl.csv``; ``--two-heads`` the two-head suites (:mod:`bench.twohead`: ASFT and
distillation against the eager formulas on materialised logits), written to ``<device>-twohead.csv``.
``--dry-run`` prints what would run (shapes, providers, the CSV's path) and runs nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from . import env
from .harness import run_shape
from .providers import default_providers, select
from .report import markdown_table, write_csv
from .rl import RL_CPU_SHAPES, RL_GPU_SHAPES, rl_providers
from .shapes import CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES, parse_shape
from .timing import TimingConfig
from .twohead import (
    SUITE_PROVIDERS,
    TWOHEAD_CPU_SHAPES,
    TWOHEAD_GPU_SHAPES,
    make_two_head_inputs,
    two_head_plan,
    two_head_providers,
)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BENCH_EXTRA = 'pip install -e ".[bench]"'
BENCH_EXTRA_DISTS = ("matplotlib", "liger-kernel", "cut-cross-entropy")   # pyproject.toml's bench extra


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_dependencies(providers, plot: bool) -> tuple[list[str], list[str]]:
    """Optional packages this run needs, checked before anything runs: (errors that stop the
    run, notes on providers that will be skipped).  Both name the extra that installs them."""
    errors, notes = [], []
    if plot and not _installed("matplotlib"):
        errors.append(f"matplotlib is not installed and draws the PNG: {BENCH_EXTRA} (the bench extra), "
                      "or pass --no-plot")
    for p in providers:
        if p.requires and not _installed(p.requires[0]):
            how = f"{BENCH_EXTRA} installs it" if p.requires[1] in BENCH_EXTRA_DISTS else f"pip install {p.requires[1]}"
            notes.append(f"{p.name!r} will be skipped: {p.requires[1]} is not installed ({how})")
    return errors, notes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description="DFT loss microbenchmarks (docs/benchmarks.md)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="run the small CPU shapes on the CPU")
    mode.add_argument("--quick", action="store_true", help="one GPU shape (Llama-3-8B head, N 4096)")
    suite = ap.add_mutually_exclusive_group()
    suite.add_argument("--rl", action="store_true",
                       help="the RL suite: per-token log-probs + entropy at temperature 0.7, backward through both")
    suite.add_argument("--two-heads", action="store_true",
                       help="the two-head suites: ASFT (DFT + KL to a reference head) and distillation (generalized "
                            "JSD to a teacher head) against the eager formulas on both heads' materialised logits")
    ap.add_argument("--shape", action="append", metavar="N,H,V[,dtype[,softcap]]",
                    help="custom shape(s) instead of the presets (repeatable)")
    ap.add_argument("--providers", help="comma-separated provider names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="list the providers and exit")
    ap.add_argument("--out-dir", default=DEFAULT_OUT, help="where the CSV and PNG go (default bench/results)")
    ap.add_argument("--name", help="file stem for the CSV/PNG (default: the device name, slugged; cpu-... on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="CPU: untimed calls before timing")
    ap.add_argument("--reps", type=int, default=10, help="CPU: timed calls per measurement")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="CPU: time cap per measurement")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--dry-run", action="store_true", help="print the shapes, providers and output path; run nothing")
    return ap


def print_providers(providers) -> None:
    for p in providers:
        print(f"{p.name:28s} {p.kind:9s} {p.note}")


def selection(args, providers) -> tuple[list, list]:
    """The providers named by ``--providers`` (all by default) and the shapes of ``--shape``,
    ``--cpu``, ``--quick`` or the GPU default; ValueError for an unknown name or a bad shape."""
    names = [n.strip() for n in args.providers.split(",")] if args.providers else None
    if args.shape:
        shapes = [parse_shape(s) for s in args.shape]
    elif getattr(args, "rl", False):
        shapes = RL_CPU_SHAPES if args.cpu else RL_GPU_SHAPES[:1] if args.quick else RL_GPU_SHAPES
    elif getattr(args, "two_heads", False):
        shapes = TWOHEAD_CPU_SHAPES if args.cpu else TWOHEAD_GPU_SHAPES
    else:
        shapes = CPU_SHAPES if args.cpu else QUICK_SHAPES if args.quick else GPU_SHAPES
    return select(providers, names), shapes


def print_plan(plan, device, csv_path: str) -> None:
    """The ``--dry-run`` listing: each shape with the providers that would run on it, and the CSV."""
    print(f"device: {device.type}; would write {csv_path}")
    for shape, providers in plan:
        print(f"\n{shape.name}:")
        print_providers(providers)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu or (args.list and not torch.cuda.is_available()):
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.dry_run:
        device = torch.device("cuda")   # what would run on a GPU; nothing touches the device
    else:
        print("python -m bench: no CUDA device here; use --cpu for the CPU shapes", file=sys.stderr)
        return 2
    providers = rl_providers(device) if args.rl else two_head_providers(device) if args.two_heads \
        else default_providers(device)
    if args.list and args.two_heads:   # each suite's own providers (ours differs between them)
        for suite, make in SUITE_PROVIDERS.items():
            print(f"{suite}:")
            print_providers(make(device))
        return 0
    if args.list:
        print_providers(providers)
        return 0
    try:
        providers, shapes = selection(args, providers)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    if args.two_heads:   # each suite on its own copy of the shapes, with its own providers
        names = [n.strip() for n in args.providers.split(",")] if args.providers else None
        plan = two_head_plan(device, shapes, names)
    else:
        plan = [(shape, providers) for shape in shapes]

    errors, notes = missing_dependencies(providers, plot=not args.no_plot)
    for line in errors + notes:
        print(f"python -m bench: {line}", file=sys.stderr)
    if errors and not args.dry_run:
        return 2

    name = env.device_name(device) if device.index is not None or device.type == "cpu" else "cuda"
    stem = args.name or env.device_slug(name if device.type == "cuda" else "cpu-" + name.removeprefix("CPU "))
    if not args.name:
        stem += "-rl" if args.rl else "-twohead" if args.two_heads else ""
    csv_path = os.path.join(args.out_dir, stem + ".csv")
    if args.dry_run:
        print_plan(plan, device, csv_path)
        return 0
    context = dict(env.versions(), commit=env.git_commit(), load_avg=env.load_average())
    cfg = TimingConfig(warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds)
    rows: list[dict] = []
    for shape, shape_providers in plan:
        inputs = make_two_head_inputs(shape, device, args.seed) if args.two_heads else None
        rows += run_shape(shape, shape_providers, device, cfg, device_name=name, seed=args.seed, inputs=inputs)
        del inputs

    write_csv(rows, csv_path, context)
    print(f"[bench] wrote {csv_path}", file=sys.stderr)
    if not args.no_plot:
        from .plot import plot

        png = plot(rows, os.path.join(args.out_dir, stem + ".png"), title=f"{name} - commit {context['commit']}")
        print(f"[bench] wrote {png}", file=sys.stderr)
    print(markdown_table([dict(r, **context) for r in rows]))
    return 0
