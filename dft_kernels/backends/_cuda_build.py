"""How the CUDA extension in ``dft_kernels/csrc/`` is built: sources, flags, architectures, env switches.

Shared by ``setup.py`` (ahead-of-time build of ``dft_kernels._C``), by the cuda backend
(just-in-time build with ``torch.utils.cpp_extension.load``) and by the nvcc compile
check in the tests.  Only the standard library at import time: ``setup.py`` loads this
file by path, before the package (or even torch) is importable.

The sources are package data, so an install from a wheel or an sdist carries them and
the just-in-time build works outside a source checkout too.  When the ahead-of-time
build fails, ``setup.py`` installs without the extension and leaves the reason in
``BUILD_ERROR_FILE`` next to this package, for the cuda backend to report.

Environment:
    ``DFT_KERNELS_BUILD_CUDA``: ``1`` forces the ahead-of-time build, ``0`` disables it
    (and the just-in-time build); unset builds ahead of time only when torch has CUDA and
    nvcc is found.
    ``TORCH_CUDA_ARCH_LIST``: target architectures, as for any torch extension; default
    ``DEFAULT_ARCH_LIST`` (sm_80 and sm_90, plus PTX for newer GPUs).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CSRC_DIR = PACKAGE_DIR / "csrc"
# Written by setup.py when the ahead-of-time build failed (inside the installed package).
BUILD_ERROR_FILE = "_C.build-error.txt"
EXTENSION_NAME = "dft_kernels._C"
JIT_NAME = "dft_kernels_cuda_jit"
ENV_BUILD = "DFT_KERNELS_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# No fast-math: the kernel relies on accurate expf/log1pf/expm1f/tanhf/coshf.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


def build_mode(environ=os.environ) -> str:
    """``"force"``, ``"off"`` or ``"auto"`` from ``DFT_KERNELS_BUILD_CUDA``."""
    value = environ.get(ENV_BUILD, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"{ENV_BUILD} must be 1 (force the CUDA build), 0 (disable it) or unset, got {value!r}")


def sources(csrc_dir: Path = CSRC_DIR) -> list[str]:
    """The extension's translation units (every .cu and .cpp in ``csrc_dir``), sorted."""
    return sorted(str(p) for p in csrc_dir.glob("*") if p.suffix in (".cu", ".cpp"))


def recorded_build_error() -> Optional[str]:
    """Why the ahead-of-time build failed when this copy was installed, or None."""
    try:
        return (PACKAGE_DIR / BUILD_ERROR_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def summarize_build_failure(exc: BaseException, output: str = "") -> str:
    """One line for a failed build: the exception's first line, then the first compiler
    diagnostics (``... error: ...``, ``... fatal ...``) found in its message or in ``output``."""
    diagnostics: list[str] = []
    for line in (str(exc) + "\n" + output).splitlines():
        line = line.strip()
        if re.search(r"\berror\s*:|\bfatal\b", line, re.IGNORECASE) and line not in diagnostics:
            diagnostics.append(line[:300])
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason + "".join(f"; {d}" for d in diagnostics[:3] if d != first)


def find_nvcc() -> Optional[str]:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc`` (as torch finds CUDA_HOME), else ``nvcc`` on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def arch_list(environ=os.environ) -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else ``DEFAULT_ARCH_LIST``."""
    return environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def should_build(environ=os.environ) -> tuple[bool, str]:
    """Whether ``setup.py`` builds the extension, and why (or why not)."""
    mode = build_mode(environ)
    if mode == "off":
        return False, f"{ENV_BUILD}=0"
    if mode == "force":
        return True, f"{ENV_BUILD}=1"
    try:
        import torch
    except ImportError:
        return False, "torch is not importable at build time (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if find_nvcc() is None:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if not sources():
        return False, f"no sources in {CSRC_DIR}"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda} and nvcc found"
