"""Build script.  The install is pure Python unless the CUDA extension can be built.

The extension ``dft_kernels._C`` (csrc/, the "cuda" backend) is built only when torch
has CUDA and nvcc is found, or when ``DFT_KERNELS_BUILD_CUDA=1`` forces it
(``DFT_KERNELS_BUILD_CUDA=0`` disables it).  torch must be importable here, so build it
with ``pip install --no-build-isolation .``; with build isolation the install stays pure
Python and the cuda backend compiles the extension on first use.  See docs/backends.md.
"""

import importlib.util
import os
import sys

from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # By path: importing the package would import torch and the whole library.
    path = os.path.join(_HERE, "dft_kernels", "backends", "_cuda_build.py")
    spec = importlib.util.spec_from_file_location("_dft_kernels_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_kwargs():
    cfg = _load_build_config()
    build, reason = cfg.should_build()
    if not build:
        print(f"dft_kernels: building without the CUDA extension ({reason})", file=sys.stderr)
        return {}
    print(f"dft_kernels: building the CUDA extension {cfg.EXTENSION_NAME} ({reason})", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.arch_list())
    csrc = os.path.relpath(cfg.CSRC_DIR, _HERE)
    ext = CUDAExtension(
        name=cfg.EXTENSION_NAME,
        sources=[os.path.relpath(s, _HERE) for s in cfg.sources()],
        include_dirs=[os.path.join(_HERE, csrc)],
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
