"""Calibration report: report.json, a text table and the paper's figures as PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .thresholds import Outcomes, Sweep, bootstrap, drop_upper_bound

TABLE_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)


def table(s: Sweep, outcomes: Outcomes, chosen: int) -> str:
    """A row per tenth of T plus the chosen T, like the paper's accuracy-vs-MACs tables."""
    rows = sorted({int(np.searchsorted(s.thresholds, t, side="left")) for t in TABLE_GRID} | {chosen})
    lines = [f"{'T':>8} {'p(T)':>7} {'accuracy':>9} {'agree':>7} {'GMACs':>7} {'rel.MACs':>9}"]
    for i in rows:
        if i >= len(s.thresholds):
            continue
        acc = "-" if s.accuracy is None else f"{s.accuracy[i]:.4f}"
        mark = "  <- chosen" if i == chosen else ""
        lines.append(
            f"{s.thresholds[i]:8.4f} {s.escalation[i]:7.3f} {acc:>9} {s.agreement[i]:7.3f} "
            f"{s.gmacs[i]:7.3f} {s.relative_macs[i]:9.3f}{mark}"
        )
    big = f"accuracy {outcomes.big_correct.mean():.4f}, " if outcomes.has_labels else ""
    lines.append(f"big alone: {big}{outcomes.macs_big / 1e9:.3f} GMACs")
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


BAND_GRID = np.linspace(0.0, 1.0, 101)


def plot_curves(path: Path, s: Sweep, outcomes: Outcomes, chosen: int, evaluation: dict | None = None, level: float = 0.95) -> None:
    """Paper Figure 3: p(T) vs T, relative MACs vs T, accuracy vs GMACs (big and chosen T marked), with
    a bootstrap band at ``level`` around the accuracy curve: how far the curve could move on new images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if s.accuracy is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    t = s.thresholds
    plot_cost_panels(axes[:2], s, chosen)
    if s.accuracy is not None:
        ax = axes[2]
        band = bootstrap(outcomes, BAND_GRID, level, replicates=400)
        band_gmacs = (outcomes.macs_little + (outcomes.confidence[:, None] < BAND_GRID).mean(0) * outcomes.macs_big) / 1e9
        ax.fill_between(band_gmacs, band.accuracy[0] * 100, band.accuracy[1] * 100, color="tab:blue", alpha=0.2,
                        step="post", label=f"{level:.0%} bootstrap band ({outcomes.n} images)")
        ax.plot(s.gmacs, s.accuracy * 100, label="Little-Big over T")
        # Paired bound: big's measured accuracy minus the exact upper bound on the drop (what a choice certifies).
        certified = outcomes.big_correct.mean() - np.where(s.escalation >= 1.0, 0.0, drop_upper_bound(s.lost, s.gained, outcomes.n, level))
        ax.plot(s.gmacs, certified * 100, color="tab:orange", lw=0.9, ls="--", label=f"big minus {level:.0%} bound on the drop")
        big_gmacs = outcomes.macs_big / 1e9
        ax.scatter([big_gmacs], [outcomes.big_correct.mean() * 100], color="black", zorder=3, label="big alone")
        ax.scatter([outcomes.macs_little / 1e9], [outcomes.little_correct.mean() * 100], color="grey", zorder=3, label="little alone")
        ax.scatter([s.gmacs[chosen]], [s.accuracy[chosen] * 100], color="tab:red", marker="*", s=150, zorder=4,
                   label=f"chosen T={t[chosen]:.3f}")
        if evaluation and evaluation.get("accuracy", {}).get("cascade") is not None:
            ax.scatter([evaluation["gmacs"]["cascade"]], [evaluation["accuracy"]["cascade"] * 100], color="tab:green",
                       marker="D", zorder=4, label="chosen T on eval set")
            ax.scatter([evaluation["gmacs"]["big"]], [evaluation["accuracy"]["big"] * 100], color="tab:green",
                       marker="x", zorder=4, label="big on eval set")
        ax.set(xlabel="GMACs per image", ylabel="top-1 accuracy (%)", title="Accuracy vs MACs")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost_panels(axes, s, chosen: int) -> None:
    """The first two panels of Figure 3 on two axes: p(T) and relative MACs against T (``s``: a sweep with
    thresholds, escalation, relative_macs), the chosen T marked."""
    t = s.thresholds
    axes[0].plot(t, s.escalation)
    axes[0].set(xlabel="threshold T", ylabel="p(T): share sent to big", title="Escalation share")
    axes[1].plot(t, s.relative_macs)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].set(xlabel="threshold T", ylabel="MACs / MACs of big", title="Relative MACs")
    for ax in axes:
        ax.axvline(t[chosen], color="tab:red", lw=0.8, ls=":", label=f"chosen T={t[chosen]:.3f}")
        ax.legend(loc="best")


def plot_confidence_histogram(path: Path, outcomes: Outcomes, bins: int = 10) -> None:
    """Paper Figure 2 (right): little's confidence for its mistakes that big corrects vs the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corrected = ~outcomes.little_correct & outcomes.big_correct
    edges = np.linspace(0.0, 1.0, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([outcomes.confidence[corrected], outcomes.confidence[~corrected]], bins=edges, density=True,
            label=[f"little wrong, big right (n={corrected.sum()})", f"rest (n={(~corrected).sum()})"])
    ax.set(xlabel="little's confidence (max softmax probability)", ylabel="density",
           title="Where big helps: little's confidence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric_label(metric: str) -> str:
    return {"accuracy": "top-1 accuracy (%)", "micro_f1": "micro-F1 (%)"}.get(metric, metric)


def plot_frontiers(ax, blocks: list[dict], singles: list[tuple[str, float, float]], metric: str) -> None:
    """Each cascade's accuracy-vs-GMACs frontier (best metric at each cost) with its chosen point, and
    each model alone (paper Figure 3's view)."""
    for block in blocks:
        label = " -> ".join(block["stages"])
        if "frontier" in block:
            line, = ax.step(block["frontier"]["gmacs"], np.asarray(block["frontier"]["metric"]) * 100, where="post",
                            lw=1.0 if len(block["stages"]) == 2 else 1.8, label=label)
            colour = line.get_color()
        else:
            colour = None
        ax.scatter([block["gmacs"]], [block["metric"] * 100], marker="*", s=120, color=colour, zorder=4,
                   edgecolors="black", linewidths=0.5)
    for name, gmacs, value in singles:
        ax.scatter([gmacs], [value * 100], color="black", zorder=5)
        ax.annotate(name, (gmacs, value * 100), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set(xlabel="GMACs per image", ylabel=_metric_label(metric))
    ax.legend(loc="lower right", fontsize=7)


def plot_chains(path: Path, report: dict, singles: list[tuple[str, float, float]]) -> None:
    """Every pair and the full chain of a K-stage calibration (stars: the thresholds each one chose;
    ``singles``: (name, GMACs, metric) of each model alone)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    plot_frontiers(ax, report["chains"], singles, report["metric_name"])
    ax.set_title(f"Cascades of {', '.join(report['stages'])} ({report['signal']}); stars: {report['criterion']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_signals(path: Path, rows: list[dict], metric: str) -> None:
    """MACs saved by each gating signal under the same criterion, with the metric it reached."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["signal"] for r in rows]
    saved = [r["macs_reduction"] * 100 for r in rows]
    bars = ax.bar(names, saved, color="tab:blue")
    for bar, row in zip(bars, rows):
        ax.annotate(f"{metric} {row['metric']:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="MACs saved vs the last stage alone (%)", title=f"Gating signals at equal criterion ({rows[0]['criterion']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ensemble(path: Path, rows: list[dict]) -> None:
    """Paper Figure 5: the chosen T and the MACs saved for each ensemble weight w."""
    plt = _pyplot()
    w = [r["ensemble_weight"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(w, [r["threshold"] for r in rows], marker="o")
    axes[0].set(xlabel="ensemble weight w (1 = big alone answers escalated rows)", ylabel="chosen T", title="Threshold vs w")
    axes[1].plot(w, [r["macs_reduction"] * 100 for r in rows], marker="o", color="tab:green")
    axes[1].set(xlabel="ensemble weight w", ylabel="MACs saved vs big alone (%)", title=f"MACs saved vs w ({rows[0]['criterion']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
