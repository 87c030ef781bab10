"""``dft-train`` / ``python -m dft_kernels.train`` / ``torchrun ... -m dft_kernels.train``."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Optional

__all__ = ["main"]


def main(argv: Optional[list] = None) -> int:
    """Run ``dft-train`` and return its exit code.  As a program (``argv`` None) on a rank that torchrun
    started, the process ends here, without finalising the interpreter (:func:`_end_rank`)."""
    code = _main(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _end_rank(code)
    return code


def _end_rank(code: int) -> None:
    """End a torchrun rank once its run is over and everything it wrote is closed: ``os._exit``, after
    flushing the logs and the standard streams.  torch's gloo worker threads can outlive
    ``destroy_process_group`` (an FSDP2 or DDP model still holds the group) and free a collective's
    tensors while Python finalises, which aborts the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#190489) and makes torchrun report a finished run as failed.  Checkpoints
    and metrics are already written atomically by then; nothing registered with ``atexit`` is needed."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: Optional[list]) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError, parse_args
    from .data import DataError
    from .loop import TrainingStopped, train

    # An exception passing an except clause evaluates the clause's name, argparse's SystemExit on
    # --help included: TrainingStopped must be bound however parse_args leaves (was an UnboundLocalError).
    try:
        cfg, extra = parse_args(argv)
        if extra["demo"]:
            from .demo import run_demo

            run_demo()
            return 0
        summary = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"dft-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a guard stopped the run (non-finite loss); its state is checkpointed
        print(f"dft-train: error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        brief = {k: v for k, v in summary.items() if k != "losses"}
        print("dft-train: " + json.dumps(brief))
    if summary["interrupted"]:
        return 128 + int(signal.Signals[summary["interrupted"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
