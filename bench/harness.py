"""Run every provider of one shape on the same inputs in this process; one result row each."""

from __future__ import annotations

import gc
import sys
from typing import Callable, Optional

import torch

from . import memory
from .check import Result, compare
from .inputs import Inputs, make_inputs
from .providers import Provider, Runner, Skip
from .shapes import Shape
from .timing import TimingConfig, time_fn

MB = 1 << 20
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _base_row(shape: Shape, prov: Provider, device_name: str, mem_method: str) -> dict:
    return {
        "device": device_name, "shape": shape.name, "model": shape.model, "n": shape.n, "h": shape.h,
        "v": shape.v, "dtype": shape.dtype, "softcap": "" if shape.softcap is None else shape.softcap,
        "provider": prov.name, "kind": prov.kind, "status": "", "reason": "",
        "ms_median": None, "ms_p20": None, "ms_p80": None, "fwd_ms_median": None, "peak_mb": None,
        "mem_method": mem_method, "x_floor": None, "x_liger": None, "loss": None, "grad_checksum": None,
        "loss_rel_err": None, "grad_rel_err": None, "check": "", "check_against": "",
    }


def measure_provider(prov: Provider, runner: Runner, inputs: Inputs, device: torch.device, cfg: TimingConfig,
                     row: dict) -> None:
    """Time fwd+bwd and forward-only, then the peak extra memory of one fwd+bwd."""
    params = [inputs.x, inputs.w]
    t = time_fn(runner.step, device, cfg, grad_to_none=params)
    row.update(ms_median=t.median_ms, ms_p20=t.p20_ms, ms_p80=t.p80_ms)

    def forward():
        with torch.no_grad():
            runner.loss()
    row["fwd_ms_median"] = time_fn(forward, device, cfg).median_ms
    inputs.clear_grads()   # so the grads of the last timed call are not freed inside the measurement
    _cleanup(device)
    peak = memory.peak_bytes(runner.step, device)
    if peak is not None:
        row["peak_mb"] = max(0, peak - runner.grad_bytes) / MB


def run_shape(shape: Shape, providers: list[Provider], device: torch.device, cfg: TimingConfig, *,
              device_name: str, seed: int = 0, log: Log = _stderr,
              inputs: Optional[Inputs] = None) -> list[dict]:
    """Measure ``providers`` in order on one set of inputs.  The first checked provider that
    runs is the loss-check reference for the others (put ours first)."""
    mem_method = memory.method(device)
    inputs = inputs if inputs is not None else make_inputs(shape, device, seed)
    rows: list[dict] = []
    ref: Optional[Result] = None
    ref_name = ""
    for prov in providers:
        row = _base_row(shape, prov, device_name, mem_method)
        rows.append(row)
        log(f"[bench] {shape.name} | {prov.name} ...")
        runner = None
        try:
            runner = prov.build(inputs, device)
            if prov.checked:
                inputs.clear_grads()
                got = runner.checked_step()   # first call also warms up / compiles
                row.update(loss=got.loss, grad_checksum=got.grad_checksum)
                if ref is None:
                    ref, ref_name = got, prov.name
                    row.update(check="reference", check_against=prov.name)
                else:
                    verdict = compare(got, ref, shape.torch_dtype)
                    row.update(loss_rel_err=verdict.loss_rel_err, grad_rel_err=verdict.grad_rel_err,
                               check=verdict.detail, check_against=ref_name)
                    if not verdict.ok:
                        row.update(status="failed-check", reason=f"{verdict.detail} vs {ref_name}; not timed")
                del got
            else:
                row["check"] = "n/a (no loss)"
            if row["status"] != "failed-check":
                measure_provider(prov, runner, inputs, device, cfg, row)
                row["status"] = "ok"
        except Skip as exc:
            row.update(status="skipped", reason=str(exc))
        except torch.OutOfMemoryError as exc:
            row.update(status="error", reason="out of memory: " + _short(exc))
        except Exception as exc:  # a peer that breaks on this machine is reported, not fatal
            row.update(status="error", reason=_short(exc))
        finally:
            del runner
            inputs.clear_grads()
            _cleanup(device)
        log(f"[bench]   -> {row['status']} {row['reason'] or ''}".rstrip())
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``x_floor`` / ``x_liger``: a row's median fwd+bwd time over the floor's / Liger's (same shape)."""
    by_shape: dict[str, list[dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for group in by_shape.values():
        def ms_of(kind_or_name: str) -> Optional[float]:
            for r in group:
                if (r["kind"] == kind_or_name or r["provider"] == kind_or_name) and r["status"] == "ok":
                    return r["ms_median"]
            return None
        floor, liger = ms_of("floor"), ms_of("liger")
        for r in group:
            if r["status"] != "ok" or r["ms_median"] is None:
                continue
            r["x_floor"] = r["ms_median"] / floor if floor else None
            r["x_liger"] = r["ms_median"] / liger if liger else None
