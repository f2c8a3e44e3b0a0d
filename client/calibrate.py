"""The calibrate command: collect through the server -> sweep T -> choose -> report -> apply.
How T is chosen and the defaults: client/criterion.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from scipy import stats

from littlebig.errors import UserError

from . import gears as gear_ladder
from . import labelfree
from . import thresholds as th
from .collect import Collected, collect_cached
from .control import switch_threshold
from .criterion import Criterion
from .datasets import ImageSet, load_image_set
from .infer import LittleBigClient
from .report import plot_confidence_histogram, plot_curves, table, write_json

# Writes applied thresholds (and the gears' ladder, JSON, or None; keyword audit_promise: the promised drop,
# or None to keep it) into a repository on disk; returns the file written. The command line gives one
# (model_repository.builder.write_thresholds) for --repo.
Writer = Callable[..., Path]

# Big's accuracy with a p-value above this against guessing (1 / classes) counts as "near chance".
CHANCE_P_VALUE = 1e-3


_NO_GEARS = "an accuracy budget sets the gears, and gears apply to two-stage cascades gated on max_softmax"


class CalibrationError(UserError):
    """Calibration cannot give a trustworthy answer on this data; the message says why and what to do."""


def outcomes_of(collected: Collected) -> th.Outcomes:
    return th.Outcomes.from_probs(collected.little, collected.big, collected.labels, collected.macs_little, collected.macs_big)


def analyse(collected: Collected, criterion: Criterion, unlabelled: Collected | None = None) -> tuple[th.Sweep, th.Outcomes, th.Choice]:
    """Sweep T and choose. ``unlabelled``: more images without labels, whose disagreement with big joins
    the evidence (client/labelfree.py); the sweep is then over both sets' confidences."""
    criterion.validate()
    outcomes = outcomes_of(collected)
    union = None if unlabelled is None else labelfree.union(collected.stages, unlabelled.stages, collected.macs)
    s = th.sweep(outcomes, None if union is None else th.candidate_thresholds(union.confidence))
    tolerance = criterion.disagreement_tolerance(outcomes.has_labels)
    if criterion.target_escalation is not None:
        choice = th.choose_target_escalation(s, outcomes.confidence, criterion.target_escalation)
    elif criterion.min_agreement is not None and criterion.point_estimate:
        choice = th.choose_min_agreement(s, criterion.min_agreement)
    elif tolerance is not None or union is not None:
        choice = labelfree.certified(s, outcomes, union, criterion, tolerance)
    elif criterion.point_estimate:
        choice = th.choose_max_acc_drop(s, float(outcomes.big_correct.mean()), criterion.max_acc_drop)
    else:
        choice = th.choose_with_bound(s, outcomes.n, criterion.max_acc_drop, criterion.confidence_level)
    return s, outcomes, choice


def check_labels_fit(outcomes: th.Outcomes, num_classes: int, mapping: str) -> None:
    """Stop when big is no better than guessing: the labels then almost surely do not match the model."""
    if not outcomes.has_labels:
        return
    correct, n = int(outcomes.big_correct.sum()), outcomes.n
    p_value = stats.binom.sf(correct - 1, n, 1.0 / num_classes)
    if p_value > CHANCE_P_VALUE:
        raise CalibrationError(
            f"big answers {correct} of {n} images correctly ({correct / n:.1%}), no better than guessing among "
            f"{num_classes} classes: the labels probably do not match the model's classes (they were mapped "
            f"{mapping or 'as given'}). Check the folder names / CSV labels, or pass --classes with the model's class list."
        )


def point_estimate_warning(block: dict, criterion: Criterion) -> str | None:
    """The raw point estimate's promise may not hold: say so when its bound is far above the tolerance."""
    tolerance, upper = criterion.max_acc_drop, block.get("upper_drop")
    if upper is None or upper <= tolerance + max(tolerance, 0.005):
        return None
    level = block["level"]
    needed = block.get("images_to_certify_tolerance")
    more = (
        f"about {needed} images would certify it at these rates" if needed
        else "no number of images certifies a drop this small at these rates; choose a tolerance of a point or more"
    )
    return (
        f"point estimate: with {block['images']} images the drop at this T is only known to be <= {upper:.1%} "
        f"at {level:.0%} confidence, far above the tolerance {tolerance:.1%}; on new images it may lose more. "
        f"{more.capitalize()}, or leave out --point-estimate for a certified T."
    )


def not_met_warning(block: dict, criterion: Criterion) -> str:
    needed = block.get("images_to_certify_tolerance")
    return (
        f"no T certifies a drop <= {criterion.max_acc_drop:.1%} at {criterion.confidence_level:.0%} with "
        f"{block['images']} images (the smallest drop they can certify is {block['certifiable_drop']:.1%}); "
        "the T returned sends every image to big. Use more labelled images"
        + (f" (about {needed})" if needed else "")
        + f", a tolerance of at least {block['certifiable_drop']:.1%}, or --point-estimate."
    )


def build_report(
    s: th.Sweep, outcomes: th.Outcomes, choice: th.Choice, criterion: Criterion, mapping: str,
    accuracy_budget: float = gear_ladder.DEFAULT_ACCURACY_BUDGET, union: th.Outcomes | None = None,
) -> dict:
    """The report; with labels it also holds the gears below the chosen T (client/gears.py). ``union``: every
    image calibration saw (with more unlabelled ones), for the share of answers differing from big's."""
    report = th.summary(s, outcomes, choice.index)
    report["criterion"] = choice.criterion
    report["criterion_met"] = choice.met
    report["bound"] = choice.bound
    report["labels"] = mapping or None
    tolerance = None if criterion.label_free else criterion.max_acc_drop
    report["uncertainty"] = th.uncertainty(outcomes, report["threshold"], criterion.confidence_level, tolerance)
    report["agreement"] = labelfree.agreement_block(union or outcomes, report["threshold"], criterion.confidence_level, criterion.promise)
    report["promise"] = criterion.promise
    warnings = []
    if criterion.point_estimate and not criterion.label_free:
        warnings.append(point_estimate_warning(report["uncertainty"], criterion))
    certified = criterion.disagreement_tolerance(outcomes.has_labels) is not None or union is not None
    if not choice.met and certified:
        warnings.append(not_met_label_free_warning(report["agreement"], criterion))
    elif not choice.met and not criterion.label_free and not criterion.point_estimate:
        warnings.append(not_met_warning(report["uncertainty"], criterion))
    report["warnings"] = [w for w in warnings if w]
    if outcomes.has_labels:
        report["corrected_mistakes"] = th.corrected_mistakes(outcomes)
        report["gears"] = gear_ladder.ladder(outcomes, report["threshold"], accuracy_budget, criterion.confidence_level).as_dict()
    return report


def audit_promise(report: dict, criterion: Criterion) -> float | None:
    """The level the live audit checks its bound against (the gate's audit_promise). Certified on disagreement,
    it is the promised drop itself. Certified with labels, the answers little keeps may differ from big's more
    often than the promised drop (where little is right and big wrong, or both wrong): then it is the bound on
    disagreement this calibration states at T, and the audit watches for traffic drifting beyond it."""
    promise = criterion.promise
    if promise is None or not report["criterion_met"]:
        return promise
    labelled = report["uncertainty"].get("upper_drop") is not None and criterion.disagreement_tolerance(True) is None
    return max(promise, report["agreement"]["upper"]) if labelled else promise


def not_met_label_free_warning(block: dict, criterion: Criterion) -> str:
    needed = block.get("images_to_certify_tolerance")
    return (
        f"no T certifies a drop against big <= {criterion.promise:.1%} at {criterion.confidence_level:.0%} from "
        f"{block['images']} images (the smallest share of differing answers they can certify is {block['certifiable']:.1%}); "
        "the T returned sends every image to big. Use more images" + (f" (about {needed})" if needed else "")
        + " or a larger tolerance."
    )


def calibrate(
    url: str,
    data: str | Path,
    out: str | Path,
    criterion: Criterion = Criterion(),
    *,
    labels_csv: str | Path | None = None,
    classes: str | Path | None = None,
    eval_data: str | Path | None = None,
    eval_labels_csv: str | Path | None = None,
    apply: bool = False,
    accuracy_budget: float | None = None,
    write: Writer | None = None,
    batch_size: int = 16,
    concurrency: int = 4,
    refresh: bool = False,
    show_progress: bool = True,
    log=print,
    signal: str | None = None,
    models: tuple[str, ...] | None = None,
    ensemble_weights: tuple[float, ...] | None = None,
    unlabelled: bool = False,
    unlabelled_data: str | Path | None = None,
) -> dict:
    """Two stages gated on max_softmax: the threshold T as below. More stages (``models``, default: the
    gate's) or another gating signal: calibrate_stages (joint thresholds); both add the signal comparison
    and, with ``ensemble_weights``, the ensemble sweep. With ``apply`` the running server is switched to
    the choice, and ``write`` (when given) writes it into a repository on disk too. ``unlabelled``: the
    labels of ``data`` are not used; ``unlabelled_data``: more images whose labels are not used
    (client/labelfree.py)."""
    criterion.validate()
    _check_options(eval_data, eval_labels_csv, apply, write)
    if accuracy_budget is not None and signal not in (None, "max_softmax"):
        raise CalibrationError(f"{_NO_GEARS}, not {signal}: leave out --accuracy-budget here")
    _check_folders(data, eval_data, unlabelled_data)
    info = _served_segmentation(url)
    if info is not None:
        _check_segmentation_options(labels_csv=labels_csv, classes=classes, accuracy_budget=accuracy_budget, signal=signal,
                                    models=models, ensemble_weights=ensemble_weights)
        from .seg_calibrate import calibrate_segmentation

        return calibrate_segmentation(url, data, out, criterion, info=info, eval_data=eval_data, apply=apply, write=write,
                                      batch_size=batch_size, concurrency=concurrency, refresh=refresh,
                                      show_progress=show_progress, log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(batch_size=batch_size, concurrency=concurrency, show_progress=show_progress, refresh=refresh, log=log,
                  models=models)

    def image_set(folder, csv_file, withheld=False):
        return lambda model_labels, clips: _withheld(
            load_image_set(folder, labels_csv=csv_file, classes=classes, model_labels=model_labels, clips=clips), withheld)

    collected, images = collect_cached(url, image_set(data, labels_csv, unlabelled), out / "calibration.npz", **kwargs)
    log(f"calibration set: {len(images)} images ({describe_set(images)})")
    extra = None
    if unlabelled_data is not None:
        extra, more = collect_cached(url, image_set(unlabelled_data, None, True), out / "unlabelled.npz", **kwargs)
        log(f"unlabelled set: {len(more)} images (labels not used)")
    if len(collected.stages) > 2 or signal not in (None, "max_softmax"):
        if accuracy_budget is not None:  # known only now: the served stages are counted by collecting
            raise CalibrationError(f"{_NO_GEARS}, not {len(collected.stages)} stages: leave out --accuracy-budget here")
        eval_images = image_set(eval_data, eval_labels_csv) if eval_data else None
        return _calibrate_stages(url, collected, images, criterion, out, kwargs=kwargs, eval_images=eval_images, signal=signal,
                                 ensemble_weights=ensemble_weights, apply=apply, write=write, log=log)
    evaluate = (lambda threshold: _evaluate(url, image_set(eval_data, eval_labels_csv), out / "evaluation.npz", threshold,
                                            kwargs)) if eval_data is not None else None
    return _calibrate_two_stages(url, collected, images, extra, criterion, out, accuracy_budget=accuracy_budget,
                                 ensemble_weights=ensemble_weights, evaluate=evaluate, apply=apply, write=write, log=log)


def _check_folders(*folders) -> None:
    """Every data folder given exists (checked before asking the server anything)."""
    for folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist")


def _calibrate_two_stages(url: str, collected, images: ImageSet, extra, criterion: Criterion, out: Path, *,
                          accuracy_budget, ensemble_weights, evaluate, apply: bool, write, log) -> dict:
    """Two stages on max_softmax: choose T, report it (table, curves, report.json), evaluate and apply it."""
    s, outcomes, choice = analyse(collected, criterion, extra)
    check_labels_fit(outcomes, collected.little.shape[1], images.mapping)
    budget = gear_ladder.DEFAULT_ACCURACY_BUDGET if accuracy_budget is None else accuracy_budget
    report = build_report(s, outcomes, choice, criterion, images.mapping, budget,
                          None if extra is None else labelfree.union(collected.stages, extra.stages, collected.macs))
    report.update(_two_stage_extras(collected, criterion, ensemble_weights, out))
    evaluation = None
    if evaluate is not None:
        evaluation = report["eval"] = evaluate(report["threshold"])

    text = table(s, outcomes, choice.index)
    (out / "table.txt").write_text(text + "\n")
    plot_curves(out / "curves.png", s, outcomes, choice.index, evaluation, level=criterion.confidence_level)
    if outcomes.has_labels:
        plot_confidence_histogram(out / "confidence_histogram.png", outcomes)
    if apply:
        gears = gear_ladder.Ladder.from_dict(report["gears"]).config_value() if "gears" in report else None
        report["applied"] = apply_choice(url, report["threshold"], write, gears, audit_promise(report, criterion))
    write_json(out / "report.json", report)
    log(text)
    log(describe(report))
    return report


def _withheld(images: ImageSet, withheld: bool) -> ImageSet:
    """The set, its labels left out when ``withheld`` (label-free calibration of a labelled set)."""
    if not withheld or images.labels is None:
        return images
    return dataclasses.replace(images, labels=None, layout=f"{images.layout}, labels withheld", mapping="")
def _served_segmentation(url: str):
    """The served gate's GateInfo when it serves a segmentation cascade; None otherwise, and when the
    server cannot be asked (a classifier calibration may still run from its cache)."""
    from tritonclient.utils import InferenceServerException

    from .retry import RetryPolicy

    try:
        with LittleBigClient(url, retry=RetryPolicy(deadline_s=0.0)) as client:  # not asked again: the cache may serve
            info = client.gate_info()
    except (InferenceServerException, OSError, UserError):
        return None
    return info if info.task == "segmentation" else None


def _check_segmentation_options(**given) -> None:
    """Options made for class labels, K stages, gears or the ensemble do not apply to segmentation."""
    options = {"labels_csv": "--labels-csv", "classes": "--classes", "accuracy_budget": "--accuracy-budget",
               "signal": "--signal", "models": "--models", "ensemble_weights": "--ensemble-weights"}
    used = [flag for name, flag in options.items() if given[name] is not None]
    if used:
        raise CalibrationError(f"the served gate segments images: {', '.join(used)} do not apply (masks label the "
                               "pixels, T is chosen on mIoU; the gate routes on the graph's region confidence)")


def _check_options(eval_data, eval_labels_csv, apply: bool, write) -> None:
    """Options that would do nothing in this combination are refused rather than ignored."""
    if eval_labels_csv is not None and eval_data is None:
        raise CalibrationError("an evaluation labels CSV (--eval-labels-csv) needs the evaluation images (--eval-data)")
    if write is not None and not apply:
        raise CalibrationError("T is written into a repository (--repo) only when it is applied: add --apply")


def _evaluate(url: str, image_set, cache: Path, threshold: float, kwargs: dict) -> dict:
    """The chosen T on a second labelled set: what calibration promises on images it did not see."""
    collected, images = collect_cached(url, image_set, cache, **kwargs)
    kwargs["log"](f"evaluation set: {len(images)} images ({describe_set(images)})")
    outcomes = outcomes_of(collected)
    check_labels_fit(outcomes, collected.little.shape[1], images.mapping)
    return th.evaluate_at(outcomes, threshold)


def _two_stage_extras(collected: Collected, criterion: Criterion, ensemble_weights, out: Path) -> dict:
    """The signal comparison and the ensemble sweep (calibrate_stages) beside the two-stage report."""
    from . import calibrate_stages as cs

    if collected.labels is None:
        return {}
    extras = {"signals": cs.compare_signals(collected, criterion)}
    if ensemble_weights:
        extras["ensemble"] = cs.ensemble_sweep(collected, criterion, "max_softmax", ensemble_weights)
    cs.write_plots(out, {**extras, "metric_name": "accuracy"}, collected)
    return extras


def _calibrate_stages(url, collected, images, criterion, out, *, kwargs, eval_images, signal, ensemble_weights, apply, write, log) -> dict:
    """K stages or another signal: thresholds chosen jointly (client/calibrate_stages.py)."""
    from . import calibrate_stages as cs

    check_labels_fit(outcomes_of(collected), collected.little.shape[1], images.mapping)
    evaluation = None
    if eval_images is not None:
        evaluation, eval_set = collect_cached(url, eval_images, out / "evaluation.npz", **kwargs)
        log(f"evaluation set: {len(eval_set)} images ({describe_set(eval_set)})")
    report, _, _ = cs.stage_calibration(collected, criterion, signal, evaluation=evaluation, ensemble_weights=ensemble_weights)
    report["labels"] = images.mapping or None
    report["plots"] = cs.write_plots(out, report, collected)
    if apply:
        report["applied"] = apply_stage_choice(url, report["thresholds"], report["signal"], write)
    write_json(out / "report.json", report)
    log(cs.describe(report))
    return report


def apply_stage_choice(url: str, thresholds: list[float], signal: str, write: Writer | None = None) -> dict:
    """Switch the running K-stage gate to ``thresholds`` and, side by side, ``write`` them into a repository
    on disk; refused when the gate gates on another signal than the one calibrated."""
    from .control import switch_thresholds

    with LittleBigClient(url) as client:
        served = client.gate_config().signal
    if served != signal:
        raise CalibrationError(f"the gate gates on {served!r}, these thresholds are for {signal!r}: calibrate with "
                               f"--signal {served}, or rebuild the repository with the signal {signal}")
    switch_thresholds(url, thresholds)
    written = write(tuple(thresholds), None) if write is not None else None  # a ladder whose top was the old T goes too
    return {"thresholds": thresholds, "config": None if written is None else str(written)}


def apply_choice(url: str, threshold: float, write: Writer | None = None, gears: str | None = None,
                 promise: float | None = None) -> dict:
    """Switch the running server to T (and its gears, the gate's `gears` parameter; and the promised drop the
    audit checks, audit_promise, when given) and, side by side, ``write`` them into a repository on disk.
    Without gears, a ladder made for another T is removed."""
    switch_threshold(url, threshold, gears=gears, audit_promise=promise)
    written = write((threshold,), gears, audit_promise=promise) if write is not None else None
    return {"threshold": threshold, "gears": gears, "promise": promise, "config": None if written is None else str(written)}


def describe_set(images: ImageSet) -> str:
    kind = "video clips, " if images.clips else ""
    if images.labels is None:
        return f"{kind}{images.layout}, unlabelled"
    return f"{kind}{images.layout}, labels mapped {images.mapping}"


def _saving(reduction: float) -> str:
    return f"{reduction:.1%} fewer MACs" if reduction >= 0 else f"{-reduction:.1%} more MACs than big alone"


def _interval(pair: list[float] | None, percent: bool = True) -> str:
    if pair is None:
        return "-"
    return f"[{pair[0]:.1%}, {pair[1]:.1%}]" if percent else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def describe_uncertainty(block: dict) -> list[str]:
    level, boot = block["level"], block["bootstrap"]
    lines = []
    if block.get("upper_drop") is not None:
        lines.append(
            f"how sure ({block['images']} images, {level:.0%} confidence): measured drop {block['measured_drop']:+.1%}, "
            f"true drop <= {block['upper_drop']:.1%} (exact bound; the smallest drop {block['images']} images can "
            f"certify is {block['certifiable_drop']:.1%})"
        )
        lines.append(f"  bootstrap {level:.0%} intervals: cascade accuracy {_interval(boot['accuracy'])}, "
                     f"escalation {_interval(boot['escalation'], False)}, MACs saving {_interval(boot['macs_reduction'])}")
    else:
        lines.append(f"how sure ({block['images']} images, unlabelled): bootstrap {level:.0%} intervals: escalation "
                     f"{_interval(boot['escalation'], False)}, MACs saving {_interval(boot['macs_reduction'])}")
    return lines


def describe_agreement(report: dict) -> list[str]:
    """The label-free lines: each source's bound when the choice used several, and the share of answers
    that differ from big's at T (what the live audit checks)."""
    lines = []
    bound = report.get("bound") or {}
    for source in bound.get("sources", []) if len(bound.get("sources", [])) > 1 else []:
        lines.append(f"  {source['name']} ({source['images']}): {source['on']} measured {source['measured']:+.1%}, "
                     f"<= {source['upper']:.1%} at {source['level']:.1%}")
    block = report.get("agreement")
    if block:
        line = (f"answers differing from big's ({block['images']} images): {block['measured']:.1%}, <= {block['upper']:.1%} at "
                f"{block['level']:.0%} (exact bound on the drop against big, not against the truth)")
        if block.get("tolerance") is not None:
            needed = block.get("images_to_certify_tolerance")
            line += (f"; about {needed} unlabelled images would certify <= {block['tolerance']:.1%} at this share" if needed
                     else f"; no number of unlabelled images certifies <= {block['tolerance']:.1%} at this share")
        lines.append(line)
    return lines


def describe(report: dict) -> str:
    acc = report["accuracy"]
    lines = [
        f"chosen T = {report['threshold']:.6f} ({report['criterion']}{'' if report['criterion_met'] else ', NOT met: safest T returned'})",
        f"escalation p = {report['escalation']:.3f}; GMACs per image {report['gmacs']['cascade']:.3f} vs big "
        f"{report['gmacs']['big']:.3f}: {_saving(report['macs_reduction'])}",
    ]
    if acc["cascade"] is not None:
        lines.append(f"accuracy: little {acc['little']:.4f}, big {acc['big']:.4f}, cascade {acc['cascade']:.4f}")
    lines += describe_uncertainty(report["uncertainty"])
    lines += describe_agreement(report)
    if "eval" in report:
        ev = report["eval"]
        if ev["accuracy"]["cascade"] is not None:
            lines.append(
                f"eval set: p = {ev['escalation']:.3f}, accuracy big {ev['accuracy']['big']:.4f} vs cascade "
                f"{ev['accuracy']['cascade']:.4f}, {_saving(ev['macs_reduction'])}"
            )
    if "gears" in report:
        lines.append(gear_ladder.describe(gear_ladder.Ladder.from_dict(report["gears"])))
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    if "applied" in report:
        where = report["applied"]["config"]
        lines.append(
            f"applied T = {report['applied']['threshold']:.6f}"
            + (f" (promise: drop against big <= {report['applied']['promise']:.1%})" if report["applied"].get("promise") is not None else "")
            + " to the running server"
            + (f" and {where}" if where else "; the repository on disk keeps its old T (pass --repo DIR to write it there too)")
        )
    return "\n".join(lines)
