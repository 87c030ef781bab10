"""The thin trainer: ``dk.train.TrainConfig`` and ``dk.train.train(cfg)``; CLI ``dft-train``.

Importing this package is cheap; transformers/datasets are imported when training starts.
"""

from .config import ConfigError, TrainConfig

__all__ = ["TrainConfig", "ConfigError", "train", "run_demo"]


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Train according to ``cfg``; returns a summary dict.  ``on_step(record)`` is called after
    every optimizer step with its metrics.  See ``docs/trainer.md``."""
    from .loop import train as _train

    return _train(cfg, on_step=on_step)


def run_demo(**kwargs) -> dict:
    """The embedded SFT-vs-DFT demo (what ``make demo`` runs)."""
    from .demo import run_demo as _run

    return _run(**kwargs)
