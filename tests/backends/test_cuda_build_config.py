"""Build switches and availability reasons of the cuda backend, on a CPU machine."""

import pytest
import torch

import dft_kernels as dk
from dft_kernels.backends import _cuda_build as build
from dft_kernels.backends import cuda as cuda_backend


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("1", "force"), ("true", "force"),
                                        ("0", "off"), ("OFF", "off")])
def test_build_mode(value, mode):
    env = {} if value is None else {build.ENV_BUILD: value}
    assert build.build_mode(env) == mode


def test_bad_build_switch_names_the_variable():
    with pytest.raises(ValueError, match="DFT_KERNELS_BUILD_CUDA must be 1"):
        build.build_mode({build.ENV_BUILD: "maybe"})


def test_should_build_decisions(monkeypatch):
    assert build.should_build({build.ENV_BUILD: "0"}) == (False, "DFT_KERNELS_BUILD_CUDA=0")
    assert build.should_build({build.ENV_BUILD: "1"})[0] is True
    monkeypatch.setattr(torch.version, "cuda", None)
    assert build.should_build({}) == (False, "torch is a CPU-only build")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    ok, reason = build.should_build({})
    assert not ok and "nvcc was not found" in reason


def test_sources_and_arch_defaults():
    names = {p.rsplit("/", 1)[-1] for p in build.sources()}
    assert {"row_loss_grad.cu", "bindings.cpp"} <= names
    assert build.arch_list({}) == "8.0;9.0+PTX"
    assert build.arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}) == "9.0a"


def test_not_available_off_cuda():
    ok, reason = cuda_backend.is_available(torch.device("cpu"))
    assert not ok and "CUDA tensors only" in reason
    with pytest.raises(ValueError, match="'cuda' is not available on device cpu"):
        dk.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="cuda")


def test_load_failure_is_a_clear_error_and_cached(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_loaded", False)
    monkeypatch.setattr(cuda_backend, "_load_error", None)
    monkeypatch.setattr(cuda_backend, "_prebuilt_tried", True)
    monkeypatch.setattr(cuda_backend, "_prebuilt_error", "dft_kernels._C is not built (no module)")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="dft_kernels._C is not built .* nvcc was not found"):
        cuda_backend.load_extension()
    monkeypatch.setattr(build, "find_nvcc", lambda: "/usr/bin/nvcc")  # the first failure is remembered
    with pytest.raises(RuntimeError, match="nvcc was not found"):
        cuda_backend.load_extension()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, reason = cuda_backend.is_available(torch.device("cuda", 0))
    assert not ok and "nvcc was not found" in reason


def test_disabled_build_reason(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_loaded", False)
    monkeypatch.setattr(cuda_backend, "_load_error", None)
    monkeypatch.setattr(cuda_backend, "_prebuilt_tried", True)
    monkeypatch.setattr(cuda_backend, "_prebuilt_error", "dft_kernels._C is not built (no module)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(build.ENV_BUILD, "0")
    ok, reason = cuda_backend.is_available(torch.device("cuda", 0))
    assert not ok and "DFT_KERNELS_BUILD_CUDA=0" in reason


def test_install_time_failure_is_part_of_the_reason(monkeypatch, tmp_path):
    """setup.py leaves the reason of a failed ahead-of-time build in the package; the backend reports it."""
    recorded = "RuntimeError: Error compiling objects for extension; x.h:7: fatal error: cuda_runtime.h: No such file"
    (tmp_path / build.BUILD_ERROR_FILE).write_text(recorded + "\n")
    monkeypatch.setattr(build, "PACKAGE_DIR", tmp_path)
    assert build.recorded_build_error() == recorded
    monkeypatch.setattr(cuda_backend, "_loaded", False)
    monkeypatch.setattr(cuda_backend, "_load_error", None)
    monkeypatch.setattr(cuda_backend, "_prebuilt_tried", False)
    monkeypatch.setattr(cuda_backend, "_prebuilt_error", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(build.ENV_BUILD, "0")
    ok, reason = cuda_backend.is_available(torch.device("cuda", 0))
    assert not ok and f"dft_kernels._C failed to build when dft_kernels was installed ({recorded})" in reason
    assert "DFT_KERNELS_BUILD_CUDA=0" in reason
    monkeypatch.setattr(build, "PACKAGE_DIR", tmp_path / "elsewhere")
    assert build.recorded_build_error() is None


def test_build_failure_summary_keeps_the_compiler_diagnostics():
    output = "[1/2] c++ -c bindings.cpp\nx.h:7:10: fatal error: cuda_runtime.h: No such file or directory\n" \
             "compilation terminated.\nninja: build stopped: subcommand failed.\n"
    summary = build.summarize_build_failure(RuntimeError("Error compiling objects for extension"), output)
    assert summary == ("RuntimeError: Error compiling objects for extension; "
                       "x.h:7:10: fatal error: cuda_runtime.h: No such file or directory")
    assert "\n" not in build.summarize_build_failure(OSError("CUDA_HOME is not set\nmore"))
