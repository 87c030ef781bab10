"""``bench.tp`` under torchrun on CPU (2 gloo ranks): the vocab-parallel provider runs, passes the loss check
against ours on the whole head, and rank 0 writes the CSV.  Speed is not asserted (GPU numbers belong to
the GPU runs)."""

import os
import subprocess
import sys

from bench.report import read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tp_provider_runs_under_torchrun_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bench.tp",
           "--cpu", "--shape", "64,32,1001,fp32", "--out-dir", str(tmp_path), "--name", "tp-test", "--warmup", "0",
           "--reps", "1", "--no-plot"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["provider"]: r for r in read_csv(str(tmp_path / "tp-test-tp2.csv"))}
    assert set(rows) == {"ours[torch]", "ours-tp2[torch]", "gemm floor"}, rows.keys()
    tp = rows["ours-tp2[torch]"]
    assert tp["status"] == "ok", tp["reason"]
    assert tp["check"].startswith("ok") and tp["check_against"] == "ours[torch]", tp["check"]
    assert float(tp["ms_median"]) > 0
