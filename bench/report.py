"""Result rows <-> CSV, and the markdown table (printed by the CLI, embedded in the README)."""

from __future__ import annotations

import csv
import os
from typing import Iterable, Optional

# Row fields first, then the run-wide context (identical on every row of a file).
ROW_FIELDS = [
    "device", "shape", "model", "n", "h", "v", "dtype", "softcap", "provider", "kind", "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "fwd_ms_median", "peak_mb", "mem_method", "x_floor", "x_liger",
    "loss", "grad_checksum", "loss_rel_err", "grad_rel_err", "check", "check_against",
]
CONTEXT_FIELDS = [
    "torch", "triton", "liger-kernel", "cut-cross-entropy", "trl", "llamafactory", "dft_kernels", "commit", "load_avg",
]
FIELDS = ROW_FIELDS + CONTEXT_FIELDS

MEM_METHOD_TEXT = {
    "cuda-max-allocated": "torch.cuda.max_memory_allocated above what was live before the call",
    "rss-hwm": "process RSS high-water mark (VmHWM) above the RSS before the call",
}


def _fmt_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.7g}"
    return str(value)


def write_csv(rows: Iterable[dict], path: str, context: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            full = {k: _fmt_cell(row.get(k)) for k in ROW_FIELDS}
            full.update({k: str(context.get(k, "-")) for k in CONTEXT_FIELDS})
            writer.writerow(full)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value) -> Optional[float]:
    if value is None or value == "":
        return None
    return float(value)


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], skips_as_list: bool = False) -> str:
    """One markdown table for rows of one device (dict values may be numbers or CSV strings).

    ``skips_as_list``: skipped providers go to a list under the table, one line per
    (provider, reason), instead of a table row per shape (the README's compact form)."""
    if not rows:
        return "_no results_\n"
    first = rows[0]
    method = first.get("mem_method", "")
    lines = [
        f"Device: **{first['device']}**; torch {first.get('torch', '-')}, triton {first.get('triton', '-')}, "
        f"liger-kernel {first.get('liger-kernel', '-')}, cut-cross-entropy {first.get('cut-cross-entropy', '-')}"
        + "".join(f", {k} {first[k]}" for k in ("trl", "llamafactory") if first.get(k)) + "; "
        f"dft_kernels {first.get('dft_kernels', '-')} at commit `{first.get('commit', '-')}`; "
        f"1-min load average at start {first.get('load_avg', '-')}.",
        "",
        f"Time: median fwd+bwd ms (20th-80th percentile); fwd = forward only under no_grad. "
        f"Peak extra MB: {MEM_METHOD_TEXT.get(method, method)}, minus the inputs and the dx/dW "
        "every provider returns. x floor / x Liger: fwd+bwd time over the bare-GEMM floor's / Liger's. "
        "check: loss and gradients vs the reference provider (rel. error).",
        "",
        "| shape | provider | fwd+bwd ms (p20-p80) | fwd ms | peak extra MB | x floor | x Liger | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    not_run: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        status = r.get("status", "")
        if skips_as_list and status == "skipped":
            not_run.setdefault((r["provider"], r.get("reason", "")), []).append(r["shape"])
            continue
        if status == "ok":
            med, p20, p80 = _num(r.get("ms_median")), _num(r.get("ms_p20")), _num(r.get("ms_p80"))
            time_cell = f"{_ms(med)} ({_ms(p20)}-{_ms(p80)})"
            peak = _num(r.get("peak_mb"))
            peak_cell = "-" if peak is None else f"{peak:.1f}"
            check = r.get("check", "")
            if check == "ok":
                errs = [_num(r.get("loss_rel_err")), _num(r.get("grad_rel_err"))]
                check = f"ok ({max(e for e in errs if e is not None):.0e})" if any(e is not None for e in errs) \
                    else "ok"
            cells = [time_cell, _ms(_num(r.get("fwd_ms_median"))), peak_cell, _ratio(_num(r.get("x_floor"))),
                     _ratio(_num(r.get("x_liger"))), check]
        else:
            cells = ["-", "-", "-", "-", "-", f"{status}: {r.get('reason', '')}"]
        lines.append("| " + " | ".join(_cell(str(c)) for c in [r["shape"], r["provider"], *cells]) + " |")
    if not_run:
        n_shapes = len({r["shape"] for r in rows})
        lines += ["", "Not run here:"]
        for (prov, reason), shapes in not_run.items():
            where = "all shapes" if len(shapes) == n_shapes else ", ".join(shapes)
            lines.append(f"- `{prov}` ({where}): {reason}")
    return "\n".join(lines) + "\n"
