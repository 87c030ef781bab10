"""Build script.  The install is pure Python unless the optional CUDA extension builds.

The extension ``dft_kernels._C`` (``dft_kernels/csrc/``, the "cuda" backend) is attempted
only when torch has CUDA and nvcc is found, or when ``DFT_KERNELS_BUILD_CUDA=1`` forces it
(``DFT_KERNELS_BUILD_CUDA=0`` disables it).  torch must be importable here, so build it
with ``pip install --no-build-isolation .``; with build isolation the install stays pure
Python and the cuda backend compiles the extension on first use.

The extension is optional, so it never fails the install: when it cannot be configured or
compiled (no CUDA headers, a compiler error, a torch without CUDA), the install goes on
without it, prints one warning (pip shows it with ``-v``) and leaves the reason in the
installed package, where the cuda backend reports it if it is asked for.  See docs/backends.md.
"""

import contextlib
import importlib.util
import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = "dft_kernels"


def _load_build_config():
    # By path: importing the package would import torch and the whole library.
    path = os.path.join(_HERE, _PACKAGE, "backends", "_cuda_build.py")
    spec = importlib.util.spec_from_file_location("_dft_kernels_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cfg = _load_build_config()


def _record(package_dirs, reason):
    """Leave ``reason`` (or remove an old one when None) where the cuda backend looks for it."""
    for d in package_dirs:
        path = os.path.join(d, _cfg.BUILD_ERROR_FILE)
        if reason is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            os.makedirs(d, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(reason + "\n")


@contextlib.contextmanager
def _captured_output(log: dict):
    """Send fds 1 and 2 (the compiler's output included) to a file, then replay it on stderr;
    ``log["text"]`` holds it afterwards, also when the body raised."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            log["text"] = tmp.read().decode("utf-8", errors="replace")
            sys.stderr.write(log["text"])
            sys.stderr.flush()


class OptionalCUDABuildExt(build_ext):
    """Builds ``dft_kernels._C`` with torch's ``BuildExtension``; any failure falls back to pure Python.

    ``ext_modules`` holds a placeholder; the real ``CUDAExtension`` is made here, so that
    a failure to configure it (torch or CUDA_HOME missing) takes the same path as a
    compiler error.
    """

    def run(self):
        record_dirs = [os.path.join(self.build_lib, _PACKAGE)]
        if self.inplace or getattr(self, "editable_mode", False):
            record_dirs.append(os.path.join(_HERE, _PACKAGE))
        log = {"text": ""}
        try:
            with _captured_output(log):
                self._build_with_torch()
        except Exception as exc:  # compiler, headers, CUDA_HOME, torch itself: none may fail the install
            reason = _cfg.summarize_build_failure(exc, log["text"])
            print(f"dft_kernels: WARNING: the CUDA extension {_cfg.EXTENSION_NAME} failed to build, so it is "
                  f"installed without it (pure Python; the cuda backend will try to build it on first use): "
                  f"{reason}", file=sys.stderr)
            self.extensions = []
            self.distribution.ext_modules = []
            _record(record_dirs, reason)
        else:
            _record(record_dirs, None)

    def _build_with_torch(self):
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cfg.arch_list())
        ext = CUDAExtension(
            name=_cfg.EXTENSION_NAME,
            sources=[os.path.relpath(s, _HERE) for s in _cfg.sources()],
            include_dirs=[str(_cfg.CSRC_DIR)],
            extra_compile_args={"cxx": list(_cfg.CXX_FLAGS), "nvcc": list(_cfg.NVCC_FLAGS)},
        )
        self.distribution.ext_modules = [ext]
        cmd = BuildExtension(self.distribution)
        for option in ("build_lib", "build_temp", "inplace", "editable_mode", "force", "debug", "parallel",
                       "plat_name"):
            if hasattr(self, option):
                setattr(cmd, option, getattr(self, option))
        cmd.ensure_finalized()
        cmd.run()
        self.extensions = cmd.extensions  # what install/bdist_wheel/editable_wheel ask for outputs


def _extension_kwargs():
    build, reason = _cfg.should_build()
    if not build:
        print(f"dft_kernels: building without the CUDA extension ({reason})", file=sys.stderr)
        _record([os.path.join(_HERE, _PACKAGE)], None)  # a failure recorded by an older in-place build
        return {}
    print(f"dft_kernels: trying the CUDA extension {_cfg.EXTENSION_NAME} ({reason})", file=sys.stderr)
    placeholder = Extension(_cfg.EXTENSION_NAME, sources=[os.path.relpath(s, _HERE) for s in _cfg.sources()])
    return {"ext_modules": [placeholder], "cmdclass": {"build_ext": OptionalCUDABuildExt}}


setup(**_extension_kwargs())
