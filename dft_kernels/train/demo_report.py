"""The demo's results: per-seed collection, mean ± std tables with tie calls, the figure, the docs block."""

from __future__ import annotations

import math
import os
import re
import statistics

__all__ = ["collect", "format_tables", "plot_demo", "write_docs_block", "verdict", "run_label", "SETTINGS"]

# setting -> (title, (label of the 'ce' run, label of the 'dft' run, label of the anchored 'dft' run))
SETTINGS = {
    "A": ("Setting A, expert demonstrations: SFT vs DFT vs ASFT on the fine-tuning set's worked solutions",
          ("SFT", "DFT", "ASFT")),
    "B": ("Setting B, offline RL: RFT vs DFT vs ASFT on the warm start's own verified-correct samples",
          ("RFT", "DFT", "ASFT")),
}


def _settings(opts) -> list:
    """The settings the run ran (``opts.settings``: AB, A or B)."""
    return [k for k in SETTINGS if k in getattr(opts, "settings", "AB")]


def _pairs(labels: tuple) -> list:
    """The differences reported, (first, second) = first - second: DFT and ASFT against the ce run,
    and ASFT against DFT."""
    base, dft, asft = labels
    return [(dft, base), (asft, base), (asft, dft)]


def run_label(label: str, run: dict, opts) -> str:
    if label == "ASFT":
        return f"ASFT (dft + {getattr(opts, 'asft_kl_coef', 0.1):g} KL)"
    return f"{label} ({run['objective']})"
LOW, HIGH = 0.1, 0.9     # token-probability thresholds reported in the table


def collect(jobs, opts) -> dict:
    """Per seed: the warm start's scores and token probabilities, each run's curve (step 0 = warm
    start), final scores, training NLL and token probabilities, and the sampling counts."""
    res = {j.name: j.result for j in jobs}
    seeds = []
    for s in range(opts.seeds):
        warm = res[f"seed{s}/warmstart-score"]
        start = {"step": 0, "hard": warm["hard"], "easy": warm["easy"]}
        entry = {"warm": warm, "sampling": {"problems": 0, "samples": 0, "kept": 0}}
        for name in res:
            if name.startswith(f"seed{s}/sample"):
                for k in entry["sampling"]:
                    entry["sampling"][k] += res[name][k]
        for setting in _settings(opts):
            labels = SETTINGS[setting][1]
            entry[setting] = {}
            for label in labels:
                r = dict(res[f"seed{s}/{setting}-{label}"])
                if "skipped" in r:
                    entry[setting] = {"skipped": r["skipped"]}
                    break
                r["curve"] = [start] + r["curve"]
                r["hard"], r["easy"] = r["curve"][-1]["hard"], r["curve"][-1]["easy"]
                entry[setting][label] = r
        seeds.append(entry)
    return {"seeds": seeds}


def _mean_std(xs: list) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs)) if len(xs) > 1 else (xs[0], float("nan"))


def _fmt(xs: list, scale: float = 100.0, digits: int = 1) -> str:
    m, s = _mean_std(xs)
    if math.isnan(s):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def verdict(diffs: list, names: tuple = ("DFT", "SFT")) -> str:
    """``diffs`` = per-seed (first - second).  A tie unless |mean| exceeds the seed std of the
    difference; one seed gives no verdict."""
    if len(diffs) < 2:
        return "one seed: no verdict"
    m, s = _mean_std(diffs)
    if abs(m) <= s:
        return "tie (|mean| <= std)"
    return f"{names[0] if m > 0 else names[1]} better"


def _share(probs: list, low: bool) -> float:
    if not probs:
        return float("nan")
    return sum((p < LOW) if low else (p > HIGH) for p in probs) / len(probs)


def _result_digits(run: dict) -> list:
    """The probabilities of the result digits among a run's recorded target tokens."""
    return [p for p, k in zip(run["probs"], run.get("kinds") or "") if k == "r"]


def _token_cells(runs: list) -> list:
    digits = [_result_digits(r) for r in runs]
    return [_fmt([_share(r["probs"], True) for r in runs]), _fmt([_share(r["probs"], False) for r in runs]),
            _fmt([sum(d) / len(d) if d else float("nan") for d in digits], 1.0, 3),
            _fmt([_share(d, True) for d in digits])]


def format_tables(results: dict, opts) -> dict:
    """Both settings' tables as aligned text and as markdown."""
    seeds = results["seeds"]
    n = len(seeds)
    text, md = [], []
    cols = ["run", "hard EM %", "easy EM %", "train NLL", f"tokens p<{LOW} %", f"tokens p>{HIGH} %",
            "result digits mean p", f"result digits p<{LOW} %"]
    for setting in _settings(opts):
        title, labels = SETTINGS[setting]
        skipped = [s[setting]["skipped"] for s in seeds if "skipped" in s[setting]]
        if skipped:
            text += [f"{title}: skipped: {skipped[0]}", ""]
            md += [f"**{title}**: skipped: {skipped[0]}", ""]
            continue
        rows = [["warm start", _fmt([s["warm"]["hard"] for s in seeds]), _fmt([s["warm"]["easy"] for s in seeds]),
                 "-", *_token_cells([s["warm"] for s in seeds])]]
        for label in labels:
            runs = [s[setting][label] for s in seeds]
            rows.append([run_label(label, runs[0], opts), _fmt([r["hard"] for r in runs]),
                         _fmt([r["easy"] for r in runs]), _fmt([r["final_nll"] for r in runs], 1.0, 4),
                         *_token_cells(runs)])
        diffs = {(b, a, k): [s[setting][b][k] - s[setting][a][k] for s in seeds]
                 for b, a in _pairs(labels) for k in ("hard", "easy")}
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        sampled = ""
        if setting == "B":
            sm = [s["sampling"] for s in seeds]
            sampled = (f" Data: {_fmt([x['kept'] for x in sm], 1, 0)} verified-correct samples kept of "
                       f"{sm[0]['samples']} ({sm[0]['problems']} problems x {opts.num_samples}, temperature "
                       f"{opts.temperature:g}).")
        header = f"{title} ({n} seed{'s' if n > 1 else ''}{', mean ± std' if n > 1 else ''}).{sampled}"
        text.append(header)
        text.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
        text.append("-" * (sum(widths) + 2 * (len(cols) - 1)))
        for r in rows:
            text.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        for (b, a, k), d in diffs.items():
            text.append(f"{b} - {a}, {k} EM: {_fmt(d)} points -> {verdict(d, (b, a))}")
        text.append("")
        md.append(f"**{header}**\n")
        md.append("| " + " | ".join(cols) + " |")
        md.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        md += ["| " + " | ".join(r) + " |" for r in rows]
        md.append("")
        for (b, a, k), d in diffs.items():
            md.append(f"- {b} − {a}, {k} EM: {_fmt(d)} points: **{verdict(d, (b, a))}**")
        md.append("")
    chance = results.get("chance", {})
    foot = (f"hard/easy EM: greedy exact match of the \\boxed answer on {opts.n_heldout} unseen 4-term / 3-term "
            f"problems, after {opts.steps} fine-tuning steps (chance, always answering the most frequent "
            f"fine-tuning answer: {chance.get('hard', float('nan')):.1%} / {chance.get('easy', float('nan')):.1%}).\n"
            f"train NLL: mean over the last 10 steps of the run's own training data.\n"
            f"tokens p<{LOW} / p>{HIGH}: share of the target tokens of the first {opts.probs_examples} fine-tuning "
            f"demonstrations to which the model gives probability below {LOW} / above {HIGH}; result digits: the "
            "same for the digits of each step's result (12 in 7+5=12), the only tokens the warm start is unsure "
            "of.\n"
            "X - Y: per-seed difference, mean ± std over seeds; a tie unless |mean| > std.")
    text.append(foot)
    md.append(foot.replace("\n", "  \n"))
    return {"text": "\n".join(text), "markdown": "\n".join(md)}


def plot_demo(results: dict, opts, path: str) -> str:
    """Row per setting: hard and easy held-out EM against fine-tuning step (mean ± std band over
    seeds; step 0 is the warm start) and the histogram of the fine-tuning targets' probabilities
    under the warm start and after each run (all seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = results["seeds"]
    colors = {"warm start": "0.45", "SFT": "C0", "RFT": "C0", "DFT": "C3", "ASFT": "C2"}
    settings = _settings(opts)
    fig, axes = plt.subplots(len(settings), 3, figsize=(15, 4.1 * len(settings) + 0.4), squeeze=False)
    bins = np.linspace(0.0, 1.0, 21)
    for row, setting in enumerate(settings):
        title, labels = SETTINGS[setting]
        if any("skipped" in s[setting] for s in seeds):
            for ax in axes[row]:
                ax.axis("off")
            axes[row, 0].text(0, 0.5, f"{setting}: skipped", fontsize=12)
            continue
        for col, key in enumerate(("hard", "easy")):
            ax = axes[row, col]
            for label in labels:
                curves = [s[setting][label]["curve"] for s in seeds]
                steps = [p["step"] for p in curves[0]]
                ys = np.array([[p[key] for p in c] for c in curves]) * 100
                m = ys.mean(0)
                ax.plot(steps, m, marker="o", ms=3, color=colors[label],
                        label=run_label(label, seeds[0][setting][label], opts))
                if len(seeds) > 1:
                    sd = ys.std(0, ddof=1)
                    ax.fill_between(steps, m - sd, m + sd, color=colors[label], alpha=0.18, lw=0)
            ax.axhline(results.get("chance", {}).get(key, 0) * 100, color="0.6", ls=":", lw=1, label="chance")
            ax.set_title(f"{setting}: held-out {key} ({'4' if key == 'hard' else '3'}-term) exact match")
            ax.set_xlabel("fine-tuning step (0 = warm start)")
            ax.set_ylabel("exact match %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax = axes[row, 2]
        series = [("warm start", [p for s in seeds for p in s["warm"]["probs"]])]
        series += [(label, [p for s in seeds for p in s[setting][label]["probs"]]) for label in labels]
        for label, probs in series:
            ax.hist(probs, bins=bins, histtype="step", lw=1.8, color=colors[label],
                    weights=np.full(len(probs), 100.0 / max(len(probs), 1)), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("probability of the target token")
        ax.set_ylabel("% of target tokens (log)")
        ax.set_title(f"{setting}: fine-tuning demonstrations' token probabilities")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = len(seeds)
    fig.suptitle(f"DFT paper's two settings at toy scale: tiny Qwen2 on arithmetic chains, {n} seed"
                 f"{'s (mean ± std band)' if n > 1 else ''}; lr {opts.lr:g}, {opts.steps} steps, batch "
                 f"{opts.overrides.get('per_device_batch_size', 32)}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


BEGIN = "<!-- demo results: generated by the command below; do not edit by hand -->"
END = "<!-- end of demo results -->"


def write_docs_block(doc: str, markdown: str, png: str, *, command: str, wall: float, cpu: float) -> None:
    """Replace the block between ``BEGIN`` and ``END`` in ``doc`` (appended when absent)."""
    rel = os.path.relpath(png, os.path.dirname(os.path.abspath(doc)))
    block = (f"{BEGIN}\n\n`{command}`: wall time {wall:.0f} s, CPU time of all jobs {cpu:.0f} s, "
             f"{os.cpu_count()} cores.\n\n{markdown}\n\n![demo figure]({rel})\n\n{END}")
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else ""
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    tmp = doc + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, doc)
