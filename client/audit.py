"""The live audit read from the gate's metrics (model_repository/gate/audit.py): the share of answers
that differ from big's, with an exact bound, and the audit's counts by signal bin, from which a new T is
chosen on the live distribution (`littlebig calibrate --from-audit`).

The bound. In the rows of covered batches (N), each row little answered was audited with probability r
(audit_rate); X audited rows differ from big. X is binomial(N, r q), q the share of answers that differ
from big's, so CP(X, N) / r is an exact upper bound on q (CP: the Clopper-Pearson upper bound on a
binomial proportion). q bounds the drop in accuracy against big; it says nothing about big's own
mistakes. A window is the difference of two readings of the counters (rows, or time between them).

Prometheus has no beta quantile, so the alert rule uses (X + l + sqrt(2 l X + l^2)) / (r N), l = ln(1 /
(1 - level)), a Chernoff bound that is never below the exact one (``relaxed_upper``): it covers at least
as often and fires somewhat later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from littlebig.contract import GATE_STEP_MODEL
from littlebig.errors import UserError
from littlebig.gate.audit import FLUSH_S
from littlebig.gate.config import AUDIT_BINS, bin_label

from . import labelfree
from .metrics import read_samples

BINNED = {"kept_rows": "littlebig_audit_kept_rows_total", "kept_differ": "littlebig_audit_kept_differ_total",
          "escalated_rows": "littlebig_audit_escalated_rows_total", "escalated_differ": "littlebig_audit_escalated_differ_total"}
TOTALS = {"covered": "littlebig_audit_covered_rows_total", "audited": "littlebig_audit_rows_total",
          "disagree": "littlebig_audit_disagree_rows_total"}


@dataclasses.dataclass
class Snapshot:
    """The audit's counters at one time (or their difference over a window), summed over gate instances."""

    rate: float
    promise: float
    covered: float
    audited: float
    disagree: float
    skipped: dict  # reason -> rows
    bins: dict  # BINNED key -> float [AUDIT_BINS]
    taken_at: float = 0.0  # time.time() of the reading
    seconds: float = 0.0  # the window's length (0: since the gate loaded)
    threshold: float | None = None  # the served T, when known (saved snapshots carry it)
    macs: list = dataclasses.field(default_factory=list)  # the stages' MACs per row, when known

    @classmethod
    def from_samples(cls, samples, model: str = GATE_STEP_MODEL) -> "Snapshot":
        mine = [(name, labels, value) for name, labels, value in samples if labels.get("model") == model]
        gauges = {name: value for name, _, value in mine if name in ("littlebig_audit_rate", "littlebig_audit_promise")}
        if "littlebig_audit_rate" not in gauges:
            raise UserError(f"the gate model {model!r} exports no audit metrics: its audit is off (build the repository "
                            "with --audit-rate, e.g. 0.01)")
        index = {bin_label(k): k for k in range(AUDIT_BINS)}
        bins = {key: np.zeros(AUDIT_BINS) for key in BINNED}
        totals, skipped = dict.fromkeys(TOTALS, 0.0), {}
        for name, labels, value in mine:
            for key, family in BINNED.items():
                if name == family:
                    bins[key][index[labels["bin"]]] += value
            for key, family in TOTALS.items():
                if name == family:
                    totals[key] += value
            if name == "littlebig_audit_skipped_rows_total":
                skipped[labels["reason"]] = skipped.get(labels["reason"], 0.0) + value
        return cls(gauges["littlebig_audit_rate"], gauges.get("littlebig_audit_promise", 0.0), skipped=skipped, bins=bins,
                   taken_at=time.time(), **totals)

    def minus(self, earlier: "Snapshot") -> "Snapshot":
        """The window between ``earlier`` and this reading; since the gate loaded when it reloaded in between
        (a counter went down: a new gate starts from zero)."""
        if self.covered < earlier.covered or self.audited < earlier.audited or self.rate != earlier.rate:
            return self
        return dataclasses.replace(
            self, covered=self.covered - earlier.covered, audited=self.audited - earlier.audited,
            disagree=self.disagree - earlier.disagree, seconds=self.taken_at - earlier.taken_at,
            skipped={k: v - earlier.skipped.get(k, 0.0) for k, v in self.skipped.items()},
            bins={k: v - earlier.bins[k] for k, v in self.bins.items()},
        )

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "bins": {k: v.tolist() for k, v in self.bins.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Snapshot":
        return cls(**{**data, "bins": {k: np.asarray(v, dtype=np.float64) for k, v in data["bins"].items()}})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Snapshot":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not an audit snapshot (`littlebig audit --save FILE` writes one): {err}") from None


def read_snapshot(metrics_url: str, model: str = GATE_STEP_MODEL, settle: bool = True) -> Snapshot:
    """The audit's counters as the server's /metrics shows them (``settle``: after the gate's hand-over of
    the audit calls just answered, which it makes every FLUSH_S)."""
    if settle:
        time.sleep(2.0 * FLUSH_S)
    return Snapshot.from_samples(read_samples(metrics_url, "littlebig_audit"), model)


def exact_upper(disagree: float, covered: float, rate: float, level: float) -> float:
    """Exact upper bound at ``level`` on the share of answers that differ from big's: CP(X, N) / r."""
    if covered <= 0 or rate <= 0:
        return 1.0
    return float(min(labelfree.cp_upper(round(disagree), round(covered), 1.0 - level) / rate, 1.0))


def relaxed_upper(disagree: float, covered: float, rate: float, level: float) -> float:
    """The alert rule's bound (Chernoff, never below exact_upper): (X + l + sqrt(2 l X + l^2)) / (r N)."""
    if covered <= 0 or rate <= 0:
        return 1.0
    ell = math.log(1.0 / (1.0 - level))
    return min((disagree + ell + math.sqrt(2.0 * ell * disagree + ell * ell)) / (rate * covered), 1.0)


def live_bound(snapshot: Snapshot, level: float = 0.95) -> dict:
    """The live estimate and exact bound of the share of answers that differ from big's, and the verdict."""
    expected = snapshot.rate * snapshot.covered  # audited rows expected if little answered every row
    estimate = snapshot.disagree / expected if expected else None
    upper = exact_upper(snapshot.disagree, snapshot.covered, snapshot.rate, level)
    promise = snapshot.promise or None
    return {
        "rate": snapshot.rate, "covered": snapshot.covered, "audited": snapshot.audited, "disagree": snapshot.disagree,
        "skipped": snapshot.skipped, "seconds": snapshot.seconds, "level": level, "estimate": estimate, "upper": upper,
        "alert_upper": relaxed_upper(snapshot.disagree, snapshot.covered, snapshot.rate, level),
        "promise": promise, "holds": None if promise is None else upper <= promise,
        "smallest_bound": exact_upper(0, snapshot.covered, snapshot.rate, level),
    }


def describe_live(block: dict, threshold: float | None = None) -> str:
    where = f"over the last {block['seconds']:.0f} s" if block["seconds"] else "since the gate loaded"
    skipped = sum(block["skipped"].values())
    lines = [
        f"audit {where}" + (f" (T = {threshold:.6f}" if threshold is not None else " (") + f", audit rate {block['rate']:.2%}): "
        f"{block['covered']:.0f} rows covered ({skipped:.0f} skipped: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(block["skipped"].items())) + f"); {block['audited']:.0f} audited, "
        f"{block['disagree']:.0f} differ from big's answer",
    ]
    if block["estimate"] is None:
        lines.append("  no rows covered yet: nothing to bound")
        return "\n".join(lines)
    lines.append(f"  answers differing from big's: {block['estimate']:.2%} (estimate), <= {block['upper']:.2%} at "
                 f"{block['level']:.0%} (exact bound; the alert rule's bound {block['alert_upper']:.2%}); a bound on the "
                 "drop against big, not against the truth")
    level = f"the calibrated level {block['promise']:.2%}" if block["promise"] is not None else ""
    if block["promise"] is None:
        lines.append("  no calibrated level to check against (calibrate --apply sets the gate's audit_promise)")
    elif block["holds"]:
        lines.append(f"  within {level}: HOLDS (the drop against big is at most the bound)")
    elif block["smallest_bound"] > block["promise"]:
        lines.append(f"  {level}: not yet confirmed: these {block['covered']:.0f} rows cannot bound below "
                     f"{block['smallest_bound']:.2%} (wait for more traffic, or a larger window)")
    else:
        lines.append(f"  above {level}: NOT CONFIRMED (the traffic may have drifted from calibration; differing from big is "
                     "not always wrong): recalibrate with --from-audit or labels")
    return "\n".join(lines)
