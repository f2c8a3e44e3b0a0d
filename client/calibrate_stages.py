"""Calibration of K-stage cascades, gating signals and the ensemble weight (issue 11), on collected
probabilities (client/collect.py): pure numpy via client/kstage.py, plus the report files.

The two-stage max_softmax calibration stays in calibrate.py; it adds this module's signal comparison
and ensemble sweep to its report.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from littlebig.errors import UserError
from littlebig.gate.signals import DEFAULT_SIGNAL, MULTICLASS_SIGNALS, MULTILABEL_SIGNALS

from . import kstage as ks
from .collect import Collected
from .criterion import Criterion
from .report import plot_chains, plot_ensemble, plot_signals

ENSEMBLE_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def stage_names(collected: Collected) -> list[str]:
    return list(collected.models) or [f"stage{k}" for k in range(len(collected.stages))]


def outcomes_of(collected: Collected, signal: str, task: str = "multiclass", indices=None, ensemble_weight: float = 1.0) -> ks.StageOutcomes:
    """Outcomes of the sub-cascade ``indices`` (default: every stage). With an ensemble weight w < 1
    (two stages) the second stage answers (1 - w) p_little + w p_big (paper Eq. 8); the reference stays big."""
    indices = list(range(len(collected.stages))) if indices is None else list(indices)
    stages = [collected.stages[k] for k in indices]
    macs = [collected.macs[k] for k in indices]
    reference = None
    if ensemble_weight != 1.0:
        if len(stages) != 2:
            raise UserError("the ensemble (Eq. 8) is two-stage only")
        reference = stages[1]
        stages = [stages[0], (1.0 - ensemble_weight) * stages[0] + ensemble_weight * stages[1]]
    return ks.StageOutcomes.from_probs(stages, collected.labels, macs, signal=signal, task=task, reference=reference)


def analyse(outcomes: ks.StageOutcomes, criterion: Criterion) -> tuple[ks.JointSweep, ks.JointChoice, dict]:
    s = ks.sweep_stages(outcomes)
    choice = ks.choose(outcomes, s, criterion)
    block = ks.summary(outcomes, s, choice.index, choice.thresholds)
    block.update(criterion=choice.criterion, criterion_met=choice.met, bound=choice.bound, exact=s.exact)
    return s, choice, block


def _against_big(block: dict, collected: Collected) -> dict:
    """MACs saved against the most expensive collected model alone (not the sub-cascade's own last stage)."""
    block["macs_reduction_vs_big"] = 1.0 - block["gmacs"] * 1e9 / collected.macs[-1]
    return block


def chains(count: int, *, last: int | None = None) -> list[tuple[int, ...]]:
    """Every cascade of >= 2 of ``count`` stages in cost order; with ``last``, those ending there."""
    found = []
    for size in range(2, count + 1):
        for combo in itertools.combinations(range(count), size):
            if last is None or combo[-1] == last:
                found.append(combo)
    return found


def chain_blocks(collected: Collected, criterion: Criterion, signal: str, task: str, combos) -> list[dict]:
    """Each sub-cascade calibrated on its own (reference: its own last stage), with its frontier."""
    names = stage_names(collected)
    blocks = []
    for combo in combos:
        o = outcomes_of(collected, signal, task, combo)
        s, _, block = analyse(o, criterion)
        block["stages"] = [names[k] for k in combo]
        if s.metric is not None:
            front = ks.pareto(s.gmacs, s.metric)
            block["frontier"] = {"gmacs": front[0].tolist(), "metric": front[1].tolist()}
        blocks.append(_against_big(block, collected))
    return blocks


def compare_signals(collected: Collected, criterion: Criterion, task: str = "multiclass") -> list[dict]:
    """The same cascade and criterion with each gating signal: MACs saved at equal accuracy."""
    rows = []
    for name in MULTICLASS_SIGNALS if task == "multiclass" else MULTILABEL_SIGNALS:
        _, _, block = analyse(outcomes_of(collected, name, task), criterion)
        block["signal"] = name
        rows.append(block)
    return rows


def ensemble_sweep(collected: Collected, criterion: Criterion, signal: str = "max_softmax", weights=ENSEMBLE_WEIGHTS) -> list[dict]:
    """Paper Figure 5: for each ensemble weight w, the chosen T and the MACs saved (little -> big)."""
    rows = []
    for w in weights:
        if not 0.0 < w <= 1.0:
            raise UserError(f"ensemble weights must be in (0, 1], got {w}")
        _, _, block = analyse(outcomes_of(collected, signal, "multiclass", (0, len(collected.stages) - 1), w), criterion)
        block.update(ensemble_weight=float(w), threshold=block["thresholds"][0])
        rows.append(block)
    return rows


def stage_calibration(
    collected: Collected, criterion: Criterion, signal: str | None, task: str = "multiclass", *,
    evaluation: Collected | None = None, ensemble_weights=None,
) -> tuple[dict, ks.StageOutcomes, ks.JointSweep]:
    """The K-stage report: the chosen thresholds, every pair and the full chain, the signal comparison."""
    signal = signal or DEFAULT_SIGNAL[task]
    outcomes = outcomes_of(collected, signal, task)
    s, _, report = analyse(outcomes, criterion)
    names = stage_names(collected)
    report.update(signal=signal, task=task, stages=names)
    if outcomes.has_labels:
        report["chains"] = chain_blocks(collected, criterion, signal, task, chains(len(names)))
        report["signals"] = compare_signals(collected, criterion, task)
    if ensemble_weights:
        report["ensemble"] = ensemble_sweep(collected, criterion, signal, ensemble_weights)
    if evaluation is not None:
        report["eval"] = ks.evaluate(outcomes_of(evaluation, signal, task), report["thresholds"])
    return report, outcomes, s


def describe(report: dict) -> str:
    names, metric = report["stages"], report["metric_name"]
    ts = ", ".join(f"T{k + 1}={t:.4f}" for k, t in enumerate(report["thresholds"]))
    lines = [
        f"{' -> '.join(names)} ({report['signal']}): {ts} ({report['criterion']}"
        + ("" if report["criterion_met"] else ", NOT met: safest thresholds returned")
        + ("" if report["exact"] else "; thresholds from a grid") + ")",
        "answered by stage: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, report["answered"])),
        f"GMACs per row {report['gmacs']:.3f} vs {names[-1]} {report['stage_gmacs'][-1]:.3f}: "
        f"{report['macs_reduction']:.1%} fewer MACs",
    ]
    if report["metric"] is not None:
        alone = ", ".join(f"{n} {m:.4f}" for n, m in zip(names, report["stage_metric"]))
        lines.append(f"{metric}: cascade {report['metric']:.4f}; alone: {alone}")
    if report.get("bound") and report["bound"].get("upper_drop") is not None:
        lines.append(f"drop <= {report['bound']['upper_drop']:.1%} at {report['bound']['level']:.0%} confidence")
    for row in report.get("signals", []):
        lines.append(f"  signal {row['signal']:<12} {row['macs_reduction']:7.1%} fewer MACs, {metric} {row['metric']:.4f}, "
                     f"T={', '.join(f'{t:.4f}' for t in row['thresholds'])}")
    for row in report.get("chains", []):
        lines.append(f"  chain {' -> '.join(row['stages']):<40} {row['macs_reduction_vs_big']:7.1%} fewer MACs than "
                     f"{names[-1]}, {metric} {row['metric']:.4f}")
    for row in report.get("ensemble", []):
        lines.append(f"  ensemble w={row['ensemble_weight']:.2f}: T={row['threshold']:.4f}, "
                     f"{row['macs_reduction']:.1%} fewer MACs, {metric} {row['metric']:.4f}")
    return "\n".join(lines)


def write_plots(out: Path, report: dict, collected: Collected) -> list[str]:
    written = []
    if report.get("chains"):
        plot_chains(out / "chains.png", report, single_points(collected, report["task"]))
        written.append("chains.png")
    if report.get("signals"):
        plot_signals(out / "signals.png", report["signals"], report["metric_name"])
        written.append("signals.png")
    if report.get("ensemble"):
        plot_ensemble(out / "ensemble.png", report["ensemble"])
        written.append("ensemble.png")
    return written


def single_points(collected: Collected, task: str = "multiclass") -> list[tuple[str, float, float]]:
    """(name, GMACs, metric) of each collected model alone."""
    names = stage_names(collected)
    o = outcomes_of(collected, DEFAULT_SIGNAL[task], task)
    if not o.has_labels:
        return []
    return [(names[k], collected.macs[k] / 1e9, o.stage_metric(k)) for k in range(o.k)]
