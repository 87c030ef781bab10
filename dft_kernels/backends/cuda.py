"""CUDA C++ row backend: the kernel in ``dft_kernels/csrc/`` as the torch op ``dft_kernels_cuda::row_loss_grad``.

The fallback when Triton is missing or fails on a CUDA device, and a second, independent
implementation of the row contract in ``dft_kernels.backends`` (formulas on the kernel,
``csrc/row_kernel.cuh``).  The op comes from the prebuilt extension ``dft_kernels._C``
when ``setup.py`` built it, else it is compiled on first use from the sources shipped in
the package, with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``),
which needs nvcc and a CUDA build of torch.  ``DFT_KERNELS_BUILD_CUDA=0`` disables that build.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from ..options import LossParams
from . import RowOutputs, check_grad_out, top_k_reason, via_in_place
from . import _cuda_build as build

NAME = "cuda"


def supports(path: str, params) -> str:
    """"" for the two-pass ``"rows"`` path, the only one this backend has (the contract's paths), for
    every objective but ``EAFT(top_k=k)`` (:func:`~dft_kernels.backends.top_k_reason`)."""
    if path != "rows":
        return f"the {NAME} backend has no {path!r} path"
    return top_k_reason(params.objective)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_loaded = False
_load_error: Optional[str] = None
_prebuilt_error: Optional[str] = None
_prebuilt_tried = False


def _import_prebuilt() -> Optional[str]:
    """Import ``dft_kernels._C`` (tried once); None on success, else why not."""
    global _loaded, _prebuilt_error, _prebuilt_tried
    if not _prebuilt_tried:
        _prebuilt_tried = True
        try:
            importlib.import_module(build.EXTENSION_NAME)
            _loaded = True  # importing the library registered the op
        except ImportError as exc:
            recorded = build.recorded_build_error()
            if recorded is None:
                _prebuilt_error = f"{build.EXTENSION_NAME} is not built ({exc})"
            else:  # setup.py tried, failed and installed without it
                _prebuilt_error = f"{build.EXTENSION_NAME} failed to build when dft_kernels was installed ({recorded})"
    return _prebuilt_error


def _jit_build() -> None:
    """Compile and load the csrc/ sources with torch.utils.cpp_extension.load; raises RuntimeError with the reason."""
    if build.build_mode() == "off":
        raise RuntimeError(f"{build.ENV_BUILD}=0 disables building it")
    if torch.version.cuda is None:
        raise RuntimeError("torch is a CPU-only build, which cannot build CUDA extensions")
    if build.find_nvcc() is None:
        raise RuntimeError("no CUDA toolchain to build it: nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    srcs = build.sources()
    if not srcs:
        raise RuntimeError(f"its sources are not there ({build.CSRC_DIR}); reinstall dft_kernels")
    from torch.utils import cpp_extension

    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = build.arch_list()
    if previous is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major < 8:  # older than the default targets (whose PTX only serves newer GPUs)
            archs = f"{major}.{minor};{archs}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        cpp_extension.load(
            name=build.JIT_NAME, sources=srcs, extra_include_paths=[str(build.CSRC_DIR)],
            extra_cflags=list(build.CXX_FLAGS), extra_cuda_cflags=list(build.NVCC_FLAGS),
            is_python_module=False, verbose=os.environ.get("DFT_KERNELS_VERBOSE_BUILD") == "1")
    except Exception as exc:  # compiler errors, missing headers, linker errors
        raise RuntimeError(f"building it with nvcc failed ({build.summarize_build_failure(exc)}); "
                           "DFT_KERNELS_VERBOSE_BUILD=1 shows the compiler output") from exc
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def load_extension() -> None:
    """Make ``torch.ops.dft_kernels_cuda.row_loss_grad`` available (once per process).

    Raises RuntimeError saying why when neither the prebuilt extension nor a build works.
    """
    global _loaded, _load_error
    with _lock:
        if _loaded:
            return
        if _load_error is not None:
            raise RuntimeError(_load_error)
        prebuilt_error = _import_prebuilt()
        if prebuilt_error is not None:
            try:
                _jit_build()
            except RuntimeError as exc:
                _load_error = f"the cuda backend's extension is unavailable: {prebuilt_error}, and {exc}"
                raise RuntimeError(_load_error) from exc
        _loaded = True


def _op():
    load_extension()
    return torch.ops.dft_kernels_cuda.row_loss_grad


def is_available(device: torch.device) -> tuple[bool, str]:
    """Needs a CUDA device and the extension, prebuilt or buildable (built on first use)."""
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors only (got device {device})"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    if _loaded:
        return True, ""
    if _load_error is not None:
        return False, _load_error
    prebuilt_error = _import_prebuilt()
    if prebuilt_error is None:
        return True, ""
    if build.build_mode() == "off":
        return False, f"{prebuilt_error} and {build.ENV_BUILD}=0 disables building it"
    if build.find_nvcc() is None:
        return False, f"{prebuilt_error} and nvcc was not found to build it"
    if not build.sources():
        return False, f"{prebuilt_error} and its sources ({build.CSRC_DIR}) are not there to build it"
    return True, ""


def row_loss_grad(logits: Tensor, target: Tensor, params: LossParams,
                  token_weights: Optional[Tensor] = None,
                  grad_scale: Optional[Tensor] = None, grad_out: Optional[Tensor] = None) -> RowOutputs:
    """The contract; a ``grad_out`` is served by :func:`~dft_kernels.backends.via_in_place` (the
    kernel writes in place only: one copy of the chunk and, across dtypes, one conversion more
    than the triton backend, whose kernel stores into ``grad_out`` directly)."""
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits: the cuda backend takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if grad_scale is not None and grad_out is not None and grad_out is not logits:
        check_grad_out(grad_out, logits, DTYPES)
        return via_in_place(row_loss_grad, logits, grad_out, target, params, token_weights, grad_scale)
    reason = top_k_reason(params.objective)
    if reason:
        raise ValueError(f"params: the cuda backend does not run this objective: {reason}")
    obj = params.objective.resolve(logits.shape[1])
    param0, param1 = obj.kernel_params
    tw = None if token_weights is None else token_weights.to(torch.float32).contiguous()
    scale = None if grad_scale is None else grad_scale.to(torch.float32).contiguous()
    loss, nll, prob, entropy, correct = _op()(
        logits, target.contiguous(), tw, scale, obj.kernel_id, param0, param1, params.ignore_index,
        0.0 if params.softcap is None else params.softcap, params.label_smoothing, params.z_loss,
        params.needs_entropy, params.with_stats)
    return RowOutputs(loss=loss, nll=nll, prob=prob,
                      entropy=entropy if params.needs_entropy else None,
                      correct=correct if params.with_stats else None)
