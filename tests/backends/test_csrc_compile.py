"""CI compile check of csrc/: every translation unit through nvcc, warnings as errors.

Runs wherever nvcc is installed, also on CPU-only machines with a CPU build of torch (its
wheel ships the ATen/c10 headers, c10/cuda included); skips with a reason without nvcc.
Flags follow torch's extension build (torch.utils.cpp_extension): its include paths, the
no-implicit-half/bfloat16-conversion defines, -DTORCH_EXTENSION_NAME, torch's C++ ABI and
C++ standard (-std=c++20: torch 2.13's headers need it, as its own extension build uses),
sm_80 and sm_90.  Warnings: ``-Werror all-warnings`` for nvcc's own diagnostics and
``-Xcompiler -Wall,-Werror`` for the host compiler (torch's headers are clean under both).
"""

import os
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from dft_kernels.backends import _cuda_build

NVCC = _cuda_build.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolchain): csrc/ compile check skipped")

ARCHS = ("80", "90")


def compile_command(src: Path, out: Path) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(_cuda_build.CSRC_DIR)]
    cmd = [NVCC, "-c", str(src), "-o", str(out), "-std=c++20", "-O3",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in includes),
           "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall", "-Xcompiler", "-Werror", "-Werror", "all-warnings"]
    # A CPU wheel lacks this cmake-generated header (it only sets Windows export macros);
    # torch's headers have a switch for building without it.
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    if src.suffix == ".cu":
        cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
        cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return cmd


def test_every_csrc_file_compiles(tmp_path):
    sources = [Path(s) for s in _cuda_build.sources()]
    assert any(s.suffix == ".cu" for s in sources), f"no .cu file in {_cuda_build.CSRC_DIR}"

    def run(src):
        cmd = compile_command(src, tmp_path / (src.name + ".o"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
        return src, cmd, proc

    # Two at a time: CI machines have two cores.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(run, sources))
    failures = [f"{src.name}: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
                for src, cmd, proc in results if proc.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n\n".join(failures)
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    for src, _, _ in results:
        obj = tmp_path / (src.name + ".o")
        assert obj.stat().st_size > 0
        if src.suffix == ".cu" and cuobjdump.exists():  # the device code really is there, per arch
            listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True).stdout
            for arch in ARCHS:
                assert f"sm_{arch}" in listing, f"{src.name}: no sm_{arch} code in {listing!r}"
