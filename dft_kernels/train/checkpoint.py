"""Checkpoints: model + tokenizer (save_pretrained, safetensors), optimizer, scheduler, RNG states and
data position, with a manifest of sizes and sha256 checksums; written so that no crash loses a complete one.

Layout of ``output_dir/checkpoint-<step>/``: ``model/`` (loadable with ``from_pretrained``),
``trainer_state.pt``, ``trainer_state.json`` and ``manifest.json``.  Write protocol (rank 0):

1. every file goes to ``.tmp-checkpoint-<step>/`` and is fsync'ed;
2. ``manifest.json`` (size and sha256 of every other file) is written last, so a directory without
   one is incomplete by definition;
3. the directory is renamed to ``checkpoint-<step>`` (one atomic rename; an existing checkpoint of the
   same step is first renamed to ``.old-checkpoint-<step>`` and removed after);
4. checkpoints beyond ``save_total_limit`` are renamed to ``.trash-checkpoint-<step>`` and removed, so a
   half-deleted directory never carries a checkpoint's name.

A process killed anywhere in there leaves only hidden leftovers; :func:`recover_output_dir` removes them
(or puts back an ``.old-`` checkpoint whose replacement never arrived) at the next start, and
:func:`verify_checkpoint` checks the manifest before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_trainer_state", "find_latest_checkpoint", "list_checkpoints",
           "verify_checkpoint", "recover_output_dir", "resolve_resume", "resume_mismatches", "data_fingerprint",
           "config_fingerprint", "rng_state", "set_rng_state", "CheckpointError", "CheckpointSaveError",
           "RESUME_NEUTRAL_FIELDS"]

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
MANIFEST_FORMAT = "dft_kernels-checkpoint/1"
_CKPT = re.compile(r"checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"\.(tmp|old|trash)-checkpoint-(\d+)$")

# Fault-injection seam for tests: called as ``save_hook(stage, path)`` at each stage of a save
# ("begin", "model", "state", "manifest", "replace", "renamed", "prune").  None in normal use.
save_hook: Optional[Callable[[str, str], None]] = None

# TrainConfig fields that may change between a checkpoint and its resume without changing what the
# run computes (outputs, logging, evaluation, fault policies, how the same global batch is split or
# sharded).  Every other field is compared; the train file is compared by content (sha256), not path.
RESUME_NEUTRAL_FIELDS = frozenset({
    "output_dir", "resume", "force_resume", "progress_bar", "plot", "tensorboard", "logging_steps", "save_steps",
    "save_total_limit", "save_final", "eval_file", "eval_steps", "eval_max_new_tokens", "eval_batch_size",
    "eval_limit", "on_save_error", "on_nonfinite", "num_proc", "train_file", "per_device_batch_size",
    "grad_accum_steps", "fsdp", "attn_implementation", "gradient_checkpointing", "use_liger"})


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, quota, I/O error...); the previous checkpoints are intact."""


def _warn(msg: str) -> None:
    print(f"dft-train: warning: {msg}", file=sys.stderr, flush=True)


def _stage(name: str, path: str) -> None:
    if save_hook is not None:
        save_hook(name, path)


# ------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    st = np.random.get_state()
    out = {"python": random.getstate(), "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), st[2], st[3], st[4]),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files and manifest

def file_sha256(path: str) -> str:
    # hashlib.file_digest is Python 3.11+; the package supports 3.10
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_many(paths: list[str]) -> list[str]:
    """sha256 of several files at once: hashlib releases the GIL, so shards hash on several cores."""
    if len(paths) <= 1:
        return [file_sha256(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(file_sha256, paths))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(p for p in out if p != MANIFEST)


def write_manifest(ckpt_dir: str, step: int) -> None:
    """fsync every file of ``ckpt_dir`` and write ``manifest.json`` (size + sha256 of each) last."""
    rels = _files(ckpt_dir)
    paths = [os.path.join(ckpt_dir, rel) for rel in rels]
    for path in paths:
        _fsync(path)
    files = {rel: {"bytes": os.path.getsize(path), "sha256": digest}
             for rel, path, digest in zip(rels, paths, _sha256_many(paths))}
    tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))
    for d, _, _ in os.walk(ckpt_dir):
        _fsync(d)


def verify_checkpoint(path: str) -> dict:
    """Check ``path`` against its manifest (every file present, same size, same sha256); returns the
    manifest, or raises CheckpointError naming the first file that is missing, truncated or corrupt."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path}: incomplete checkpoint: no {MANIFEST} (the save did not finish, or it was "
                              "written by a dft_kernels without manifests)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: corrupt manifest: {e}") from None
    if STATE_FILE not in files:
        raise CheckpointError(f"{mpath}: corrupt manifest: it does not list {STATE_FILE}")
    for rel, meta in files.items():  # sizes first: cheap, and they catch truncation
        fpath = os.path.join(path, rel)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{fpath}: missing (listed in {MANIFEST})")
        size = os.path.getsize(fpath)
        if size != meta["bytes"]:
            kind = "truncated" if size < meta["bytes"] else "wrong size"
            raise CheckpointError(f"{fpath}: {kind}: {size} bytes, the manifest says {meta['bytes']}")
    fpaths = [os.path.join(path, rel) for rel in files]
    for fpath, meta, digest in zip(fpaths, files.values(), _sha256_many(fpaths)):
        if digest != meta["sha256"]:
            raise CheckpointError(f"{fpath}: corrupt: sha256 {digest[:16]}... does not match the manifest's "
                                  f"{meta['sha256'][:16]}...")
    return manifest


# ----------------------------------------------------------------------------------- distributed

def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); identity without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------- save

def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, optimizer, scheduler, state: dict,
                    fsdp_module=None, save_total_limit: int = 0, rng: Optional[dict] = None) -> str:
    """Write ``output_dir/checkpoint-<step>`` (protocol in the module docstring); every rank must call this.

    ``model`` is the unwrapped HF model; ``fsdp_module`` the fully_shard-ed module when training
    with FSDP2 (its full state dict is gathered to rank 0).  ``state`` holds the loop's own
    state (step, data position, tokens seen...); RNG states are added here (``rng``, or the current
    ones).  Any error while writing
    raises CheckpointSaveError on every rank after the partial directory is removed; the previous
    checkpoints are untouched.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if fsdp_module is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(fsdp_module, options=opts)
        optim_sd = get_optimizer_state_dict(fsdp_module, optimizer, options=opts)
    else:
        model_sd, optim_sd = None, optimizer.state_dict()
    error = None
    if _is_main():
        tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
        try:
            full = dict(state, optimizer=optim_sd, scheduler=scheduler.state_dict(),
                        rng=rng if rng is not None else rng_state())
            _write(tmp, final, step, model=model, model_sd=model_sd, tokenizer=tokenizer, state=full)
        except Exception as e:  # noqa: BLE001 - whatever the writer raised (OSError, SafetensorError, torch's
            shutil.rmtree(tmp, ignore_errors=True)  # RuntimeError from its zip writer), the save failed
            old = os.path.join(output_dir, ".old-" + os.path.basename(final))
            if os.path.isdir(old) and not os.path.exists(final):  # failed halfway through a replacement
                os.rename(old, final)
            prev = list_checkpoints(output_dir)
            keep = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
            error = f"could not write {final}: {type(e).__name__}: {e}; {keep}"
        if error is None and save_total_limit:
            try:
                _prune(output_dir, step, save_total_limit)
            except OSError as e:  # the new checkpoint is complete; an old one that stays is no loss
                _warn(f"could not remove an old checkpoint in {output_dir}: {e}")
    error = broadcast_from_main(error)
    if error is not None:
        raise CheckpointSaveError(error)
    return final


def _write(tmp: str, final: str, step: int, *, model, model_sd, tokenizer, state: dict) -> None:
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    _stage("begin", tmp)
    model.save_pretrained(os.path.join(tmp, MODEL_DIR), state_dict=model_sd, safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(tmp, MODEL_DIR))
    _stage("model", tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    readable = {k: v for k, v in state.items()
                if k not in ("optimizer", "scheduler", "rng") and isinstance(v, (int, float, str, dict, list))}
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(readable, f, indent=1)
    _stage("state", tmp)
    write_manifest(tmp, step)
    _stage("manifest", tmp)
    parent = os.path.dirname(final) or "."
    if os.path.exists(final):  # replace a checkpoint of the same step (e.g. one left by an earlier run)
        old = os.path.join(parent, ".old-" + os.path.basename(final))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        _stage("replace", old)
        os.rename(tmp, final)
        _fsync(parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
        _fsync(parent)
    _stage("renamed", final)


def _prune(output_dir: str, step: int, limit: int) -> None:
    """Keep the newest ``limit`` checkpoints at or below ``step`` (one of a later step is another run's,
    not older than this one, and is left alone)."""
    older = [p for p in list_checkpoints(output_dir) if _step_of(p) <= step]
    for path in older[:-limit]:
        trash = os.path.join(output_dir, ".trash-" + os.path.basename(path))
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        _stage("prune", trash)
        shutil.rmtree(trash)


# ------------------------------------------------------------------------------------ find, resume

def _step_of(path: str) -> int:
    return int(_CKPT.search(path).group(1))


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (with a manifest; hidden temporary dirs never match), oldest first.
    Completeness only: :func:`verify_checkpoint` checks the contents."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        if _CKPT.search(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            found.append((_step_of(path), path))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def recover_output_dir(output_dir: str) -> list[str]:
    """Clean what an interrupted save left in ``output_dir`` (rank 0, before anything is resumed);
    returns one message per action, also printed as a warning."""
    notes = []
    if not os.path.isdir(output_dir):
        return notes
    for name in sorted(os.listdir(output_dir)):
        m = _LEFTOVER.match(name)
        if not m:
            continue
        kind, path = m.group(1), os.path.join(output_dir, name)
        final = os.path.join(output_dir, f"checkpoint-{m.group(2)}")
        if kind == "old" and not os.path.exists(final) and os.path.isfile(os.path.join(path, MANIFEST)):
            os.rename(path, final)  # its replacement never arrived: the old one is still the newest
            notes.append(f"restored {final} from {path} (a save that was replacing it was interrupted)")
        else:
            shutil.rmtree(path)
            what = {"tmp": "incomplete checkpoint from an interrupted save",
                    "old": "superseded checkpoint", "trash": "partly deleted old checkpoint"}[kind]
            notes.append(f"removed {path} ({what})")
    for n in notes:
        _warn(n)
    return notes


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The verified checkpoint to resume from (rank 0 only; see docs/trainer.md, Fault tolerance).

    ``None``: start fresh.  A directory: that checkpoint, refused if it fails verification.
    ``"latest"``: the newest complete checkpoint in ``output_dir``, refused if it fails verification.
    ``"auto"``: the newest checkpoint that verifies, saying which newer ones were skipped and why;
    a fresh start when ``output_dir`` holds no checkpoint at all.
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            if resume == "auto":
                print(f"dft-train: --resume auto: no checkpoint in {output_dir}; starting from scratch",
                      file=sys.stderr, flush=True)
                return None
            raise CheckpointError(f"resume: no checkpoint found in {output_dir}")
        if resume == "latest":
            _verify_for_resume(ckpts[-1])
            return ckpts[-1]
        skipped = []
        for path in reversed(ckpts):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            for s in skipped:
                _warn(f"--resume auto: skipping a bad checkpoint: {s}")
            if skipped:
                _warn(f"--resume auto: falling back to {path}, the newest checkpoint that verifies")
            return path
        raise CheckpointError(f"resume: no checkpoint in {output_dir} verifies: " + "; ".join(skipped))
    _verify_for_resume(resume)
    return resume


def _verify_for_resume(path: str) -> None:
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"resume: refusing {path}: {e}; --resume auto falls back to the newest "
                              "checkpoint that verifies") from None


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------- resume safety

def data_fingerprint(path: str) -> dict:
    """What identifies the training data: path, size and sha256 of the file's bytes."""
    return {"train_file": os.path.abspath(path), "train_bytes": os.path.getsize(path),
            "train_sha256": file_sha256(path)}


def config_fingerprint(config: dict) -> tuple[dict, str]:
    """The fields of a ``TrainConfig.to_dict()`` that decide what the run computes, and their sha256."""
    significant = {k: v for k, v in config.items() if k not in RESUME_NEUTRAL_FIELDS}
    blob = json.dumps(significant, sort_keys=True, default=repr).encode()
    return significant, hashlib.sha256(blob).hexdigest()


def resume_mismatches(saved: dict, config: dict, data: dict, position: dict) -> list[str]:
    """What differs between a checkpoint's ``saved`` trainer state and this run: one line per changed
    config field (``name: old -> new``), the train file's contents, and the data position
    (global batch, number of sequences).  Empty when the resume continues the same run."""
    from .config import TrainConfig

    out = []
    sig_now, hash_now = config_fingerprint(config)
    if saved.get("config_sha256") != hash_now:
        sig_then, _ = config_fingerprint(saved.get("config", {}))
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.default is not dataclasses.MISSING}
        for key in sorted(set(sig_now) | set(sig_then)):
            if key not in sig_then:
                if sig_now[key] != defaults.get(key, object()):  # a field added since, at its default, is no change
                    out.append(f"{key}: (not in the checkpoint) -> {sig_now[key]!r}")
            elif key not in sig_now:
                out.append(f"{key}: {sig_then[key]!r} -> (no such option now)")
            elif sig_now[key] != sig_then[key]:
                out.append(f"{key}: {sig_then[key]!r} -> {sig_now[key]!r}")
    then = saved.get("data", {})
    if "train_sha256" not in then:
        out.append("train_file: the checkpoint records no data hash (written before resume checks)")
    elif then["train_sha256"] != data["train_sha256"]:
        out.append(f"train_file: contents changed: {then['train_file']} ({then['train_bytes']} bytes, sha256 "
                   f"{then['train_sha256'][:12]}...) -> {data['train_file']} ({data['train_bytes']} bytes, "
                   f"sha256 {data['train_sha256'][:12]}...)")
    for key, label in (("global_batch", "global batch"), ("num_rows", "number of training sequences")):
        if key in then and then[key] != position[key]:
            out.append(f"{label}: {then[key]} -> {position[key]} (the data position would not line up)")
    return out
