"""The training loop: ``train(cfg)``.  Single process, or torchrun with DDP / FSDP2."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import sys
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    broadcast_from_main,
    config_fingerprint,
    data_fingerprint,
    list_checkpoints,
    load_trainer_state,
    recover_output_dir,
    resolve_resume,
    resume_mismatches,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig

__all__ = ["train", "TrainingStopped"]


class TrainingStopped(RuntimeError):
    """The run stopped on a guard (a non-finite loss or gradient with ``on_nonfinite="stop"``).
    ``step`` is the offending optimizer step (1-based); ``checkpoint`` holds the last good state."""

    def __init__(self, message: str, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


# ----------------------------------------------------------------------------------- distributed

class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def on_main(self, fn: Callable):
        """``fn()`` run on rank 0 only; its result on every rank, or its Checkpoint/ConfigError raised
        on every rank (so no rank is left waiting in a collective)."""
        result = error = None
        if self.main:
            try:
                result = fn()
            except (CheckpointError, ConfigError) as e:
                error = (type(e), str(e))
        result, error = broadcast_from_main((result, error))
        if error is not None:
            raise error[0](error[1])
        return result

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current optimizer step and stops.
    A second signal restores the default behaviour (so a stuck run can still be killed)."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signum:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


# ------------------------------------------------------------------------------------------ setup

def _autocast_factory(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("precision: bf16 autocast is for GPUs; use fp32 (or auto) on CPU")
    if bf16:
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"
    return contextlib.nullcontext, "fp32"


def _optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on biases and norm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _wrap(cfg: TrainConfig, model, d: Dist):
    """DDP or FSDP2 under torchrun; the bare model otherwise.  Returns (train_module, fsdp_module)."""
    if d.world == 1:
        if cfg.fsdp:
            raise ConfigError("fsdp: needs more than one process; launch with torchrun --nproc_per_node N")
        return model, None
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return ddp, None


def _warn(msg: str) -> None:
    print(f"dft-train: warning: {msg}", file=sys.stderr, flush=True)


def _resume_state(cfg: TrainConfig, d: Dist, resume_path: str, data_fp: Optional[dict], position: dict) -> dict:
    """Load the checkpoint's trainer state and refuse it (unless ``force_resume``) when the config, the
    train file or the data position changed since it was written."""
    state = load_trainer_state(resume_path)

    def check():
        changes = resume_mismatches(state, cfg.to_dict(), data_fp, position)
        if changes and not cfg.force_resume:
            raise CheckpointError(
                f"resume: {resume_path} was written by a different run; what changed:\n  " + "\n  ".join(changes)
                + "\nrestore those settings, start a new output_dir, or pass --force_resume to continue anyway")
        for c in changes:
            _warn(f"--force_resume: resuming {resume_path} although {c}")

    d.on_main(check)
    return state


def _reference_info(cfg: TrainConfig, d: Dist, reference, state: Optional[dict]) -> Optional[dict]:
    """What a checkpoint records of the anchor's reference (its source and the sha256 of its parameters),
    or None without one.  Resuming, the rebuilt reference must match the checkpoint's record (unless
    ``force_resume``): the anchor of the resumed steps is the one the run started with."""
    if reference is None:
        return None
    info = d.on_main(lambda: {"source": reference.source, "sha256": reference.fingerprint()})
    if state is not None:
        def check():
            saved = state.get("reference")
            if saved == info:
                return
            what = (f"the checkpoint records no reference model, this run has {info['source']}" if saved is None else
                    f"the reference model differs: the checkpoint's is {saved.get('source')} (sha256 "
                    f"{str(saved.get('sha256'))[:12]}), this run's is {info['source']} (sha256 {info['sha256'][:12]})")
            if not cfg.force_resume:
                raise CheckpointError(f"resume: {what}; the anchor (kl_coef) must keep the run's reference: pass the "
                                      "same --ref-model (or none, for the initial model) and the same --model/--seed, "
                                      "or --force_resume to continue anyway")
            _warn(f"--force_resume: resuming although {what}")

        d.on_main(check)
    return info


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


# ------------------------------------------------------------------------------------------- train

def train(cfg: TrainConfig, on_step: Optional[Callable[[dict], None]] = None) -> dict:
    """Train ``cfg.model`` on ``cfg.train_file`` with ``cfg.objective``; returns a summary dict
    (final loss/NLL, held-out exact match, tokens/s, paths).  ``on_step(record)`` is called on
    every rank after each optimizer step with that step's metrics.  See docs/trainer.md."""
    cfg.validate()
    if not cfg.train_file:
        raise ConfigError("train_file: required (a .jsonl/.json/.parquet file); or run dft-train --demo")
    for name in ("train_file", "eval_file"):  # before anything loads: the error names the option
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name}: file not found: {path}")
    d = Dist()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        # every object that holds the process group (DDP's reducer, FSDP state) dies with the
        # frame of _run, before the group is destroyed
        return _run(cfg, d, on_step)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        d.close()


def _run(cfg: TrainConfig, d: Dist, on_step) -> dict:
    from .data import BatchPlan, collate, load_eval_examples, load_train_examples, pack_examples, single_rows
    from .evaluate import evaluate
    from .metrics import MetricsLogger, plot_metrics
    from .model import HeadStatsProbe, build_model, build_reference, load_tokenizer, packing_supported

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    if d.device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    def find_resume():
        recover_output_dir(cfg.output_dir)  # leftovers of a save that was killed: removed or put back
        path = resolve_resume(cfg.resume, cfg.output_dir)
        earlier = [os.path.basename(p) for p in list_checkpoints(cfg.output_dir)]
        if path is None and earlier:
            _warn(f"{cfg.output_dir} holds checkpoints of an earlier run ({', '.join(earlier)}); this run starts "
                  "from scratch and replaces them as it reaches their steps (--resume auto continues the "
                  "earlier run instead)")
        return path

    resume_path = d.on_main(find_resume)
    tokenizer = load_tokenizer(cfg)
    examples = load_train_examples(cfg.train_file, tokenizer, max_length=cfg.max_length,
                                   data_format=cfg.data_format, system_prompt=cfg.system_prompt,
                                   num_proc=cfg.num_proc)
    rows = pack_examples(examples, cfg.max_length, cfg.seed) if cfg.packing else single_rows(examples)
    plan = BatchPlan(len(rows), cfg.per_device_batch_size, cfg.grad_accum_steps, d.world, cfg.seed)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else plan.steps_per_epoch * cfg.num_epochs
    position = {"global_batch": plan.global_batch, "num_rows": len(rows), "seed": cfg.seed,
                "steps_per_epoch": plan.steps_per_epoch}
    data_fp = data_fingerprint(cfg.train_file) if d.main else None  # only rank 0 writes and checks
    state = _resume_state(cfg, d, resume_path, data_fp, position) if resume_path else None
    wheres = None if cfg.packing else [e.where for e in examples]  # rows[i] is examples[i]: name its line
    eval_examples = (load_eval_examples(cfg.eval_file, data_format=cfg.data_format,
                                        system_prompt=cfg.system_prompt, limit=cfg.eval_limit)
                     if cfg.eval_file else [])

    model, attn, initial = build_model(cfg, tokenizer, d.device,
                                       model_path=os.path.join(resume_path, "model") if resume_path else None)
    # the anchor (kl_coef > 0): a frozen reference, before the probe hooks the model
    reference = build_reference(cfg, tokenizer, d.device, attn, model, initial)
    del initial
    ref_info = _reference_info(cfg, d, reference, state)
    if cfg.packing:
        reason = packing_supported(attn)
        if reason:
            raise ConfigError(f"packing: {reason}")
    probe = HeadStatsProbe(model, getattr(model.config, "final_logit_softcapping", None)) if cfg.log_stats else None
    train_module, fsdp_module = _wrap(cfg, model, d)
    optimizer = _optimizer(cfg, model)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    autocast, precision = _autocast_factory(cfg, d.device)

    start_step, tokens_seen, nonfinite_steps, save_errors = 0, 0, 0, 0
    if resume_path:
        if fsdp_module is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(fsdp_module, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        nonfinite_steps = state.get("nonfinite_steps", 0)
        if d.main:
            print(f"dft-train: resumed from {resume_path} at step {start_step}")

    logger = MetricsLogger(cfg.output_dir, enabled=d.main, resume_step=start_step if resume_path else None,
                           tensorboard=cfg.tensorboard)
    stop = StopSignal()
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (d.main and cfg.progress_bar),
               desc=f"{cfg.objective}", dynamic_ncols=True)
    pad_id = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    # a checkpoint of the resumed step in output_dir is that step's state already: never rewritten
    same_dir = resume_path and os.path.realpath(os.path.dirname(os.path.abspath(resume_path))) == \
        os.path.realpath(cfg.output_dir)
    last_ckpt = resume_path if same_dir else None
    interrupted, stopped, history = None, None, []
    eval_result = None
    config_sha = config_fingerprint(cfg.to_dict())[1]

    def checkpoint(step: int, *, periodic: bool = False, rng: Optional[dict] = None) -> Optional[str]:
        """Save; a failed periodic save under on_save_error=continue is reported and returns None,
        any other failure raises CheckpointSaveError (the earlier checkpoints are intact)."""
        nonlocal save_errors
        state = {"step": step, "tokens_seen": tokens_seen, "world_size": d.world, "nonfinite_steps": nonfinite_steps,
                 "data": dict(position, **(data_fp or {})), "config": cfg.to_dict(), "config_sha256": config_sha}
        if ref_info is not None:
            state["reference"] = ref_info
        try:
            return save_checkpoint(cfg.output_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                   scheduler=scheduler, state=state, fsdp_module=fsdp_module,
                                   save_total_limit=cfg.save_total_limit, rng=rng)
        except CheckpointSaveError as e:
            save_errors += 1
            if periodic and cfg.on_save_error == "continue":
                if d.main:
                    bar.write(f"dft-train: error: checkpoint at step {step} failed: {e}; on_save_error=continue: "
                              f"training goes on and saves again at step {step + cfg.save_steps}", file=sys.stderr)
                return None
            hint = " (on_save_error=continue keeps training instead)" if periodic else ""
            raise CheckpointSaveError(f"checkpoint at step {step} failed, stopping{hint}: {e}") from None

    def run_eval(step: int) -> dict:
        correct, n, samples = evaluate(model, tokenizer, eval_examples, max_new_tokens=cfg.eval_max_new_tokens,
                                       batch_size=cfg.eval_batch_size, device=d.device, autocast_ctx=autocast,
                                       rank=d.rank, world=d.world, shard=fsdp_module is None)
        if fsdp_module is None:
            t = d.all_reduce(torch.tensor([correct, n], dtype=torch.float64, device=d.device))
            correct, n = int(t[0]), int(t[1])
        rec = {"step": step, "eval/exact_match": correct / max(n, 1), "eval/correct": correct, "eval/n": n}
        logger.log(rec)
        if d.main:
            for s in samples[:1]:
                print(f"dft-train: eval sample {s['where']}: prediction {s['prediction']!r}, "
                      f"answer {s['answer']!r}")
        return rec

    def describe_batch(micro: list, micro_ok: list) -> str:
        """The micro-batches of a non-finite step, by source line, from every rank."""
        bad = [m for m, ok in enumerate(micro_ok) if not bool(ok)]
        lines = []
        for m in bad or range(len(micro)):
            src = ", ".join(wheres[i] for i in micro[m]) if wheres else f"packed rows {micro[m]}"
            what = "non-finite loss" if bad else "loss finite"
            lines.append(f"rank {d.rank} micro-batch {m} ({what}): {src}")
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, lines)
            lines = [x for part in gathered for x in part]
        return "; ".join(lines)

    try:
        model.train()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            step_rng = rng_state() if cfg.on_nonfinite == "stop" else None  # for the checkpoint of a bad step
            micro = plan.micro_batches(step, d.rank)
            batches = [collate([rows[i] for i in mb], pad_id) for mb in micro]
            targets = float(sum(rows[i].num_targets for mb in micro for i in mb))
            in_tokens = float(sum(len(rows[i].input_ids) for mb in micro for i in mb))
            counts = d.all_reduce(torch.tensor([targets, in_tokens], dtype=torch.float64, device=d.device))
            num_items = counts[0].to(torch.float32).clamp_min(1.0)  # targets in the whole window, all ranks
            if probe is not None:
                probe.reset(d.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
            micro_ok = []
            for m, batch in enumerate(batches):
                last = m == len(batches) - 1
                batch = {k: v.to(d.device) for k, v in batch.items()}
                if fsdp_module is not None:
                    fsdp_module.set_requires_gradient_sync(last)
                    sync_ctx = contextlib.nullcontext()
                elif d.world > 1 and not last:
                    sync_ctx = train_module.no_sync()
                else:
                    sync_ctx = contextlib.nullcontext()
                with sync_ctx:
                    with autocast():
                        anchor = {}
                        if reference is not None:  # a second forward, no graph: the reference's hidden states
                            anchor = dict(ref_hidden_states=reference.hidden_states(batch["input_ids"],
                                                                                    batch["position_ids"]),
                                          ref_lm_head=reference.head)
                        if probe is not None:
                            probe.labels = batch["labels"]
                        out = train_module(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                           labels=batch["labels"], num_items_in_batch=num_items, use_cache=False,
                                           **anchor)
                    loss = out.loss
                    # DDP / FSDP average gradients over ranks; the loss is already a share of the global
                    # sum / global target count, so scale by the world size to get the plain sum back.
                    (loss * d.world if d.world > 1 else loss).backward()
                loss_sum += loss.detach().double()
                micro_ok.append(torch.isfinite(loss.detach()))  # read only if the step turns out non-finite
            lr = scheduler.get_last_lr()[0]
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            parts = [loss_sum.reshape(1)]
            if probe is not None:
                parts.append(probe.sums)
            parts.append(torch.tensor([float(stop.signum)], dtype=torch.float64, device=d.device))
            red = d.all_reduce(torch.cat(parts))
            # the same decision on every rank: the summed loss and the synchronised gradient norm
            finite = math.isfinite(float(red[0])) and math.isfinite(float(grad_norm))
            if not finite:
                what = " and ".join(n for n, v in (("loss", float(red[0])), ("gradient norm", float(grad_norm)))
                                    if not math.isfinite(v))
                problem = (f"step {step + 1}: non-finite {what} (loss {float(red[0])}, gradient norm "
                           f"{float(grad_norm)}); batch: {describe_batch(micro, micro_ok)}")
            if finite:
                optimizer.step()
            if finite or cfg.on_nonfinite == "skip":
                scheduler.step()  # a skipped step keeps the schedule's length: the lr still moves on
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": float(red[0]), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": float(counts[1]) / dt, "num_target_tokens": int(counts[0]),
                   "tokens_seen": tokens_seen + int(counts[1]), "peak_mem_gb": _peak_mem_gb(d.device),
                   "nonfinite_steps": nonfinite_steps + (not finite)}
            if probe is not None:
                rec.update(HeadStatsProbe.finish(red[1:-1]))
                rec.pop("target_tokens")
            if not finite:
                rec["skipped"] = True
            if not finite and cfg.on_nonfinite == "stop":  # the counters stay those after step `step`
                logger.log(rec)  # the failed step stays visible; a resume from `step` drops it
                done = last_ckpt is not None and os.path.basename(last_ckpt) == f"checkpoint-{step}"
                try:
                    ck = last_ckpt if done else checkpoint(step, rng=step_rng)
                except CheckpointSaveError as e:
                    raise CheckpointSaveError(f"{problem}; stopping (on_nonfinite=stop), but {e}") from None
                last_ckpt = ck
                stopped = (problem, step + 1, ck)
                if d.main:
                    bar.write(f"dft-train: error: {problem}", file=sys.stderr)
                break
            tokens_seen, nonfinite_steps = rec["tokens_seen"], rec["nonfinite_steps"]
            if not finite and d.main:
                bar.write(f"dft-train: warning: {problem}; update skipped (on_nonfinite=skip, "
                          f"{nonfinite_steps} so far)", file=sys.stderr)
            history.append(rec)
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps or not finite:
                logger.log(rec)
            bar.update(1)
            if on_step is not None:
                on_step(dict(rec))
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            signalled = int(red[-1].item()) != 0
            if signalled:
                interrupted = signal.Signals(stop.signum or signal.SIGTERM).name
                last_ckpt = checkpoint(step + 1)
                if d.main:
                    bar.write(f"dft-train: {interrupted} received; checkpoint written to {last_ckpt}")
                break
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                last_ckpt = checkpoint(step + 1, periodic=True) or last_ckpt
            if eval_examples and cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < total_steps:
                run_eval(step + 1)
        bar.close()
        stop.restore()

        final_step = history[-1]["step"] if history else start_step
        if interrupted is None and stopped is None:
            if eval_examples:
                eval_result = run_eval(final_step)
            if cfg.save_final and not (last_ckpt and os.path.basename(last_ckpt) == f"checkpoint-{final_step}"):
                last_ckpt = checkpoint(final_step)
    finally:
        bar.close()
        stop.restore()
        logger.close()
        if probe is not None:
            probe.remove()
    if stopped is not None:
        problem, bad_step, ck = stopped
        raise TrainingStopped(f"{problem}; stopped (on_nonfinite=stop; on_nonfinite=skip skips such steps); "
                              f"the state after step {bad_step - 1} is saved in {ck}", bad_step, ck)
    plot = None
    if d.main and cfg.plot and history and logger.enabled:
        plot = plot_metrics(logger.path, os.path.join(cfg.output_dir, "curves.png"), label=cfg.objective)
    good = [r for r in history if not r.get("skipped")]
    tail = good[-max(1, min(10, len(good))):]
    timed = good[1:] or good
    summary = {
        "objective": cfg.objective, "steps": final_step, "interrupted": interrupted,
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if good else None,
        "final_nll": (sum(r["nll"] for r in tail) / len(tail)) if good and "nll" in tail[0] else None,
        "eval_exact_match": eval_result["eval/exact_match"] if eval_result else None,
        "eval_n": eval_result["eval/n"] if eval_result else 0,
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed) if timed else None,
        "losses": [r["loss"] for r in history], "precision": precision, "attn_implementation": attn,
        "output_dir": cfg.output_dir, "metrics": logger.path, "plot": plot, "checkpoint": last_ckpt,
        "wall_s": time.time() - t_start, "world_size": d.world, "nonfinite_steps": nonfinite_steps,
        "save_errors": save_errors,
    }
    return summary
