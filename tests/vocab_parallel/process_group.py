"""Run a function on every rank of a fresh gloo process group (``torch.multiprocessing`` spawn) and collect
what each rank returns.

Starting a group costs seconds (every rank imports torch and the library), so a caller runs many cases
per start.  ``fn(rank, world_size, payload)`` must be a module-level function of an importable module
(the spawned ranks inherit this process's ``sys.path``) and return something JSON-serialisable.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailure", "run_ranks"]


class RankFailure(RuntimeError):
    """A rank raised; ``results`` holds what every rank had written before (None for a rank without a file)."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _rank_main(rank: int, world: int, port: int, fn, payload, out_dir: str, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    path = os.path.join(out_dir, f"rank{rank}.json")
    ok = False
    try:
        _write(path, {"ok": True, "result": fn(rank, world, payload)})
        ok = True
    except BaseException:
        _write(path, {"ok": False, "error": traceback.format_exc()})
    finally:
        dist.destroy_process_group()
        # The rank leaves without finalising the interpreter: its result is on disk, and torch's gloo worker
        # threads can outlive destroy_process_group (a DeviceMesh keeps the group alive) still holding the last
        # collective's tensors; freeing them takes the GIL while Python finalises, which aborts the process
        # (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489).  Seen here about
        # once in eight 2-rank runs of the DTensor cases, on torch 2.11 and 2.13.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)


def run_ranks(fn, world_size: int, payload=None, *, timeout_s: float = 120.0) -> list:
    """``[fn(rank, world_size, payload) for rank in ranks]``, each run in its own process of one gloo group.
    Raises :class:`RankFailure` (with the traceback of the failing rank) when a rank raises."""
    with tempfile.TemporaryDirectory() as out_dir:
        error = None
        try:
            mp.start_processes(_rank_main, args=(world_size, _free_port(), fn, payload, out_dir, timeout_s),
                               nprocs=world_size, start_method="spawn")
        except Exception as exc:  # noqa: BLE001 - re-raised below with the ranks' own tracebacks
            error = exc
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                results.append(None)
    if error is not None or not all(r is not None and r["ok"] for r in results):
        tracebacks = [f"rank {i}: {r['error']}" for i, r in enumerate(results) if r is not None and not r["ok"]]
        raise RankFailure(f"a rank of the {world_size}-process group failed: {error}\n" + "\n".join(tracebacks),
                          [None if r is None else r.get("result") for r in results])
    return [r["result"] for r in results]
