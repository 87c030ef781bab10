"""Where a run happened: device name, library versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess

import torch

PEERS = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "trl", "llamafactory", "dft_kernels")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} x{torch.get_num_threads()} threads"


def device_slug(name: str) -> str:
    """File-name form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"\(r\)|\(tm\)", "", name.lower())
    slug = re.sub(r"[^a-z0-9.]+", "-", slug).strip("-.")
    return slug or "device"


def versions() -> dict[str, str]:
    """Installed versions of torch, triton, the peers and this package ('-' when absent)."""
    out = {}
    for dist in PEERS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    out["torch"] = torch.__version__
    import dft_kernels

    out["dft_kernels"] = dft_kernels.__version__
    return out


def load_average() -> str:
    """1-minute load average when the run started (CPU numbers on a busy host are noisy)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "-"


def git_commit(repo: str | None = None) -> str:
    """Short HEAD commit, with ``+dirty`` when tracked files differ from it; ``-`` outside git."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return head + ("+dirty" if dirty else "")
