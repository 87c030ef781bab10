"""dft_kernels: fused, chunked LM-head losses for Dynamic Fine-Tuning and its family."""

from . import hf, reference, train  # train: cheap (stdlib only until training starts)
from .functional import cross_entropy, linear_cross_entropy
from .hf import patch, unpatch
from .modules import LinearCrossEntropyLoss
from .objectives import CE, DFT, Chord, Entropy, Focal, Objective, Power, Prob, get_objective
from .stats import LossStats

__version__ = "0.1.0"

__all__ = [
    "linear_cross_entropy",
    "cross_entropy",
    "LinearCrossEntropyLoss",
    "LossStats",
    "Objective",
    "CE",
    "DFT",
    "Power",
    "Focal",
    "Chord",
    "Prob",
    "Entropy",
    "get_objective",
    "reference",
    "hf",
    "patch",
    "unpatch",
    "train",
]
