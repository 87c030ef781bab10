"""The embedded demo: SFT (objective "ce") vs DFT (objective "dft") on synthetic arithmetic, on CPU.

``python -m dft_kernels.train.demo`` (what ``make demo`` runs) or ``dft-train --demo``.
Everything is generated locally: the data (``demo_data``), the character tokenizer and a tiny
randomly initialised Qwen2.  Stage 1 warm-starts the random model with SFT (DFT is a fine-tuning
objective: from random init its weight p ~ 1/V and, tried here, it learns the easy template
tokens and gives up on the arithmetic).  Stage 2 fine-tunes that same checkpoint with SFT and
with DFT, identical settings except the objective.

The demo's learning rate (1e-3) is far above the paper default (5e-5, meant for fine-tuning a
pretrained 1.5B-7B model): a randomly initialised tiny model must learn from scratch in minutes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Optional

from .config import TrainConfig
from .demo_data import write_demo_data

__all__ = ["run_demo", "demo_config", "chance_accuracy"]

# identical for both runs; tuned to finish the whole demo in ~5 minutes on 2 CPU cores
DEMO_SETTINGS = dict(
    model="tiny", max_length=128, per_device_batch_size=32, grad_accum_steps=1, lr=1e-3, warmup_ratio=0.1,
    weight_decay=0.01, max_grad_norm=1.0, seed=0, eval_max_new_tokens=72, eval_batch_size=100,
    tiny_hidden_size=128, tiny_num_layers=3, tiny_num_heads=4, tiny_num_kv_heads=2,
    tiny_intermediate_size=384, save_total_limit=1, logging_steps=1,
)


def chance_accuracy(train_path: str, heldout_path: str) -> tuple[float, str]:
    """Accuracy of always answering the most frequent training answer (the 'chance' baseline)."""
    with open(train_path) as f:
        train = [json.loads(line)["answer"] for line in f]
    with open(heldout_path) as f:
        held = [json.loads(line)["answer"] for line in f]
    top, _ = collections.Counter(train).most_common(1)[0]
    return sum(a == top for a in held) / len(held), top


def demo_config(objective: str, out_dir: str, paths: dict, max_steps: int, **overrides) -> TrainConfig:
    values = dict(DEMO_SETTINGS, objective=objective, train_file=paths["train"], eval_file=paths["heldout"],
                  output_dir=os.path.join(out_dir, objective), max_steps=max_steps, progress_bar=False)
    values.update(overrides)
    return TrainConfig(**values)


def _launch(cfg: TrainConfig, threads: int) -> tuple[subprocess.Popen, str]:
    os.makedirs(cfg.output_dir, exist_ok=True)
    cfg_path = os.path.join(cfg.output_dir, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    log = os.path.join(cfg.output_dir, "train.log")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dft_kernels.train", "--config", cfg_path], stdout=f,
                                stderr=subprocess.STDOUT, env=env)
    return proc, log


def _summary_from_log(log: str) -> dict:
    with open(log) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("dft-train: {")]
    if not lines:
        raise RuntimeError(f"demo: no summary in {log}")
    return json.loads(lines[-1][len("dft-train: "):])


def _last_step(metrics: str):
    try:
        with open(metrics) as f:
            lines = [ln for ln in f.read().splitlines() if '"loss"' in ln]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _run_parallel(cfgs: dict, threads: int) -> dict:
    """Both runs at once, one process each with ``threads`` threads: on 2 cores this is about twice
    as fast as running them one after the other, and avoids oversubscribing the cores."""
    procs = {label: _launch(c, threads) for label, c in cfgs.items()}
    try:
        while any(p.poll() is None for p, _ in procs.values()):
            time.sleep(10)
            parts = []
            for label, c in cfgs.items():
                rec = _last_step(os.path.join(c.output_dir, "metrics.jsonl"))
                parts.append(f"{label} step {rec['step']}/{c.max_steps} loss {rec['loss']:.4f}" if rec
                             else f"{label} starting")
            print("demo: " + " | ".join(parts), flush=True)
    except BaseException:
        for p, _ in procs.values():
            if p.poll() is None:
                p.terminate()
        raise
    results = {}
    for label, (p, log) in procs.items():
        if p.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"demo: the {label} run failed (exit {p.returncode}); log {log}:\n{tail}")
        results[label] = _summary_from_log(log)
    return results


def _threads_for_one_run(ncpu: int) -> int:
    """All cores for a lone run on an idle machine; one thread when the cores are already busy
    (oversubscribed OpenMP threads slow a small model down several times)."""
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return ncpu if busy < ncpu / 2 else 1


def run_demo(out_dir: str = "runs/demo", warm_steps: int = 150, steps: int = 150, n_train: int = 6000,
             n_heldout: int = 200, parallel: Optional[bool] = None, **overrides) -> dict:
    """Stage 1: a shared SFT warm start of the random tiny model (DFT is a fine-tuning objective:
    its weight p is ~1/V on a random model).  Stage 2: SFT and DFT fine-tuning from that same
    checkpoint with identical settings.  Prints the table and writes the plot."""
    from .loop import train
    from .metrics import plot_runs, read_metrics

    t0 = time.time()
    paths = write_demo_data(os.path.join(out_dir, "data"), n_train=n_train, n_heldout=n_heldout)
    chance, top = chance_accuracy(paths["train"], paths["heldout"])
    print(f"demo: data in {os.path.dirname(paths['train'])}: {n_train} train problems (2-4 terms), "
          f"{n_heldout} harder held-out problems (4 terms only, none in the train split)")
    ncpu = os.cpu_count() or 1
    if parallel is None:
        parallel = ncpu >= 2

    warm_cfg = demo_config("ce", out_dir, paths, warm_steps, output_dir=os.path.join(out_dir, "warmstart"),
                           **overrides)
    print(f"demo: stage 1: SFT warm start of a random tiny Qwen2, {warm_steps} steps")
    if parallel:
        warm = _run_parallel({"warm start": warm_cfg}, _threads_for_one_run(ncpu))["warm start"]
    else:
        warm = train(dataclasses.replace(warm_cfg, progress_bar=True))
    start_model = os.path.join(warm["checkpoint"], "model")

    runs = (("SFT", "ce"), ("DFT", "dft"))
    # a new data order for stage 2 (seed 1), otherwise identical settings; the model is the checkpoint
    cfgs = {label: demo_config(objective, out_dir, paths, steps, model=start_model, seed=1, **overrides)
            for label, objective in runs}
    if parallel:
        print(f"demo: stage 2: SFT (objective 'ce') and DFT (objective 'dft') from {start_model}, side by side, "
              f"{steps} steps each, {max(1, ncpu // 2)} thread(s) per run; logs in {out_dir}/<objective>/train.log")
        results = _run_parallel(cfgs, max(1, ncpu // 2))
    else:
        results = {}
        for label, c in cfgs.items():
            print(f"demo: stage 2: {label} (objective {c.objective!r}) from {start_model}, {steps} steps")
            results[label] = train(dataclasses.replace(c, progress_bar=True))
    png = plot_runs({label: read_metrics(r["metrics"]) for label, r in results.items()},
                    os.path.join(out_dir, "sft_vs_dft.png"),
                    title="SFT (ce) vs DFT fine-tuning from the same warm start, synthetic arithmetic")
    wall = time.time() - t0

    header = f"{'run':<11} {'objective':<9} {'final NLL':>9} {'final loss':>10} {'held-out EM':>11} {'tokens/s':>9}"
    lines = [header, "-" * len(header)]
    for label, r in [("warm start", warm)] + list(results.items()):
        lines.append(f"{label:<11} {r['objective']:<9} {r['final_nll']:>9.4f} {r['final_loss']:>10.4f} "
                     f"{r['eval_exact_match']:>11.1%} {r['tokens_per_s']:>9.0f}")
    print()
    print("\n".join(lines))
    print(f"\nheld-out EM: exact match of the \\boxed answer on {n_heldout} unseen 4-term problems; chance "
          f"(always answering the most frequent training answer, {top!r}) is {chance:.1%}.\n"
          f"SFT and DFT rows: {steps} more steps from the warm start ({warm_steps} SFT steps), identical settings.\n"
          "final NLL / loss: mean over the last 10 training steps (DFT's loss is p-weighted, so it is below its NLL).")
    print(f"plot: {png}\nwall time: {wall:.0f} s")
    return {"results": results, "warm_start": warm, "chance": chance, "plot": png, "wall_s": wall,
            "table": "\n".join(lines)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SFT vs DFT demo on CPU (see docs/trainer.md)")
    p.add_argument("--out_dir", default="runs/demo")
    p.add_argument("--warm_steps", type=int, default=150, help="stage 1: shared SFT warm start")
    p.add_argument("--steps", type=int, default=150, help="stage 2: SFT and DFT fine-tuning steps each")
    p.add_argument("--sequential", action="store_true", help="run everything one after the other in this process")
    args = p.parse_args(argv)
    run_demo(out_dir=args.out_dir, warm_steps=args.warm_steps, steps=args.steps,
             parallel=False if args.sequential else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
