"""Runs ``dft-train`` in a subprocess with faults injected at stages of its checkpoint saves
(used by tests/train/test_train_faults.py).

    python train_fault_driver.py CONFIG.json [--sigterm-after STEP] [FAULT ...]

FAULT is ``ACTION@STAGE#N``: when the N-th save reaches STAGE (see ``checkpoint.save_hook``), do ACTION:
``kill`` (SIGKILL this process), ``fsize=BYTES`` (lower RLIMIT_FSIZE, so writes beyond BYTES fail in
the kernel with EFBIG) or ``fsize=off`` (lift it again).  ``--sigterm-after STEP`` first trains the
same config and sends a real SIGTERM after step STEP; the trainer sees it in the next step, writes
checkpoint-<STEP+1> and stops (that is the checkpoint a later save replaces).
Then the CLI runs the config; its exit code is this process's.
"""

import os
import resource
import signal
import sys

import torch

torch.set_num_threads(1)  # the in-process runs of the tests use one thread too: same summation order

from dft_kernels.train import checkpoint  # noqa: E402
from dft_kernels.train.cli import main  # noqa: E402
from dft_kernels.train.config import TrainConfig, load_config_file  # noqa: E402
from dft_kernels.train.loop import train  # noqa: E402


def parse_faults(specs):
    faults = {}
    for spec in specs:
        action, rest = spec.split("@")
        stage, nth = rest.split("#")
        faults[(stage, int(nth))] = action
    return faults


def install(faults):
    counts = {}
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def hook(stage, path):
        counts[stage] = counts.get(stage, 0) + 1
        action = faults.get((stage, counts[stage]))
        print(f"fault driver: save stage {stage} #{counts[stage]} at {path}: {action or 'pass'}", flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "fsize=off":
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        elif action is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(action.split("=")[1]), hard))

    checkpoint.save_hook = hook


def run():
    args = sys.argv[1:]
    config = args.pop(0)
    sigterm_at = None
    if args and args[0] == "--sigterm-after":
        sigterm_at = int(args[1])
        args = args[2:]
        install({})

        def sigterm(rec):
            if rec["step"] == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)

        summary = train(TrainConfig.from_dict(load_config_file(config)), on_step=sigterm)
        assert summary["interrupted"] == "SIGTERM", summary
    install(parse_faults(args))
    return main(["--config", config])


if __name__ == "__main__":
    sys.exit(run())
