"""Packaging: the sdist and the wheel carry the CUDA sources, and a broken CUDA toolchain never fails the install.

Both tests build a copy of the project in a temporary directory with the interpreter that
runs the tests and without build isolation, so nothing is downloaded.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import dft_kernels
from dft_kernels.backends import _cuda_build

ROOT = Path(__file__).resolve().parents[1]
CSRC_FILES = sorted(p.name for p in _cuda_build.CSRC_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))


def copy_project(dst: Path) -> Path:
    """The files a build reads, without build outputs or caches."""
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "dft_kernels", dst / "dft_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", _cuda_build.BUILD_ERROR_FILE))
    return dst


def clean_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CUDA_HOME", "CUDA_PATH", _cuda_build.ENV_BUILD, "TORCH_CUDA_ARCH_LIST")}
    env.update(overrides)
    return env


def run(cmd, env, cwd, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_sdist_and_wheel_carry_the_cuda_sources(tmp_path):
    assert {".cu", ".cpp", ".cuh"} <= {Path(n).suffix for n in CSRC_FILES}, CSRC_FILES
    src, dist = copy_project(tmp_path / "src"), tmp_path / "dist"
    env = clean_env(**{_cuda_build.ENV_BUILD: "0"})  # the pure-Python build; the CUDA build is tested below
    # python -m build: the sdist, then the wheel built from the unpacked sdist.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], env, tmp_path)
    version = dft_kernels.__version__
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    assert sdist.name == f"dft_kernels-{version}.tar.gz" and wheel.name.startswith(f"dft_kernels-{version}-")

    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    top = f"dft_kernels-{version}"
    missing = [f for f in CSRC_FILES if f"{top}/dft_kernels/csrc/{f}" not in names]
    assert not missing, f"sdist lacks {missing}: {sorted(names)}"
    assert f"{top}/LICENSE" in names

    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"dft_kernels-{version}.dist-info/METADATA").decode()
    missing = [f for f in CSRC_FILES if f"dft_kernels/csrc/{f}" not in names]
    assert not missing, f"wheel lacks {missing}: {sorted(names)}"
    assert f"dft_kernels-{version}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata and f"Version: {version}" in metadata

    # Installed from the wheel, the cuda backend finds its sources inside the installed package.
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        env, tmp_path)
    out = run([sys.executable, "-c", "import dft_kernels; from dft_kernels.backends import _cuda_build as b; "
               "print(dft_kernels.__file__); print(*b.sources(), sep='\\n')"],
              clean_env(PYTHONPATH=str(target)), tmp_path).stdout.split()
    assert out[0] == str(target / "dft_kernels" / "__init__.py")
    assert sorted(Path(p).name for p in out[1:]) == [f for f in CSRC_FILES if f.endswith((".cu", ".cpp"))]
    assert all(Path(p).is_file() and Path(p).is_relative_to(target) for p in out[1:])


# Makes this process's torch look like a CUDA build (what a user of torch's CUDA wheels has),
# with a CUDA device when FAKE_CUDA_DEVICE=1; only this test's subprocesses load it.
FAKE_CUDA_TORCH = """
import os
import sys


def fake_cuda_torch():
    import torch

    torch.version.cuda = "12.8"
    has_device = os.environ.get("FAKE_CUDA_DEVICE") == "1"
    torch.cuda.is_available = lambda: has_device
    torch.cuda.device_count = lambda: int(has_device)
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    is_compiled, torch.cuda._is_compiled = torch.cuda._is_compiled, lambda: True
    import torch.utils.cpp_extension  # finds CUDA_HOME, as with a CUDA build

    torch.cuda._is_compiled = is_compiled  # the rest of torch (dynamo) must not look for CUDA bindings


if not sys.argv[0].endswith(os.path.join("pip", "__main__.py")):  # pip itself needs no torch
    fake_cuda_torch()
"""

# A CUDA toolchain broken on purpose: nvcc reports a version but compiles nothing, and
# CUDA_HOME has no include/ (so cuda_runtime.h is missing, as when CUDA_HOME is guessed wrong).
BROKEN_NVCC = """#!/bin/sh
if [ "$1" = "--version" ] || [ "$1" = "-V" ]; then
    echo "Cuda compilation tools, release 12.8, V12.8.93"
    exit 0
fi
echo "nvcc: broken on purpose by tests/test_packaging.py" >&2
exit 1
"""

CHECK_CUDA_BACKEND = """
import sys
import torch
import dft_kernels
from dft_kernels.backends import resolve_backend

assert dft_kernels.__file__.startswith(sys.argv[1]), dft_kernels.__file__
device = torch.device("cuda", 0)
try:
    resolve_backend("cuda", device).load_extension()   # what the first backend="cuda" call runs
except RuntimeError as exc:
    print("FIRST-USE:", str(exc).splitlines()[0][:2000])
try:
    resolve_backend("cuda", device)                    # every later backend="cuda" call
except ValueError as exc:
    print("LATER:", str(exc).splitlines()[0][:2000])
"""


def test_broken_cuda_toolchain_installs_pure_python_and_explains(tmp_path):
    src = copy_project(tmp_path / "src")
    fake = tmp_path / "fake_cuda_torch"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(textwrap.dedent(FAKE_CUDA_TORCH))
    cuda_home = tmp_path / "broken-cuda"
    (cuda_home / "bin").mkdir(parents=True)
    (cuda_home / "bin" / "nvcc").write_text(BROKEN_NVCC)
    (cuda_home / "bin" / "nvcc").chmod(0o755)
    env = clean_env(PYTHONPATH=str(fake), CUDA_HOME=str(cuda_home), MAX_JOBS="2")

    target = tmp_path / "site"
    proc = run([sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index",
                "--target", str(target), str(src)], env, tmp_path)
    log = proc.stdout + proc.stderr
    # the build's own decision: a CUDA torch and an nvcc, so it tries the extension
    assert "trying the CUDA extension dft_kernels._C (torch" in log and "nvcc found" in log, log[-5000:]
    warnings = [line for line in log.splitlines() if "dft_kernels: WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "failed to build" in warnings[0] and "installed without it" in warnings[0]
    # the compiler's own words: a CUDA header it cannot find (cuda_runtime.h with a CUDA wheel of torch)
    assert "fatal error:" in warnings[0] and "No such file or directory" in warnings[0], warnings[0]

    pkg = target / "dft_kernels"
    assert (pkg / "__init__.py").is_file() and not list(pkg.glob("_C*.so"))
    recorded = (pkg / _cuda_build.BUILD_ERROR_FILE).read_text().strip()
    assert recorded and recorded in warnings[0]
    assert not (src / "dft_kernels" / _cuda_build.BUILD_ERROR_FILE).exists()  # not an in-place build

    # Later, on a "GPU": backend="cuda" says why it is unavailable, the install-time failure first.
    script = tmp_path / "check_cuda_backend.py"
    script.write_text(CHECK_CUDA_BACKEND)
    run_env = clean_env(PYTHONPATH=f"{target}{os.pathsep}{fake}", CUDA_HOME=str(cuda_home), FAKE_CUDA_DEVICE="1",
                        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), MAX_JOBS="2")
    out = run([sys.executable, str(script), str(target)], run_env, tmp_path).stdout
    first = next(line for line in out.splitlines() if line.startswith("FIRST-USE:"))
    later = next(line for line in out.splitlines() if line.startswith("LATER:"))
    assert "dft_kernels._C failed to build when dft_kernels was installed" in first and recorded in first
    assert "building it with nvcc failed" in first
    assert "backend: 'cuda' is not available on device cuda:0" in later
    assert "failed to build when dft_kernels was installed" in later
