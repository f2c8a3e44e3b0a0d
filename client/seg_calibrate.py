"""`littlebig calibrate` for a segmentation gate: collect through the server -> sweep T on mIoU and pixel
accuracy -> choose -> report (with bootstrap intervals and the paper's Figure-3 curves) -> apply.

Beside the confidence the served graph computes (CONFIDENCE: its grid of regions), the report compares
the other image-level confidences on the same images under the same criterion, the paper's SLIC
superpixels among them (`signals` in report.json, signals.png): which one gates better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from littlebig.errors import UserError

from . import seg_thresholds as st
from .criterion import Criterion
from .infer import GateInfo
from .report import _pyplot, plot_cost_panels, write_json
from .seg_collect import SegCollected, collect_segmentation_cached
from .segmentation import load_segmentation_set

SERVED = "served"  # the graph's own CONFIDENCE, the one the gate routes on
TABLE_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)
BAND_GRID = np.linspace(0.0, 1.0, 101)


def outcomes_of(collected: SegCollected, signal: str = SERVED) -> st.SegOutcomes:
    confidence = collected.confidence[0] if signal == SERVED else collected.signals[signal]
    little, big = collected.counts if collected.has_labels else (None, None)
    return st.SegOutcomes(np.asarray(confidence, dtype=np.float64), little, big, collected.agree, collected.pixels,
                          collected.macs_little, collected.macs_big)


def choose(s: st.SegSweep, outcomes: st.SegOutcomes, criterion: Criterion):
    if criterion.label_free:
        return st.choose_label_free(s, outcomes.confidence, criterion.target_escalation, criterion.min_agreement)
    if not outcomes.has_labels:
        raise UserError("the data has no label masks (DIR/masks/<name>.png): use --target-escalation or --min-agreement")
    if criterion.point_estimate:
        return st.choose_point_estimate(s, outcomes, criterion.max_acc_drop)
    return st.choose_with_bootstrap(s, outcomes, criterion.max_acc_drop, criterion.confidence_level)


def analyse(collected: SegCollected, criterion: Criterion, signal: str = SERVED) -> tuple[st.SegSweep, st.SegOutcomes, object, dict]:
    """The sweep, the choice and its report block for one image-level confidence."""
    outcomes = outcomes_of(collected, signal)
    s = st.sweep(outcomes)
    choice = choose(s, outcomes, criterion)
    block = st.summary(s, outcomes, choice.index) | {"signal": signal, "criterion": choice.criterion,
                                                      "criterion_met": choice.met, "bound": choice.bound}
    return s, outcomes, choice, block


def compare_signals(collected: SegCollected, criterion: Criterion) -> list[dict]:
    """Every image-level confidence under the same criterion: its chosen T, metrics and MACs saved, and its
    metric-vs-GMACs curve over T (for signals.png)."""
    rows = []
    for signal in (SERVED, *collected.signals):
        s, _, _, block = analyse(collected, criterion, signal)
        keep = ("signal", "threshold", "escalation", "gmacs", "macs_reduction", "miou", "pixel_accuracy", "criterion_met")
        rows.append({key: block[key] for key in keep} | {
            "curve": {"gmacs": s.gmacs.tolist(), "miou": None if s.miou is None else s.miou.tolist()}})
    return rows


def calibrate_segmentation(
    url: str, data: str | Path, out: str | Path, criterion: Criterion, *, info: GateInfo, eval_data: str | Path | None = None,
    apply: bool = False, write=None, batch_size: int = 8, concurrency: int = 2, refresh: bool = False,
    show_progress: bool = True, log=print,
) -> dict:
    """Choose T for the served segmentation gate on ``data`` (DIR/images + DIR/masks)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"refresh": refresh, "log": log, "batch_size": batch_size, "concurrency": concurrency, "show_progress": show_progress}
    images = load_segmentation_set(data)
    collected = collect_segmentation_cached(url, images, info, out / "calibration.npz", **kwargs)
    log(f"calibration set: {len(images)} images ({images.layout})")
    s, outcomes, choice, report = analyse(collected, criterion)
    report["task"] = "segmentation"
    report["uncertainty"] = st.uncertainty(outcomes, report["threshold"], criterion.confidence_level)
    report["signals"] = compare_signals(collected, criterion)
    evaluation = None
    if eval_data is not None:
        eval_images = load_segmentation_set(eval_data)
        eval_collected = collect_segmentation_cached(url, eval_images, info, out / "evaluation.npz", **kwargs)
        log(f"evaluation set: {len(eval_images)} images ({eval_images.layout})")
        evaluation = report["eval"] = st.evaluate_at(outcomes_of(eval_collected), report["threshold"])
    (out / "table.txt").write_text(table(s, outcomes, choice.index) + "\n")
    plot_curves(out / "curves.png", s, outcomes, choice.index, evaluation, criterion.confidence_level)
    if outcomes.has_labels:
        plot_signals(out / "signals.png", report["signals"], outcomes)
    if apply:
        from .calibrate import apply_choice

        report["applied"] = apply_choice(url, report["threshold"], write)
    write_json(out / "report.json", report)
    log(table(s, outcomes, choice.index))
    log(describe(report))
    return report


def table(s: st.SegSweep, outcomes: st.SegOutcomes, chosen: int) -> str:
    rows = sorted({int(np.searchsorted(s.thresholds, t, side="left")) for t in TABLE_GRID} | {chosen})
    lines = [f"{'T':>8} {'p(T)':>7} {'mIoU':>7} {'pix.acc':>8} {'agree':>7} {'GMACs':>8} {'rel.MACs':>9}"]
    for i in (i for i in rows if i < len(s.thresholds)):
        miou = "-" if s.miou is None else f"{s.miou[i]:.4f}"
        pixel = "-" if s.pixel_accuracy is None else f"{s.pixel_accuracy[i]:.4f}"
        lines.append(f"{s.thresholds[i]:8.4f} {s.escalation[i]:7.3f} {miou:>7} {pixel:>8} {s.agreement[i]:7.3f} "
                     f"{s.gmacs[i]:8.4f} {s.relative_macs[i]:9.3f}{'  <- chosen' if i == chosen else ''}")
    big = ""
    if outcomes.has_labels:
        alone = outcomes.metrics()["big"]
        big = f"mIoU {alone['miou']:.4f}, pixel accuracy {alone['pixel_accuracy']:.4f}, "
    return "\n".join(lines + [f"big alone: {big}{outcomes.macs_big / 1e9:.4f} GMACs"])


def _pct(pair) -> str:
    return f"[{pair[0]:.1%}, {pair[1]:.1%}]"


def describe(report: dict) -> str:
    lines = [
        f"chosen T = {report['threshold']:.6f} ({report['criterion']}{'' if report['criterion_met'] else ', NOT met: safest T returned'})",
        (f"escalation p = {report['escalation']:.3f}; GMACs per image {report['gmacs']['cascade']:.4f} vs big "
        f"{report['gmacs']['big']:.4f}: {report['macs_reduction']:.1%} fewer MACs"),
    ]
    if report["miou"]["cascade"] is not None:
        m, p, u = report["miou"], report["pixel_accuracy"], report["uncertainty"]
        lines.append(f"mIoU: little {m['little']:.4f}, big {m['big']:.4f}, cascade {m['cascade']:.4f}; pixel accuracy: "
                     f"little {p['little']:.4f}, big {p['big']:.4f}, cascade {p['cascade']:.4f}")
        lines.append(f"how sure ({u['images']} images, {u['level']:.0%}, {u['method']}): mIoU drop {_pct(u['miou_drop'])} "
                     f"(upper bound {u['miou_drop_upper']:.1%}), pixel accuracy drop {_pct(u['pixel_accuracy_drop'])}, "
                     f"cascade mIoU {_pct(u['miou'])}, escalation [{u['escalation'][0]:.3f}, {u['escalation'][1]:.3f}]")
        lines.append("signals (same criterion): " + "; ".join(
            f"{r['signal']} T={r['threshold']:.4f} saves {r['macs_reduction']:.1%} at mIoU {r['miou']['cascade']:.4f}"
            for r in report["signals"]))
    if "eval" in report and report["eval"]["miou"]["cascade"] is not None:
        e = report["eval"]
        lines.append(f"eval set ({e['images']} images): p = {e['escalation']:.3f}, mIoU little {e['miou']['little']:.4f}, "
                     f"big {e['miou']['big']:.4f}, cascade {e['miou']['cascade']:.4f}, {e['macs_reduction']:.1%} fewer MACs")
    if "applied" in report:
        where = report["applied"]["config"]
        lines.append(f"applied T = {report['applied']['threshold']:.6f} to the running server"
                     + (f" and {where}" if where else "; the repository on disk keeps its old T (pass --repo DIR)"))
    return "\n".join(lines)


def plot_curves(path: Path, s: st.SegSweep, outcomes: st.SegOutcomes, chosen: int, evaluation: dict | None, level: float) -> None:
    """Paper Figure 3 for segmentation: p(T) and relative MACs against T, mIoU and pixel accuracy against
    GMACs with a bootstrap band at ``level``, big, little, the chosen T (and the eval set's point)."""
    plt = _pyplot()
    panels = 4 if outcomes.has_labels else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4))
    t = s.thresholds
    plot_cost_panels(axes[:2], s, chosen)
    if outcomes.has_labels:
        band = st.bootstrap_drops(outcomes, BAND_GRID, level, replicates=300)
        band_gmacs = st.sweep(outcomes, BAND_GRID).gmacs
        alone = outcomes.metrics()
        for ax, metric, name in ((axes[2], "miou", "mIoU"), (axes[3], "pixel_accuracy", "pixel accuracy")):
            ax.fill_between(band_gmacs, band[metric][0] * 100, band[metric][1] * 100, color="tab:blue", alpha=0.2, step="post",
                            label=f"{level:.0%} bootstrap band ({outcomes.n} images)")
            ax.plot(s.gmacs, getattr(s, metric) * 100, label="Little-Big over T")
            ax.scatter([outcomes.macs_big / 1e9], [alone["big"][metric] * 100], color="black", zorder=3, label="big alone")
            ax.scatter([outcomes.macs_little / 1e9], [alone["little"][metric] * 100], color="grey", zorder=3, label="little alone")
            ax.scatter([s.gmacs[chosen]], [getattr(s, metric)[chosen] * 100], color="tab:red", marker="*", s=150, zorder=4,
                       label=f"chosen T={t[chosen]:.3f}")
            if evaluation and evaluation[metric]["cascade"] is not None:
                ax.scatter([evaluation["gmacs"]["cascade"]], [evaluation[metric]["cascade"] * 100], color="tab:green",
                           marker="D", zorder=4, label="chosen T on eval set")
                ax.scatter([evaluation["gmacs"]["big"]], [evaluation[metric]["big"] * 100], color="tab:green", marker="x",
                           zorder=4, label="big on eval set")
            ax.set(xlabel="GMACs per image", ylabel=f"{name} (%)", title=f"{name} vs MACs")
            ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_signals(path: Path, rows: list[dict], outcomes: st.SegOutcomes) -> None:
    """mIoU against GMACs over T for each image-level confidence, each with the T the criterion chose."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for row in rows:
        line, = ax.plot(row["curve"]["gmacs"], np.asarray(row["curve"]["miou"]) * 100, lw=1.0, label=row["signal"])
        ax.scatter([row["gmacs"]["cascade"]], [row["miou"]["cascade"] * 100], marker="*", s=120,
                   color=line.get_color(), edgecolors="black", linewidths=0.5, zorder=4)
    alone = outcomes.metrics()
    ax.scatter([outcomes.macs_big / 1e9], [alone["big"]["miou"] * 100], color="black", zorder=5, label="big alone")
    ax.scatter([outcomes.macs_little / 1e9], [alone["little"]["miou"] * 100], color="grey", zorder=5, label="little alone")
    ax.set(xlabel="GMACs per image", ylabel="mIoU (%)", title="Image-level confidences over T; stars: the T each one's criterion chose")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
