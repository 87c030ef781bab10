"""The embedded demo: the DFT paper's two settings at toy scale, on CPU (see docs/demo.md).

``python -m dft_kernels.train.demo`` (what ``make demo`` runs; ``--seeds 3`` for mean ± std).
Everything is generated locally: the data (``demo_data``), the character tokenizer and a tiny
randomly initialised Qwen2.  Per seed:

1. **Warm start** ("pretraining"): SFT of the random model on broad arithmetic (2-4 term chains)
   at a from-scratch learning rate; it gives the base model that both settings fine-tune.
2. **Setting A, expert demonstrations**: SFT (objective ``ce``), DFT (``dft``) and ASFT (``dft`` plus
   ``asft_kl_coef`` x KL to the frozen warm start) fine-tune the warm start on worked solutions of the
   harder problems (3-4 terms), identical settings, a learning rate 10x below the warm start's;
   held-out exact match every ``eval_every`` steps.
3. **Setting B, offline RL**: the warm start samples ``num_samples`` solutions per fine-tuning
   problem at temperature 1; the ones with the right answer are the data; RFT (``ce`` on them),
   DFT and ASFT fine-tune on exactly that data, same settings and curves.
4. **Token probabilities** of the fine-tuning targets under the warm start and after each run.

Every unit of work is a process (``demo_jobs``); independent ones run side by side, one per core.
The training itself is ``dk.train.train`` with the loss from ``dk.patch`` (``dk.linear_cross_entropy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

from .config import TrainConfig
from .demo_data import write_demo_suite
from .demo_report import SETTINGS

__all__ = ["DemoOptions", "run_demo", "demo_config", "chance_accuracy"]

# identical for every run; only objective, lr, steps, model, data and seed differ
DEMO_SETTINGS = dict(
    model="tiny", max_length=96, per_device_batch_size=32, grad_accum_steps=1, warmup_ratio=0.1,
    weight_decay=0.01, max_grad_norm=1.0, tiny_hidden_size=128, tiny_num_layers=3, tiny_num_heads=4,
    tiny_num_kv_heads=2, tiny_intermediate_size=384, save_total_limit=1, logging_steps=1, progress_bar=False,
    plot=False,
)


@dataclasses.dataclass
class DemoOptions:
    """What the demo runs.  Defaults: one seed in about 5 minutes on 2 idle CPU cores."""
    seeds: int = 1                  # seeds 0..seeds-1: model init, data order and sampling of every run
    warm_steps: int = 450           # stage 1 steps (SFT of the random model)
    warm_lr: float = 1e-3           # stage 1 peak learning rate (training from scratch)
    steps: int = 100                # fine-tuning steps of every run in settings A and B
    lr: float = 1e-4                # fine-tuning peak learning rate: 10x below the warm start's
    eval_every: int = 20            # held-out exact match every this many fine-tuning steps
    n_heldout: int = 200            # problems in each held-out set (easy: 3 terms, hard: 4 terms)
    rft_problems: int = 1000        # setting B: fine-tuning problems sampled from
    num_samples: int = 4            # setting B: samples per problem
    temperature: float = 1.0        # setting B: sampling temperature
    asft_kl_coef: float = 0.1       # ASFT: DFT + this x KL(warm start || model), LLaMA-Factory's asft_alpha
    settings: str = "AB"            # which settings run: AB, A or B (A alone skips the sampling)
    probs_examples: int = 500       # fine-tuning examples whose target-token probabilities are recorded
    eval_batch_size: int = 200
    max_new_tokens: int = 64
    jobs: int = 0                   # processes side by side (0: one per CPU core)
    out_dir: str = "runs/demo"
    overrides: dict = dataclasses.field(default_factory=dict)   # extra TrainConfig fields (tests)


def chance_accuracy(train_path: str, heldout_path: str) -> tuple[float, str]:
    """Accuracy of always answering the most frequent training answer (the 'chance' baseline)."""
    with open(train_path) as f:
        train = [json.loads(line)["answer"] for line in f]
    with open(heldout_path) as f:
        held = [json.loads(line)["answer"] for line in f]
    top = max(set(train), key=lambda a: (train.count(a), a))
    return sum(a == top for a in held) / len(held), top


def demo_config(objective: str, output_dir: str, train_file: str, max_steps: int, lr: float, seed: int,
                **overrides) -> TrainConfig:
    values = dict(DEMO_SETTINGS, objective=objective, train_file=train_file, output_dir=output_dir,
                  max_steps=max_steps, lr=lr, seed=seed)
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------- scheduling

@dataclasses.dataclass
class Job:
    name: str
    spec: dict
    deps: tuple = ()
    before: Optional[Callable[[], Optional[str]]] = None   # runs here right before launch; a string = skip, why
    result: Optional[dict] = None


def _progress(job: Job) -> str:
    if job.spec["kind"] != "train":
        return job.name
    try:
        with open(os.path.join(job.spec["config"]["output_dir"], "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if '"loss"' in line]
    except (OSError, ValueError):
        recs = []
    total = job.spec["config"]["max_steps"]
    if len(recs) >= total:
        return f"{job.name} scoring"
    return f"{job.name} {recs[-1]['step']}/{total}" if recs else f"{job.name} starting"


def _threads(ncpu: int, others: bool) -> int:
    """All cores for a lone job on an idle machine; one thread otherwise (oversubscribed OpenMP
    threads slow a small model down several times)."""
    if others:
        return 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return ncpu if busy < ncpu / 2 else 1


def run_jobs(jobs: list[Job], slots: int, ncpu: int, report_every: float = 15.0) -> None:
    """Run ``jobs`` (a DAG through ``deps``; list order = priority) in a pool of ``slots`` worker
    processes, each importing torch/transformers once."""
    import concurrent.futures as cf
    import multiprocessing

    from .demo_jobs import run_job

    by_name = {j.name: j for j in jobs}
    pending, running = list(jobs), {}
    with cf.ProcessPoolExecutor(max_workers=slots, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            while pending or running:
                ready = [j for j in pending if all(by_name[d].result is not None for d in j.deps)]
                while ready and len(running) < slots:
                    j = ready.pop(0)
                    pending.remove(j)
                    skip = j.before() if j.before is not None else None
                    if skip:
                        j.result = {"skipped": skip}
                        print(f"demo: {j.name} skipped: {skip}", flush=True)
                        continue
                    spec = dict(j.spec, threads=_threads(ncpu, bool(ready or running)))
                    running[pool.submit(run_job, spec)] = j
                if not running:
                    continue
                done, _ = cf.wait(list(running), timeout=report_every, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    j = running.pop(fut)
                    try:
                        j.result = fut.result()
                    except Exception as e:
                        raise RuntimeError(f"demo: job {j.name} failed: {e!r}; log {j.spec['dir']}/job.log") from e
                if not done:
                    print("demo: " + " | ".join(_progress(j) for j in running.values()), flush=True)
        except BaseException:
            for fut in running:
                fut.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()  # a running job cannot be cancelled otherwise
            raise


# ------------------------------------------------------------------------------------------- plan

def _merge_samples(parts: list, out: str, min_rows: int) -> Callable[[], Optional[str]]:
    """Concatenate the samplers' verified samples; a reason to skip setting B when they are
    fewer than one batch (a warm start that solves almost nothing)."""
    def go():
        rows = []
        for p in parts:
            with open(p, encoding="utf-8") as g:
                rows += [line for line in g if line.strip()]
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(rows)
        os.replace(tmp, out)
        if len(rows) < min_rows:
            return f"only {len(rows)} of the warm start's samples were correct, fewer than one batch ({min_rows})"
        return None
    return go


def plan(opts: DemoOptions, paths: dict, seed: int, shards: int) -> list[Job]:
    """The jobs of one seed: warm start, its scores and samples, settings A and B."""
    root = os.path.join(opts.out_dir, f"seed{seed}")
    ev = dict(eval_sets={"hard": paths["heldout_hard"], "easy": paths["heldout_easy"]},
              max_new_tokens=opts.max_new_tokens, batch_size=opts.eval_batch_size)
    probs = dict(probs_file=paths["finetune"], probs_limit=opts.probs_examples)

    def train_job(name, objective, train_file, steps, lr, model, deps, before=None, eval_every=0, extra=None,
                  anchor=None):
        out = os.path.join(root, name)
        cfg = demo_config(objective, out, train_file, steps, lr, seed, model=model, **(anchor or {}),
                          **opts.overrides)
        spec = dict(kind="train", dir=out, config=cfg.to_dict(), eval_every=eval_every, **ev, **(extra or {}))
        return Job(f"seed{seed}/{name}", spec, deps, before)

    warm_dir = os.path.join(root, "warmstart")
    warm_model = os.path.join(warm_dir, f"checkpoint-{opts.warm_steps}", "model")
    warm = train_job("warmstart", "ce", paths["warmstart"], opts.warm_steps, opts.warm_lr, "tiny", ())
    warm.spec["eval_sets"] = {}  # scored by the next job, with the token probabilities
    jobs = [warm, Job(f"seed{seed}/warmstart-score", dict(kind="score", dir=os.path.join(root, "warmstart-score"),
                                                          model=warm_model, **ev, **probs), (warm.name,))]
    n = opts.rft_problems
    bounds = [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]
    samples = [Job(f"seed{seed}/sample{i}", dict(
        kind="sample", dir=os.path.join(root, f"sample{i}"), model=warm_model, problems=paths["finetune"],
        sample_out=os.path.join(root, f"sample{i}", "verified.jsonl"), num_samples=opts.num_samples,
        temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, batch_size=opts.eval_batch_size,
        seed=1000 * seed + i, start=a, stop=b), (warm.name,)) for i, (a, b) in enumerate(bounds)]
    rft_file = os.path.join(root, "rft.jsonl")
    batch = opts.overrides.get("per_device_batch_size", DEMO_SETTINGS["per_device_batch_size"])
    merge = _merge_samples([s.spec["sample_out"] for s in samples], rft_file, batch)
    def methods(setting):
        return [(label, *method_config(label, opts)) for label in SETTINGS[setting][1]]

    a_runs = [train_job(f"A-{label}", obj, paths["finetune"], opts.steps, opts.lr, warm_model, (warm.name,),
                        eval_every=opts.eval_every, extra=probs, anchor=anchor) for label, obj, anchor in methods("A")]
    b_runs = [train_job(f"B-{label}", obj, rft_file, opts.steps, opts.lr, warm_model, tuple(s.name for s in samples),
                        before=merge, eval_every=opts.eval_every, extra=probs, anchor=anchor)
              for label, obj, anchor in methods("B")]
    if "B" not in opts.settings:
        samples, b_runs = [], []
    if "A" not in opts.settings:
        a_runs = []
    # order = launch priority: the samplers before the A runs so that B can start early
    return jobs[:1] + samples + a_runs + jobs[1:] + b_runs


def method_config(label: str, opts: DemoOptions) -> tuple:
    """``(objective, anchor options)`` of a run label: SFT and RFT are ``ce``, DFT is ``dft``, ASFT is ``dft``
    plus ``asft_kl_coef`` x KL(warm start || model) (forward KL; the reference is the frozen warm start)."""
    if label in ("SFT", "RFT"):
        return "ce", {}
    if label == "DFT":
        return "dft", {}
    if label == "ASFT":
        return "dft", {"kl_coef": opts.asft_kl_coef, "kl": "forward"}
    raise ValueError(f"unknown demo method {label!r}")


# -------------------------------------------------------------------------------------------- run

def run_demo(options: Optional[DemoOptions] = None, *, docs: Optional[str] = None, plot: Optional[str] = None,
             command: str = "python -m dft_kernels.train.demo", **kwargs) -> dict:
    """Run the demo (``DemoOptions`` or its fields as keywords); print both settings' tables and
    write the plot.  ``docs``: a markdown file whose generated block is replaced by the tables."""
    from .demo_report import collect, format_tables, plot_demo, write_docs_block

    opts = options or DemoOptions(**kwargs)
    if options is not None and kwargs:
        raise TypeError("run_demo: pass DemoOptions or keyword fields, not both")
    if opts.seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {opts.seeds}")
    if opts.settings not in ("AB", "A", "B"):
        raise ValueError(f"settings: expected AB, A or B, got {opts.settings!r}")
    if not opts.asft_kl_coef > 0:
        raise ValueError(f"asft_kl_coef: must be > 0 (ASFT's anchor), got {opts.asft_kl_coef}")
    t0 = time.time()
    r0 = _child_cpu_s()
    paths = write_demo_suite(os.path.join(opts.out_dir, "data"), n_heldout=opts.n_heldout)
    ncpu = os.cpu_count() or 1
    slots = opts.jobs or ncpu
    print(f"demo: {opts.seeds} seed(s); data in {os.path.dirname(paths['finetune'])}; {slots} job(s) side by side; "
          f"logs in {opts.out_dir}/seed*/<job>/job.log", flush=True)
    jobs = [j for s in range(opts.seeds) for j in plan(opts, paths, s, shards=max(1, min(slots, 4)))]
    run_jobs(jobs, slots, ncpu)
    results = collect(jobs, opts)
    results["chance"] = {name: chance_accuracy(paths["finetune"], paths[f"heldout_{name}"])[0]
                         for name in ("hard", "easy")}
    tables = format_tables(results, opts)
    png = plot or os.path.join(opts.out_dir, "demo.png")
    plot_demo(results, opts, png)
    wall, cpu = time.time() - t0, _child_cpu_s() - r0
    print()
    print(tables["text"])
    print(f"plot: {png}\nwall time: {wall:.0f} s (CPU time of all jobs {cpu:.0f} s, {ncpu} cores, "
          f"load average at the end {_load():.1f})")
    if docs:
        write_docs_block(docs, tables["markdown"], png, command=command, wall=wall, cpu=cpu)
        print(f"docs: results block of {docs} regenerated")
    return {"results": results, "table": tables["text"], "plot": png, "wall_s": wall, "cpu_s": cpu,
            "paths": paths}


def _child_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    d = DemoOptions()
    p = argparse.ArgumentParser(description="The DFT paper's two settings (expert demonstrations: SFT vs DFT; "
                                "offline RL: RFT vs DFT) on synthetic arithmetic, on CPU. See docs/demo.md.")
    for f in dataclasses.fields(DemoOptions):
        if f.name == "overrides":
            continue
        p.add_argument(f"--{f.name}", type=type(getattr(d, f.name)), default=getattr(d, f.name),
                       help=f"default {getattr(d, f.name)}")
    p.add_argument("--docs", default=None, help="markdown file whose generated results block is replaced")
    p.add_argument("--plot", default=None, help="PNG path (default OUT_DIR/demo.png)")
    args = vars(p.parse_args(argv))
    docs, plot = args.pop("docs"), args.pop("plot")
    argv = sys.argv[1:] if argv is None else list(argv)
    run_demo(DemoOptions(**args), docs=docs, plot=plot, command=" ".join(["python -m dft_kernels.train.demo", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
