"""Metrics: one JSON object per line in ``metrics.jsonl``, optional TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics", "plot_runs"]

CURVES = ("loss", "nll", "mean_prob", "accuracy", "entropy", "lr", "grad_norm", "tokens_per_s")


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_surviving(path: str) -> list[dict]:
    """Records of a run that may have been killed in the middle of appending its last line: a last
    line that does not parse is dropped (with a warning); a bad line elsewhere is an error."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: corrupt metrics line: {e}") from None
            print(f"dft-train: warning: {path}: dropped a cut-off last line (the run was killed while writing "
                  "it)", file=sys.stderr, flush=True)
    return out


class MetricsLogger:
    """Appends records to ``metrics.jsonl``.  On resume the records after the resumed step are
    dropped first, so the file is the curve of one continuous run.  Each record carries
    ``nonfinite_steps`` (steps whose loss or gradient norm was NaN/inf so far); such a step's record
    also has ``skipped: true`` and its NaN/inf values as they were."""

    def __init__(self, output_dir: str, *, enabled: bool = True, resume_step: Optional[int] = None,
                 tensorboard: bool = False):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            kept = [r for r in _read_surviving(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("tensorboard: enabled but the tensorboard package is not installed "
                                   f"(pip install tensorboard): {e}") from None
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _series(records: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: dict, path: str, keys=CURVES, title: Optional[str] = None) -> str:
    """One subplot per metric, one line per run: ``runs = {label: records}``; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(_series(r, k)[0] for r in runs.values())]
    evals = [k for k in sorted({k for r in runs.values() for rec in r for k in rec if k.startswith("eval/")})
             if k in ("eval/exact_match",)]
    keys = list(keys) + evals
    ncol = 3
    nrow = max(1, (len(keys) + ncol - 1) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, recs in runs.items():
            xs, ys = _series(recs, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 5 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("loss", "nll"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_metrics(metrics_path: str, png_path: str, label: str = "run") -> str:
    return plot_runs({label: read_metrics(metrics_path)}, png_path)
