"""dft_kernels: fused, chunked LM-head losses for Dynamic Fine-Tuning and its family."""

import importlib

from . import reference
from .distill import linear_distill
from .functional import cross_entropy, linear_cross_entropy
from .modules import LinearCrossEntropyLoss
from .objectives import CE, DFT, EAFT, Chord, Entropy, Focal, Objective, Power, Prob, get_objective
from .rl import linear_logprobs, logprobs
from .stats import LogprobStats, LossStats

__version__ = "0.1.0"

__all__ = [
    "linear_cross_entropy",
    "cross_entropy",
    "LinearCrossEntropyLoss",
    "LossStats",
    "linear_logprobs",
    "logprobs",
    "LogprobStats",
    "linear_distill",
    "Objective",
    "CE",
    "DFT",
    "Power",
    "Focal",
    "Chord",
    "Prob",
    "Entropy",
    "EAFT",
    "get_objective",
    "reference",
    "hf",
    "patch",
    "unpatch",
    "train",
]


# The Hugging Face layer and the trainer load on first use: ``import dft_kernels`` loads
# neither them nor transformers.
_LAZY = {"hf": ("dft_kernels.hf", None), "train": ("dft_kernels.train", None),
         "patch": ("dft_kernels.hf", "patch"), "unpatch": ("dft_kernels.hf", "unpatch")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dft_kernels' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
