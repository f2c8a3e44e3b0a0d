"""The calibrate command: collect through the server -> sweep T -> choose -> report -> apply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import thresholds as th
from .collect import Collected, collect_cached
from .control import apply_threshold
from .datasets import load_image_set
from .report import plot_confidence_histogram, plot_curves, table, write_json


@dataclasses.dataclass
class Criterion:
    """How T is chosen. Exactly one of target_escalation / min_agreement, else max_acc_drop
    (optionally with a confidence level)."""

    max_acc_drop: float = 0.0
    target_escalation: float | None = None
    min_agreement: float | None = None
    confidence_level: float | None = None

    def validate(self) -> None:
        if self.target_escalation is not None and self.min_agreement is not None:
            raise ValueError("choose one of --target-escalation and --min-agreement")
        if self.confidence_level is not None and (self.target_escalation is not None or self.min_agreement is not None):
            raise ValueError("--confidence-level goes with --max-acc-drop only")
        if not 0.0 <= self.max_acc_drop <= 1.0:
            raise ValueError(f"--max-acc-drop must be in [0, 1], got {self.max_acc_drop}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")


def outcomes_of(collected: Collected) -> th.Outcomes:
    return th.Outcomes.from_probs(collected.little, collected.big, collected.labels, collected.macs_little, collected.macs_big)


def analyse(collected: Collected, criterion: Criterion) -> tuple[th.Sweep, th.Outcomes, th.Choice]:
    criterion.validate()
    outcomes = outcomes_of(collected)
    s = th.sweep(outcomes)
    if criterion.target_escalation is not None:
        choice = th.choose_target_escalation(s, outcomes.confidence, criterion.target_escalation)
    elif criterion.min_agreement is not None:
        choice = th.choose_min_agreement(s, criterion.min_agreement)
    else:
        if not outcomes.has_labels:
            raise ValueError("the data has no labels: use --target-escalation or --min-agreement (label-free)")
        if criterion.confidence_level is not None:
            choice = th.choose_with_bound(s, outcomes.n, criterion.max_acc_drop, criterion.confidence_level)
        else:
            choice = th.choose_max_acc_drop(s, float(outcomes.big_correct.mean()), criterion.max_acc_drop)
    return s, outcomes, choice


def calibrate(
    url: str,
    data: str | Path,
    out: str | Path,
    criterion: Criterion,
    *,
    labels_csv: str | Path | None = None,
    classes: str | Path | None = None,
    eval_data: str | Path | None = None,
    eval_labels_csv: str | Path | None = None,
    apply: bool = False,
    repository: str | Path | None = None,
    batch_size: int = 16,
    concurrency: int = 4,
    refresh: bool = False,
    show_progress: bool = True,
    log=print,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = load_image_set(data, labels_csv=labels_csv, classes=classes)
    log(f"calibration set: {len(images)} images ({images.layout}{', unlabelled' if images.labels is None else ''})")
    kwargs = dict(batch_size=batch_size, concurrency=concurrency, show_progress=show_progress)
    collected = collect_cached(url, images, out / "calibration.npz", refresh=refresh, **kwargs)

    s, outcomes, choice = analyse(collected, criterion)
    report = th.summary(s, outcomes, choice.index)
    report["criterion"] = choice.criterion
    report["criterion_met"] = choice.met
    report["bound"] = choice.bound
    if outcomes.has_labels:
        report["corrected_mistakes"] = th.corrected_mistakes(outcomes)

    evaluation = None
    if eval_data is not None:
        eval_images = load_image_set(eval_data, labels_csv=eval_labels_csv, classes=classes)
        log(f"evaluation set: {len(eval_images)} images ({eval_images.layout})")
        eval_collected = collect_cached(url, eval_images, out / "evaluation.npz", refresh=refresh, **kwargs)
        evaluation = th.evaluate_at(outcomes_of(eval_collected), report["threshold"])
        report["eval"] = evaluation

    text = table(s, outcomes, choice.index)
    (out / "table.txt").write_text(text + "\n")
    plot_curves(out / "curves.png", s, outcomes, choice.index, evaluation)
    if outcomes.has_labels:
        plot_confidence_histogram(out / "confidence_histogram.png", outcomes)

    if apply:
        written = apply_threshold(url, report["threshold"], repository=repository)
        report["applied"] = {"threshold": report["threshold"], "config": None if written is None else str(written)}
    write_json(out / "report.json", report)
    log(text)
    log(describe(report))
    return report


def _saving(reduction: float) -> str:
    return f"{reduction:.1%} fewer MACs" if reduction >= 0 else f"{-reduction:.1%} more MACs than big alone"


def describe(report: dict) -> str:
    acc = report["accuracy"]
    lines = [
        f"chosen T = {report['threshold']:.6f} ({report['criterion']}{'' if report['criterion_met'] else ', NOT met: safest T returned'})",
        f"escalation p = {report['escalation']:.3f}; GMACs per image {report['gmacs']['cascade']:.3f} vs big "
        f"{report['gmacs']['big']:.3f}: {_saving(report['macs_reduction'])}",
    ]
    if acc["cascade"] is not None:
        lines.append(f"accuracy: little {acc['little']:.4f}, big {acc['big']:.4f}, cascade {acc['cascade']:.4f}")
    if report.get("bound") and report["bound"].get("upper_drop") is not None:
        lines.append(f"accuracy drop <= {report['bound']['upper_drop']:.4f} at {report['bound']['level']:.0%} confidence")
    if "eval" in report:
        ev = report["eval"]
        if ev["accuracy"]["cascade"] is not None:
            lines.append(
                f"eval set: p = {ev['escalation']:.3f}, accuracy big {ev['accuracy']['big']:.4f} vs cascade "
                f"{ev['accuracy']['cascade']:.4f}, {_saving(ev['macs_reduction'])}"
            )
    if "applied" in report:
        where = report["applied"]["config"] or "the running server only (repository not found here: pass --repo)"
        lines.append(f"applied T = {report['applied']['threshold']:.6f} to {where}")
    return "\n".join(lines)
