"""The demo's units of work.  ``run_job(spec)`` runs one in a worker process of the demo's pool
(its output goes to ``<dir>/job.log``, its result to ``<dir>/result.json`` and back to the caller).
Kinds:

* ``train``: ``dk.train.train`` on a ``TrainConfig``, checkpointing every ``eval_every`` steps;
  then every checkpoint is scored on the held-out sets (a curve), and the final model's
  probability of each training target token is recorded (the histogram).
* ``score``: the same scoring and token probabilities for an existing model (the warm start).
* ``sample``: offline-RL data from a model: ``num_samples`` completions per problem at
  ``temperature`` (full softmax), kept when the extracted answer matches the reference.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import time

import torch

__all__ = ["run_job", "score_model", "sample_verified", "keep_verified"]


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    from .config import TrainConfig
    from .model import load_tokenizer

    tokenizer = load_tokenizer(TrainConfig(model=model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return model, tokenizer


def score_model(model_dir: str, eval_sets: dict, *, max_new_tokens: int, batch_size: int,
                probs_file: str | None = None, probs_limit: int = 0) -> dict:
    """Greedy exact match on each held-out set ``{name: path}``, and (with ``probs_file``) the
    probability of every target token of its first ``probs_limit`` examples (0 = all)."""
    from .data import load_eval_examples, load_train_examples, single_rows
    from .demo_data import target_kinds
    from .evaluate import evaluate, target_token_probs

    model, tokenizer = _load(model_dir)
    out = {}
    for name, path in eval_sets.items():
        examples = load_eval_examples(path)
        correct, n, _ = evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 device=torch.device("cpu"), autocast_ctx=contextlib.nullcontext)
        out[name] = correct / n
    if probs_file:
        rows = single_rows(load_train_examples(probs_file, tokenizer, max_length=model.config.max_position_embeddings))
        rows = rows[:probs_limit] if probs_limit else rows
        probs = target_token_probs(model, rows, pad_token_id=tokenizer.pad_token_id)
        out["probs"] = [round(p, 5) for p in probs.tolist()]
        out["kinds"] = target_kinds(tokenizer, rows)
    return out


def sample_verified(model_dir: str, problems_file: str, out_file: str, *, num_samples: int, temperature: float,
                    max_new_tokens: int, batch_size: int, seed: int, start: int = 0, stop: int | None = None) -> dict:
    """Rejection sampling: ``num_samples`` completions per problem ``start:stop`` of ``problems_file``;
    the ones whose extracted answer matches the reference go to ``out_file`` as problem/solution."""
    from .data import load_eval_examples
    from .evaluate import generate_answers

    model, tokenizer = _load(model_dir)
    model.eval()
    torch.manual_seed(seed)
    examples = load_eval_examples(problems_file)[start:stop]
    completions = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, device=torch.device("cpu"),
                                   autocast_ctx=contextlib.nullcontext, temperature=temperature,
                                   num_samples=num_samples)
    kept = keep_verified(examples, completions, num_samples)
    tmp = out_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, out_file)
    return {"problems": len(examples), "samples": len(completions), "kept": len(kept)}


def keep_verified(examples, completions: list, num_samples: int) -> list[dict]:
    """The completions (``num_samples`` per example, in order) whose extracted answer matches the
    example's reference answer, as problem/solution records."""
    from .answers import extract_answer, is_match

    if len(completions) != len(examples) * num_samples:
        raise ValueError(f"completions: expected {len(examples)} x {num_samples}, got {len(completions)}")
    kept = []
    for i, text in enumerate(completions):
        ex = examples[i // num_samples]
        if is_match(extract_answer(text), ex.answer):
            kept.append({"problem": ex.prompt[-1]["content"], "solution": text.strip(), "answer": ex.answer})
    return kept


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    found = []
    for d in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m:
            found.append((int(m.group(1)), d))
    return sorted(found)


def _train_and_score(job: dict) -> dict:
    import dataclasses

    from .config import TrainConfig
    from .loop import train

    cfg = TrainConfig(**job["config"])
    if job.get("eval_every"):
        cfg = dataclasses.replace(cfg, save_steps=job["eval_every"], save_total_limit=0)
    summary = train(cfg)
    curve = []
    ckpts = _checkpoints(cfg.output_dir)
    for step, path in ckpts:
        last = step == ckpts[-1][0]
        scores = score_model(os.path.join(path, "model"), job.get("eval_sets", {}),
                             max_new_tokens=job["max_new_tokens"], batch_size=job["batch_size"],
                             probs_file=job.get("probs_file") if last else None,
                             probs_limit=job.get("probs_limit", 0))
        if last:
            summary["probs"], summary["kinds"] = scores.pop("probs", None), scores.pop("kinds", None)
        curve.append(dict(step=step, **scores))
        if not last:
            shutil.rmtree(path)  # only the final checkpoint is kept
    keep = ("objective", "steps", "final_loss", "final_nll", "tokens_per_s", "wall_s", "checkpoint", "metrics")
    out = {k: summary.get(k) for k in keep}
    out["probs"], out["kinds"] = summary.get("probs"), summary.get("kinds")
    out["curve"] = curve
    out["train_examples"] = sum(1 for line in open(cfg.train_file, encoding="utf-8") if line.strip())
    return out


def _dispatch(job: dict) -> dict:
    kind = job["kind"]
    if kind == "train":
        return _train_and_score(job)
    if kind == "score":
        return score_model(job["model"], job["eval_sets"], max_new_tokens=job["max_new_tokens"],
                           batch_size=job["batch_size"], probs_file=job.get("probs_file"),
                           probs_limit=job.get("probs_limit", 0))
    if kind == "sample":
        return sample_verified(job["model"], job["problems"], job["sample_out"], num_samples=job["num_samples"],
                               temperature=job["temperature"], max_new_tokens=job["max_new_tokens"],
                               batch_size=job["batch_size"], seed=job["seed"], start=job.get("start", 0),
                               stop=job.get("stop"))
    raise ValueError(f"job kind: unknown {kind!r} (train, score, sample)")


def run_job(job: dict) -> dict:
    """Run ``job`` with ``job["threads"]`` torch threads, printing into ``<dir>/job.log``; the
    result is also written to ``<dir>/result.json``."""
    os.makedirs(job["dir"], exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(job.get("threads") or threads))
    cpu0 = time.process_time()
    try:
        with open(os.path.join(job["dir"], "job.log"), "w", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = _dispatch(job)
    finally:
        torch.set_num_threads(threads)
    result["cpu_s"] = time.process_time() - cpu0   # this process, all threads
    _write_json(os.path.join(job["dir"], "result.json"), result)
    return result
