import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Backends whose row kernel runs on CPU tensors in the normal suite.
CPU_BACKENDS = ["torch"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")  # shown by pytest on failure, to reproduce
    torch.manual_seed(seed)
    yield
