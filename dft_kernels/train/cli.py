"""``dft-train`` / ``python -m dft_kernels.train`` / ``torchrun ... -m dft_kernels.train``."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Optional

__all__ = ["main"]


def main(argv: Optional[list] = None) -> int:
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
