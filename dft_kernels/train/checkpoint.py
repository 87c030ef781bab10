"""Checkpoints: model + tokenizer (save_pretrained, safetensors), optimizer, scheduler, RNG states and
data position.  Written atomically: everything goes to a temporary directory that is renamed into place."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_trainer_state", "find_latest_checkpoint", "rng_state", "set_rng_state",
           "CheckpointError"]

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
_CKPT = re.compile(r"checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


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


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, optimizer, scheduler, state: dict,
                    fsdp_module=None, save_total_limit: int = 0) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; every rank must call this.

    ``model`` is the unwrapped HF model; ``fsdp_module`` the fully_shard-ed module when training
    with FSDP2 (its full state dict is gathered to rank 0).  ``state`` holds the loop's own
    state (step, data position, tokens seen...); RNG states are added here.
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
    if _is_main():
        tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        model.save_pretrained(os.path.join(tmp, MODEL_DIR), state_dict=model_sd, safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(tmp, MODEL_DIR))
        full = dict(state, optimizer=optim_sd, scheduler=scheduler.state_dict(), rng=rng_state())
        torch.save(full, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({k: v for k, v in state.items() if isinstance(v, (int, float, str, dict, list))}, f, indent=1)
        if os.path.exists(final):  # replace an older checkpoint of the same step
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        if save_total_limit:
            for path in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(path)
    _barrier()
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (temporary dirs never match), oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = _CKPT.search(path)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    if resume is None:
        return None
    if resume == "latest":
        path = find_latest_checkpoint(output_dir)
        if path is None:
            raise CheckpointError(f"resume: no checkpoint found in {output_dir}")
        return path
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise CheckpointError(f"resume: {resume} is not a checkpoint (no {STATE_FILE})")
    return resume


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
