"""tools/link_system_torch.py: a new isolated venv reuses this interpreter's torch and sees nothing else of it."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "link_system_torch.py"

PROBE = """
import importlib.metadata, importlib.util, torch
print(torch.__file__)
print(importlib.metadata.version("torch"))
print(importlib.util.find_spec("pytest") is None)
"""


def test_isolated_venv_reuses_torch_and_nothing_else(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    for _ in range(2):  # running it again (make after a change) keeps the same links
        proc = subprocess.run([sys.executable, str(TOOL), str(venv)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "the venv reuses torch" in proc.stdout, proc.stdout
    import torch

    assert importlib.util.find_spec("pytest") is not None  # the interpreter running the tests has pytest...
    out = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    torch_file, version, no_pytest = out.stdout.split()
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()   # the same torch, linked
    assert version == importlib.metadata.version("torch")                # and pip sees it as installed
    assert no_pytest == "True"                                             # ...the new venv does not


def test_without_torch_it_does_nothing(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    # The new venv's own interpreter has no torch: nothing to link.
    proc = subprocess.run([str(venv / "bin" / "python"), str(TOOL), str(venv)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0 and "has no torch" in proc.stdout, proc.stdout + proc.stderr
    assert not (venv / "system-torch").exists()
