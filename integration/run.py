"""``make integration``: one cached virtual environment per trainer, its smoke test, a table.

    python3 -m integration.run [--only trl,axolotl] [--reinstall] [--timeout SECONDS]

For each trainer: creates ``.integration/<trainer>/venv`` (git-ignored) from the pinned
``integration/requirements/<trainer>.txt`` unless it already holds exactly those pins (the
requirements file's hash is stamped in the folder), runs ``integration/smoke_<trainer>.py`` in
it with this checkout on ``PYTHONPATH`` (dft_kernels is not installed into the trainer's
environment: what is tested is this working tree), and prints

    trainer | version | status | step-1 loss ours | step-1 loss theirs | rel. err | wall time

A smoke test's extra pairs (``PAIRS``: the trainer's other losses through ours and through the
trainer, e.g. ``llamafactory (use_asft_loss)``) get a row each, "wall time" being their two runs
(the install column says "cached": it is the trainer's).  A trainer whose pinned environment does not
install is reported "not installable" with pip's error.  Logs and JSON results:
``.integration/<trainer>/``; the table also goes to ``.integration/results.md``.  Exit status 1 when
a smoke test fails.  Standard library only: it runs with the system Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".integration"
REQUIREMENTS = ROOT / "integration" / "requirements"


@dataclass(frozen=True)
class Trainer:
    """One trainer under test: its pip distribution, pinned environment and smoke module."""

    name: str
    dist: str

    @property
    def requirements(self) -> Path:
        return REQUIREMENTS / f"{self.name}.txt"

    @property
    def folder(self) -> Path:
        return CACHE / self.name

    @property
    def python(self) -> Path:
        return self.folder / "venv" / "bin" / "python"

    @property
    def smoke_module(self) -> str:
        return f"integration.smoke_{self.name.replace('-', '_')}"


TRAINERS = [Trainer("trl", "trl"), Trainer("llamafactory", "llamafactory"), Trainer("axolotl", "axolotl"),
            Trainer("ms-swift", "ms-swift")]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _pip_error(log: str) -> str:
    """The lines of a pip log that say why it failed."""
    lines = [ln for ln in log.splitlines() if not ln.startswith("WARNING: Location")]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("ERROR") or "error:" in ln.lower()), None)
    picked = lines[start:start + 12] if start is not None else lines[-12:]
    return "\n".join(picked).strip()


def install(trainer: Trainer, reinstall: bool) -> tuple[bool, str, float]:
    """(installed, pip error or "", seconds spent installing; 0 when the cached venv was reused)."""
    req = trainer.requirements
    if not req.is_file():
        return False, f"no pinned requirements file {req.relative_to(ROOT)}", 0.0
    digest = hashlib.sha256(req.read_bytes()).hexdigest()[:16]
    stamp = trainer.folder / f"installed-{digest}"
    if stamp.exists() and trainer.python.exists() and not reinstall:
        return True, "", 0.0
    t0 = time.perf_counter()
    shutil.rmtree(trainer.folder, ignore_errors=True)
    trainer.folder.mkdir(parents=True)
    log_path = trainer.folder / "install.log"
    pins = _pins(req)
    steps = [[sys.executable, "-m", "venv", str(trainer.folder / "venv")]]
    if "torch" in pins:  # torch first, alone: pip then takes the build this machine has (see the requirements)
        steps.append([str(trainer.python), "-m", "pip", "install", f"torch=={pins['torch']}"])
    steps.append([str(trainer.python), "-m", "pip", "install", "-r", str(req)])
    with open(log_path, "w") as log:
        for cmd in steps:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT)).returncode
            if rc != 0:
                log.close()
                return False, _pip_error(log_path.read_text()), time.perf_counter() - t0
    stamp.touch()
    return True, "", time.perf_counter() - t0


def smoke_env() -> dict:
    """The smoke tests' environment: this checkout on the path, offline, no trackers."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", WANDB_DISABLED="true", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               AXOLOTL_DO_NOT_TRACK="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def smoke(trainer: Trainer, timeout: float) -> dict:
    out = trainer.folder / "result.json"
    out.unlink(missing_ok=True)
    env = smoke_env()
    cmd = [str(trainer.python), "-m", trainer.smoke_module, "--out", str(out)]
    t0 = time.perf_counter()
    with open(trainer.folder / "smoke.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"status": "fail", "reasons": [f"timed out after {timeout:.0f} s"],
                    "wall_s": time.perf_counter() - t0}
    if not out.exists():
        tail = (trainer.folder / "smoke.log").read_text()[-2000:]
        return {"status": "fail", "reasons": [f"exit code {rc} without a result:\n{tail}"],
                "wall_s": time.perf_counter() - t0}
    return json.loads(out.read_text())


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _load(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _fmt_loss(x) -> str:
    return "—" if x is None else f"{x:.9f}"


def table(rows: list[dict]) -> str:
    head = ["trainer", "version", "status", "step-1 loss ours", "step-1 loss theirs", "rel. err",
            "wall time (smoke)", "install"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ours, theirs = r.get("ours_step1"), r.get("theirs_step1")
        err = f"{abs(ours - theirs) / abs(theirs):.1e}" if ours is not None and theirs else "—"
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") is not None else "—"
        inst = "cached" if not r.get("install_s") else f"{r['install_s']:.0f} s"
        lines.append("| " + " | ".join([r["trainer"], r["version"], r["status"], _fmt_loss(ours), _fmt_loss(theirs),
                                         err, wall, inst]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated trainers (default: all): "
                                       + ", ".join(t.name for t in TRAINERS))
    parser.add_argument("--reinstall", action="store_true", help="rebuild the virtual environments")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per smoke test")
    a = parser.parse_args(argv)
    chosen = TRAINERS
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {t.name for t in TRAINERS})
        if unknown:
            parser.error(f"--only: unknown trainers {unknown}")
        chosen = [t for t in TRAINERS if t.name in names]

    started, load_start = _now(), os.getloadavg()
    rows, failed, notes = [], False, []
    for trainer in chosen:
        pinned = _pins(trainer.requirements).get(trainer.dist, "?") if trainer.requirements.is_file() else "?"
        print(f"[{trainer.name}] environment ({trainer.requirements.relative_to(ROOT)})", flush=True)
        ok, error, install_s = install(trainer, a.reinstall)
        row = {"trainer": trainer.name, "version": pinned, "install_s": install_s}
        if not ok:
            row["status"] = "not installable"
            notes.append(f"{trainer.name}: not installable (pip, log {trainer.folder / 'install.log'}):\n{error}")
            rows.append(row)
            print(f"[{trainer.name}] not installable", flush=True)
            continue
        print(f"[{trainer.name}] smoke test", flush=True)
        result = smoke(trainer, a.timeout)
        row.update(status=result.get("status", "fail"), wall_s=result.get("wall_s"),
                   ours_step1=(result.get("ours") or [None])[0], theirs_step1=(result.get("theirs") or [None])[0])
        installed = (result.get("versions") or {}).get(trainer.dist)
        if installed and installed != pinned:
            row["version"] = f"{installed} (pinned {pinned})"
        if row["status"] != "pass":
            failed = True
            notes.append(f"{trainer.name}: " + "\n  ".join(result.get("reasons") or ["?"])
                         + f"\n  (log: {trainer.folder / 'smoke.log'})")
        else:
            v = result.get("versions") or {}
            notes.append(f"{trainer.name}: pass — transformers {v.get('transformers')}, torch {v.get('torch')}, "
                         f"trl {v.get('trl')}; ref. float64 step 1 {result.get('reference_step1'):.9f}; "
                         f"steps 1-3 ours {result.get('ours')} theirs {result.get('theirs')}; largest tensor ours "
                         f"{result.get('ours_largest')} elements (theirs {result.get('theirs_largest')}, "
                         f"supervised tokens x vocab {result.get('tokens_x_vocab')}); fused calls "
                         f"{result.get('fused_calls')}, micro-batches checked {result.get('checked_micro_batches')}")
        rows.append(row)
        for name, pair in (result.get("pairs") or {}).items():   # the trainer's other losses, ours vs theirs
            rows.append({"trainer": f"{trainer.name} ({name})", "version": row["version"], "install_s": 0.0,
                         "status": pair.get("status", "fail"), "ours_step1": (pair.get("ours") or [None])[0],
                         "theirs_step1": (pair.get("theirs") or [None])[0],
                         "wall_s": sum(v or 0.0 for v in (pair.get("run_wall_s") or {}).values()) or None})
            if pair.get("status") == "pass":
                notes.append(f"{trainer.name} ({name}): pass — steps 1-3 ours {pair.get('ours')} theirs "
                             f"{pair.get('theirs')}; largest tensor ours {pair.get('ours_largest')} elements (theirs "
                             f"{pair.get('theirs_largest')}, supervised tokens x vocab {pair.get('tokens_x_vocab')}); "
                             f"fused calls {pair.get('fused_calls')}, micro-batches checked "
                             f"{pair.get('checked_micro_batches')}; {pair.get('detail') or ''}")

    command = " ".join(["python3 -m integration.run", *(sys.argv[1:] if argv is None else argv)])
    header = (f"`{command}`, {started} to {_now()}, {os.cpu_count()} CPUs, load average (1/5/15 min) "
              f"{_load(load_start)} at the start, {_load(os.getloadavg())} at the end (wall times grow with the load)")
    text = header + "\n\n" + table(rows) + "\n\n" + "\n".join(notes) + "\n"
    CACHE.mkdir(exist_ok=True)
    (CACHE / "results.md").write_text(text)
    print()
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
