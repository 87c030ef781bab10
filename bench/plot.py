"""PNG plot of a run: fwd+bwd time and peak extra memory per provider, one row per shape."""

from __future__ import annotations

from typing import Optional


def _num(value) -> Optional[float]:
    if value is None or value == "":
        return None
    return float(value)


def plot(rows: list[dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes: list[str] = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 0.4 + 2.4 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        group = [r for r in rows if r["shape"] == shape]
        ran = [r for r in group if r.get("status") == "ok"]
        names = [r["provider"] for r in ran]
        colors = ["tab:green" if r["kind"] == "ours" else "tab:gray" if r["kind"] == "floor" else "tab:blue"
                  for r in ran]
        skipped = [r["provider"] for r in group if r.get("status") != "ok"]
        for j, (field, label) in enumerate((("ms_median", "fwd+bwd ms (median, p20-p80)"),
                                            ("peak_mb", "peak extra MB"))):
            ax = axes[i][j]
            vals = [_num(r.get(field)) or 0.0 for r in ran]
            if field == "ms_median":
                lo = [v - (_num(r.get("ms_p20")) or v) for v, r in zip(vals, ran)]
                hi = [(_num(r.get("ms_p80")) or v) - v for v, r in zip(vals, ran)]
                ax.barh(names, vals, xerr=[lo, hi], color=colors)
            else:
                ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.tick_params(axis="y", labelsize=8)
            if j == 0:
                ax.set_title(shape, fontsize=9, loc="left")
            if skipped and j == 1:
                ax.set_title("not run: " + ", ".join(skipped), fontsize=7, loc="right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
