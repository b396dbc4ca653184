"""The two figures of a benchmark run, drawn from its aggregate rows (matplotlib, Agg backend).

speedup_vs_latency.png: speedup over ar-push (ratio of medians, all datasets) against link latency,
one line per mode -- how the gain grows as links get slower.
accepted_vs_k.png: tokens per round (accepted drafts + the bonus token) against the fixed draft
length of the dsd-kK modes, one line per dataset, with dsd-auto at its mean k for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .modes import BASELINE, parse_mode  # noqa: E402

SPEEDUP_PNG = "speedup_vs_latency.png"
ACCEPTED_PNG = "accepted_vs_k.png"


def _overall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows over all datasets: the "all" rows when there are several datasets, else the only one."""
    has_all = any(r["dataset"] == "all" for r in rows)
    return [r for r in rows if (r["dataset"] == "all") == has_all]


def plot_speedup(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    overall = _overall(rows)
    for mode in dict.fromkeys(r["mode"] for r in overall):
        pts = sorted((r["latency_ms"], r["speedup_ratio_of_medians"]) for r in overall
                     if r["mode"] == mode and r["speedup_ratio_of_medians"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode, linestyle="--" if mode == BASELINE else "-")
    ax.set_xlabel("emulated link latency (ms, one way)")
    ax.set_ylabel(f"speedup over {BASELINE} (ratio of median tok/s)")
    ax.set_title("Speedup vs link latency")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accepted(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    latencies = sorted({r["latency_ms"] for r in rows})
    lat = latencies[0] if latencies else None  # acceptance does not depend on latency: use one run
    mine = [r for r in rows if r["latency_ms"] == lat and r["tokens_per_round"] is not None]
    drawn = False
    for ds in dict.fromkeys(r["dataset"] for r in mine):
        fixed = sorted((parse_mode(r["mode"]).k_fixed, r["tokens_per_round"]) for r in mine
                       if r["dataset"] == ds and r["mode"].startswith("dsd-k"))
        if fixed:
            line, = ax.plot(*zip(*fixed), marker="o", label=f"{ds}: dsd-k")
            drawn = True
            auto = [r for r in mine if r["dataset"] == ds and r["mode"] == "dsd-auto" and r["mean_k"] is not None]
            if auto:
                ax.plot([auto[0]["mean_k"]], [auto[0]["tokens_per_round"]], marker="*", markersize=12,
                        color=line.get_color(), linestyle="none", label=f"{ds}: dsd-auto (mean k)")
    if drawn:
        top = max(parse_mode(r["mode"]).k_fixed for r in mine if r["mode"].startswith("dsd-k"))
        ax.plot([0, top], [1, top + 1], color="grey", linestyle=":", label="all accepted (k+1)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no dsd-k modes in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("draft length k")
    ax.set_ylabel("tokens per round (accepted + 1)")
    ax.set_title("Tokens per round vs draft length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    paths = [out / SPEEDUP_PNG, out / ACCEPTED_PNG]
    plot_speedup(rows, paths[0])
    plot_accepted(rows, paths[1])
    return paths
