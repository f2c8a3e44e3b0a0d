"""The audit and the label-free certification, simulated from both models' answers on real photos.

Input: bench/audit_probs.py's answers.npz (EfficientNet-Lite0 -> Lite2 on the 500 ImageNet photos, clean
and drifted: blur, dark, noise). Traffic is drawn row by row from those answers (the 500 photos are the
population), so every figure is about the real models' agreement; only the sampling is simulated.

    .venv/bin/python bench/audit_sim.py --answers bench/results/audit/answers.npz --out bench/results/audit

1. Coverage: windows of W rows, each kept row audited with probability r; how often the exact bound
   (client/audit.py exact_upper, and the alert rule's relaxed_upper) is at or above the window's true share
   of answers differing from big's, stationary and across a drift.
2. Drift: the first half of a stream clean, the second drifted; a sliding window of W rows evaluated every
   E rows fires when the bound is above the promise F evaluations in a row (as the Prometheus rule's `for`).
   Rows from the shift to the alert, and alerts in runs without drift.
3. Label-free certification: 40 splits of the 500 photos into halves (as bench/calibration_splits.py), T
   chosen on one half with its labels withheld (certified 2 points on disagreement), checked with the
   labels on the other half; and how tight the bound gets as the unlabelled set grows (resampled).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from littlebig.client import labelfree
from littlebig.client import thresholds as th
from littlebig.client.audit import exact_upper, relaxed_upper

LEVEL, TOLERANCE = 0.95, 0.02


def outcomes(answers, drift: str, rows=None) -> th.Outcomes:
    rows = np.arange(len(answers["labels"])) if rows is None else rows
    little, big, labels = answers[f"{drift}_little_class"][rows], answers[f"{drift}_big_class"][rows], answers["labels"][rows]
    macs = answers["macs"]
    return th.Outcomes(answers[f"{drift}_little_conf"][rows], little == labels, big == labels, little == big, int(macs[0]), int(macs[1]))


def label_free_choice(o: th.Outcomes, tolerance: float = TOLERANCE) -> tuple[float, dict]:
    """T certified on disagreement at ``tolerance`` (labels unused): (T, bound block)."""
    s = th.sweep(th.Outcomes(o.confidence, None, None, o.agree, o.macs_little, o.macs_big))
    evidence = labelfree.Evidence("unlabelled", "disagreement", o.n, labelfree.disagreement_upper(s, o.n, 1 - LEVEL),
                                  1 - s.agreement, LEVEL)
    choice = labelfree.choose(s, [evidence], tolerance, LEVEL, "")
    return float(s.thresholds[choice.index]), {"met": choice.met, **choice.bound}


def differing_share(o: th.Outcomes, t: float) -> float:
    return float(((o.confidence.astype(np.float64) >= t) & ~o.agree).mean())


def drop_share(o: th.Outcomes, t: float) -> float:
    kept = o.confidence.astype(np.float64) >= t
    return float((kept & ~o.little_correct & o.big_correct).mean() - (kept & o.little_correct & ~o.big_correct).mean())


def coverage(q_before: float, q_after: float, rows: int, rate: float, mixes, windows: int, rng) -> dict:
    """Share of windows whose bound covers the window's true share, at each mix (share of drifted rows)."""
    out = {}
    for mix in mixes:
        drifted = int(round(mix * rows))
        m = rng.binomial(rows - drifted, q_before, windows) + rng.binomial(drifted, q_after, windows)  # differing rows
        x = rng.binomial(m, rate)  # of which audited
        exact = np.minimum(labelfree.cp_upper(x, rows, 1 - LEVEL) / rate, 1.0)
        relaxed = np.array([relaxed_upper(v, rows, rate, LEVEL) for v in x])
        assert np.allclose(exact[:20], [exact_upper(v, rows, rate, LEVEL) for v in x[:20]])  # the client's own bound
        true = m / rows
        out[f"{mix:g}"] = {"exact": float((exact >= true).mean()), "alert_rule": float((relaxed >= true).mean()),
                           "mean_true": float(true.mean()), "mean_exact_bound": float(exact.mean())}
    return out


def first_alert(x_prefix, start, rows, rate, promise, every, persist):
    """Row index (window end) of the first alert at or after ``start`` rows, or None."""
    ends = np.arange(max(rows, start), len(x_prefix), every)
    over = labelfree.cp_upper(x_prefix[ends] - x_prefix[ends - rows], rows, 1 - LEVEL) / rate > promise
    run = 0
    for end, is_over in zip(ends, over):
        run = run + 1 if is_over else 0
        if run >= persist:
            return int(end)
    return None


def detection(q_before, q_after, promise, rows, rate, every, persist, length, runs, rng) -> dict:
    """Rows from the shift (at length / 2) to the alert; alerts before it and in runs without drift."""
    shift = length // 2
    delays, early, false_runs, example = [], 0, 0, None
    for _ in range(runs):
        p = np.where(np.arange(length) < shift, q_before, q_after) * rate
        x = np.concatenate([[0], np.cumsum(rng.random(length) < p)])
        fired = first_alert(x, rows, rows, rate, promise, every, persist)
        if example is None:  # one run's sliding bound, for the plot
            ends = np.arange(rows, length + 1, every)
            example = {"ends": ends.tolist(), "upper": (labelfree.cp_upper(x[ends] - x[ends - rows], rows, 1 - LEVEL) / rate).tolist(),
                       "shift": shift, "fired": fired}
        if fired is not None and fired < shift:
            early += 1
        elif fired is not None:
            delays.append(fired - shift)
        quiet = np.concatenate([[0], np.cumsum(rng.random(length) < q_before * rate)])
        false_runs += first_alert(quiet, rows, rows, rate, promise, every, persist) is not None
    return {"runs": runs, "alerts_before_shift": early, "no_drift_runs_with_alert": false_runs,
            "detected": len(delays), "delay_rows_median": float(np.median(delays)) if delays else None,
            "delay_rows_p95": float(np.percentile(delays, 95)) if delays else None, "example": example}


def splits(answers, count_random: int, rng) -> dict:
    """T certified without labels on one half, checked with labels on the other."""
    labels = answers["labels"]
    even = (labels // 2) % 2 == 0
    pairs = [(np.flatnonzero(even), np.flatnonzero(~even)), (np.flatnonzero(~even), np.flatnonzero(even))]
    for _ in range(count_random):
        order = rng.permutation(len(labels))
        pairs.append((order[: len(labels) // 2], order[len(labels) // 2:]))
    rows = []
    for calib, held in pairs:
        t, bound = label_free_choice(outcomes(answers, "clean", calib))
        other = outcomes(answers, "clean", held)
        rows.append({"threshold": t, "met": bound["met"], "stated_bound": bound["upper_drop"],
                     "held_drop": drop_share(other, t), "held_differing": differing_share(other, t),
                     "held_macs_reduction": float(1 - th.evaluate_at(other, t)["gmacs"]["cascade"] * 1e9 / other.macs_big)})
    return {"splits": len(rows), "promise_held": sum(r["held_drop"] <= TOLERANCE for r in rows),
            "differing_within_tolerance": sum(r["held_differing"] <= TOLERANCE for r in rows),
            "mean_macs_reduction": float(np.mean([r["held_macs_reduction"] for r in rows])), "rows": rows}


def tightness(answers, sizes, repeats, fixed_t, rng) -> list[dict]:
    """The certified T, its bound and its saving as the unlabelled set grows (resampled from the 500), and the
    bound at one fixed T (``fixed_t``), which tends to the true share as the set grows."""
    full = outcomes(answers, "clean")
    out = []
    for n in sizes:
        samples = [outcomes(answers, "clean", rng.integers(0, full.n, n)) for _ in range(repeats)]
        picks = [label_free_choice(o) for o in samples]
        fixed = [float(labelfree.cp_upper(round(differing_share(o, fixed_t) * n), n, 1 - LEVEL)) for o in samples]
        ts = np.array([t for t, _ in picks])
        out.append({"images": n, "certified_share": float(np.mean([b["met"] for _, b in picks])),
                    "threshold_median": float(np.median(ts)),
                    "bound_median": float(np.median([b["upper_drop"] if b["upper_drop"] is not None else np.nan for _, b in picks])),
                    "macs_reduction_on_all_500": float(np.median([1 - (full.macs_little + (1 - (full.confidence >= t).mean())
                                                                      * full.macs_big) / full.macs_big for t in ts])),
                    "bound_at_fixed_T_median": float(np.median(fixed)), "fixed_T": fixed_t,
                    "true_share_at_fixed_T": differing_share(full, fixed_t),
                    "smallest_certifiable": labelfree.certifiable(n, LEVEL)})
    return out


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["tightness"]
    sizes = [r["images"] for r in rows]
    left.semilogx(sizes, [r["bound_median"] for r in rows], "o-", label="bound at the certified T (median)")
    left.semilogx(sizes, [r["bound_at_fixed_T_median"] for r in rows], "s-", label=f"bound at fixed T = {rows[0]['fixed_T']:.2f} (median)")
    left.axhline(rows[0]["true_share_at_fixed_T"], color="C1", lw=0.8, ls=":", label="true share at that T (the 500)")
    left.semilogx(sizes, [r["smallest_certifiable"] for r in rows], "--", label="smallest certifiable share")
    left.axhline(TOLERANCE, color="grey", lw=0.8, label="tolerance 2 points")
    left.set_xlabel("unlabelled images"), left.set_ylabel("share of answers differing from big's")
    left.legend(fontsize=8), left.set_title("Label-free bound vs set size (Lite0 -> Lite2)")
    right.semilogx(sizes, [r["macs_reduction_on_all_500"] for r in rows], "o-")
    right.set_xlabel("unlabelled images"), right.set_ylabel("MACs saving at the certified T")
    right.set_title("What the certified T saves")
    fig.tight_layout()
    fig.savefig(out / "labelfree_tightness.png", dpi=120)
    plt.close(fig)
    cases = [(name, key, drift, run) for name, case in result["cases"].items() for key, by in case["detection"].items()
             if key.startswith("rate 0.01") for drift, run in by.items()]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6), squeeze=False)
    for ax, (name, key, drift, run) in zip(axes[0], cases):
        example, promise = run["example"], result["cases"][name]["promise"]
        ax.plot(np.array(example["ends"]) / 1e3, example["upper"], lw=1, label="bound over the last window")
        ax.axhline(promise, color="grey", lw=0.8, label=f"promise {promise:.1%}")
        ax.axvline(example["shift"] / 1e3, color="C3", ls=":", label=f"shift to {drift}")
        if example["fired"] is not None:
            ax.axvline(example["fired"] / 1e3, color="C3", lw=1.5, label="alert")
        ax.set(xlabel="rows (thousands)", ylabel="share differing from big", title=f"{name}, {key}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "drift_example.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    answers = dict(np.load(args.answers))
    clean = outcomes(answers, "clean")
    t_free, bound = label_free_choice(clean)
    result = {"label_free_T": t_free, "label_free_bound": bound, "cases": {}}
    drifts = ("blur", "dark", "noise")
    # Two served states: T certified without labels (promise = the tolerance), and the labelled default T = 0.36
    # (promise = the disagreement bound calibration states at that T, report.json "agreement").
    t_lab = 0.359771
    lab_promise = float(labelfree.cp_upper(round(differing_share(clean, t_lab) * clean.n), clean.n, 1 - LEVEL))
    for name, t, promise in (("label-free T", t_free, TOLERANCE), ("labelled T=0.36", t_lab, lab_promise)):
        q = {d: differing_share(outcomes(answers, d), t) for d in ("clean", *drifts)}
        case = {"threshold": t, "promise": promise, "differing": q, "drop": {d: drop_share(outcomes(answers, d), t) for d in q},
                "escalation": {d: float((outcomes(answers, d).confidence < t).mean()) for d in q}, "coverage": {}, "detection": {}}
        # Windows holding about 5,000 audited rows: enough that the bound stays below the promise without drift
        # over a whole run of evaluations (an alert judges every 1% of a window; 4,000 rows fired falsely).
        for rate, rows in ((0.01, 500_000), (0.1, 50_000)):
            key = f"rate {rate:g}, window {rows} rows"
            case["coverage"][key] = {d: coverage(q["clean"], q[d], rows, rate, (0, 0.5, 1), 4000, rng) for d in drifts}
            case["detection"][key] = {d: detection(q["clean"], q[d], promise, rows, rate, rows // 100, 5, 8 * rows, args.runs, rng)
                                      for d in drifts if q[d] > promise}
        result["cases"][name] = case
        print(name, json.dumps({k: case[k] for k in ("threshold", "promise", "differing", "drop")}), flush=True)
        print("  detection", json.dumps(case["detection"]), flush=True)
    result["splits"] = splits(answers, 38, rng)
    print("splits", {k: v for k, v in result["splits"].items() if k != "rows"}, flush=True)
    result["tightness"] = tightness(answers, (100, 250, 500, 1000, 2000, 5000, 10_000, 50_000), 40, t_free, rng)
    for row in result["tightness"]:
        print("tightness", row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(out, result)


if __name__ == "__main__":
    main()
