"""The figures of bench/overload.py: latency against load with the gears' time, and round 1 over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# variant -> matplotlib marker and colour
STYLE = {"fixed": ("o-", "tab:blue"), "adaptive": ("s-", "tab:green"), "last_gear": ("^-", "tab:orange")}


def plot(rows: list[dict], ladder: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    loads = [r["load"] for r in rows]
    for variant, (marker, colour) in STYLE.items():
        if variant not in rows[0]:
            continue
        left.plot(loads, [r[variant]["p99_ms"] for r in rows], marker, color=colour, label=f"{variant} p99")
        left.plot(loads, [r[variant]["p50_ms"] for r in rows], marker, color=colour, alpha=0.4, label=f"{variant} p50")
    left.set_yscale("log")
    left.set_xlabel("offered load (x the fixed gate's capacity)")
    left.set_ylabel("latency (ms)")
    left.legend()
    bottom = np.zeros(len(rows))
    for k, t in enumerate(ladder):
        share = np.array([r["adaptive"]["gear_seconds"][k] for r in rows])
        right.bar([str(x) for x in loads], share, bottom=bottom, label=f"gear {k} (T={t:.3f})")
        bottom += share
    right.set_xlabel("offered load")
    right.set_ylabel("seconds in gear (adaptive)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(runs: list, target_ms: float, path: Path) -> None:
    """Round 1 of each load over time (``runs``: overload.Run): each second's p99 for both gates, and the
    adaptive gate's T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r.load for r in runs})
    fig, axes = plt.subplots(len(loads), 1, figsize=(10, 2.6 * len(loads)), sharex=True, squeeze=False)
    for ax, load in zip(axes[:, 0], loads):
        first = [r for r in runs if r.load == load and r.round == 0]
        for run in first:
            sent, latency = np.array(run.send_times), np.array(run.latencies_ms)
            seconds = np.arange(int(np.ceil(run.seconds)))
            p99 = [np.percentile(latency[(sent >= t) & (sent < t + 1)], 99) if np.any((sent >= t) & (sent < t + 1)) else np.nan
                   for t in seconds]
            marker, colour = STYLE[run.variant]
            ax.plot(seconds + 0.5, p99, marker, color=colour, ms=3, label=f"{run.variant} p99 per second")
            if run.variant == "adaptive":
                twin = ax.twinx()
                twin.step(sent, run.thresholds, where="post", color="grey", alpha=0.5, lw=1)
                twin.set_ylabel("adaptive T", color="grey")
        ax.axhline(target_ms, color="red", ls="--", lw=1, label="target")
        ax.set_yscale("log")
        ax.set_ylabel(f"{load:.1f}x: ms")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("seconds into the run (by send time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
