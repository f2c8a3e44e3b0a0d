"""`littlebig calibrate --from-audit`: choose T again on the live distribution the audit recorded.

The audit counts, by little's signal bin (client/audit.py), every escalated row of the covered batches
and whether little's class differs from big's there (all of them: big answered them anyway), and the
audited rows little answered and whether they differ (each row with probability r). At a candidate T'
(a bin edge) the share of answers that would differ from big's is the share of rows with signal >= T'
that differ; its two parts are bounded apart, each at half the error level (Bonferroni):

  escalated rows with signal >= T' that differ: C of N rows, exact bound CP(C, N);
  audited rows with signal >= T' that differ: X, binomial(N, r q'), exact bound CP(X, N) / r.

T is the cheapest T' whose summed bound is within the tolerance, tested from T' = 1 down (fixed
sequence), as calibration on images. Like every label-free bound it bounds the drop against big, not
against the truth. The escalation share at T' is estimated the same way (rows below T': the escalated
ones, plus the audited ones weighted by 1 / r).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from littlebig.errors import UserError
from littlebig.gate.config import AUDIT_BINS

from . import labelfree
from . import thresholds as th
from .audit import Snapshot, read_snapshot
from .criterion import Criterion
from .report import write_json


def _suffix(values: np.ndarray) -> np.ndarray:
    """Sums over the bins at or above each edge j = 0 .. AUDIT_BINS (the last: none)."""
    return np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])


def audit_sweep(snapshot: Snapshot, macs: tuple[int, int]) -> tuple[th.Sweep, np.ndarray, np.ndarray]:
    """The cascade at every bin edge T' = j / AUDIT_BINS as the audit estimates it: (sweep, C, X), C and X the
    escalated and audited rows with signal >= T' that differ from big."""
    n, rate = snapshot.covered, snapshot.rate
    bins = snapshot.bins
    escalated_differ, kept_differ = _suffix(bins["escalated_differ"]), _suffix(bins["kept_differ"])
    kept_at = _suffix(bins["escalated_rows"]) + _suffix(bins["kept_rows"]) / rate
    escalation = np.clip(1.0 - kept_at / n, 0.0, 1.0)
    escalation[-1] = 1.0  # T' = 1: little keeps nothing (bin 99 holds the signals of 1.0 too)
    measured = (escalated_differ + kept_differ / rate) / n
    gmacs = (macs[0] + escalation * macs[1]) / 1e9
    zeros = np.zeros(AUDIT_BINS + 1)
    sweep = th.Sweep(thresholds=np.arange(AUDIT_BINS + 1) / AUDIT_BINS, escalation=escalation, accuracy=None,
                     agreement=1.0 - measured, lost=zeros, gained=zeros, gmacs=gmacs, relative_macs=gmacs * 1e9 / macs[1])
    return sweep, escalated_differ, kept_differ


def audit_evidence(snapshot: Snapshot, macs: tuple[int, int], level: float) -> tuple[th.Sweep, labelfree.Evidence]:
    """The sweep over the bin edges and the audit's bound at each, at ``level``."""
    if snapshot.covered < 1:
        raise UserError("the audit has covered no rows yet: serve traffic with the audit on first")
    sweep, escalated, kept = audit_sweep(snapshot, macs)
    delta = (1.0 - level) / 2.0
    upper = labelfree.cp_upper(np.rint(escalated), round(snapshot.covered), delta) + \
        labelfree.cp_upper(np.rint(kept), round(snapshot.covered), delta) / snapshot.rate
    upper = np.where(sweep.escalation >= 1.0, 0.0, np.minimum(upper, 1.0))
    return sweep, labelfree.Evidence("live audit", "disagreement", int(snapshot.covered), upper, 1.0 - sweep.agreement, level)


def choose_from_audit(snapshot: Snapshot, macs: tuple[int, int], criterion: Criterion) -> dict:
    """The report of T chosen on the audit (no server needed)."""
    criterion.validate()
    tolerance = criterion.disagreement_tolerance(has_labels=False)
    if tolerance is None:
        raise UserError("--from-audit certifies a bound on disagreement with big: use the default criterion (--max-acc-drop) "
                        "or --min-agreement, without --point-estimate or --target-escalation")
    level = criterion.confidence_level
    sweep, evidence = audit_evidence(snapshot, macs, level)
    choice = labelfree.choose(sweep, [evidence], tolerance, level, f"max_disagreement={tolerance:g}@{level}")
    point = sweep.at(choice.index)
    return {
        "source": "audit",
        "threshold": point["threshold"],
        "escalation": point["escalation"],
        "gmacs": {"little": macs[0] / 1e9, "big": macs[1] / 1e9, "cascade": point["gmacs"]},
        "macs_reduction": 1.0 - point["relative_macs"],
        "criterion": choice.criterion,
        "criterion_met": choice.met,
        "bound": choice.bound,
        "promise": criterion.promise,
        "audit": {"rate": snapshot.rate, "covered": snapshot.covered, "audited": snapshot.audited,
                  "served_threshold": snapshot.threshold, "seconds": snapshot.seconds},
        "certifiable": float(labelfree.cp_upper(0, round(snapshot.covered), (1 - level) / 2) * (1 + 1 / snapshot.rate)),
    }


def describe(report: dict) -> str:
    audit, bound = report["audit"], report["bound"]
    lines = [
        f"from the audit: {audit['covered']:.0f} rows covered, {audit['audited']:.0f} audited at rate {audit['rate']:.2%}"
        + (f", served T = {audit['served_threshold']:.6f}" if audit.get("served_threshold") is not None else ""),
        f"chosen T = {report['threshold']:.6f} ({report['criterion']}{'' if report['criterion_met'] else ', NOT met: safest T returned'})",
        f"escalation p = {report['escalation']:.3f} (estimated); GMACs per image {report['gmacs']['cascade']:.3f} vs big "
        f"{report['gmacs']['big']:.3f}",
    ]
    if bound.get("upper_drop") is not None:
        source = bound["sources"][0]
        lines.append(f"answers differing from big's at T: {source['measured']:.2%} (estimate), <= {bound['upper_drop']:.2%} at "
                     f"{bound['level']:.0%}: a bound on the drop against big, not against the truth")
    if not report["criterion_met"]:
        lines.append(f"WARNING: the audit cannot certify this tolerance: its smallest bound is about {report['certifiable']:.2%}; "
                     "wait for more audited traffic or raise --audit-rate")
    if "applied" in report:
        lines.append(f"applied T = {report['applied']['threshold']:.6f} to the running server"
                     + (f" and {report['applied']['config']}" if report["applied"]["config"] else ""))
    return "\n".join(lines)


def calibrate_from_audit(url: str, out: str | Path, criterion: Criterion = Criterion(), *, source: str | None = None,
                         metrics_url: str | None = None, apply: bool = False, write=None, log=print) -> dict:
    """Choose T on the audit: ``source`` a snapshot file (`littlebig audit --save`), else the served gate's
    metrics (``metrics_url``); ``apply``/``write`` as `calibrate`."""
    from .calibrate import apply_choice
    from .infer import LittleBigClient

    if write is not None and not apply:
        raise UserError("T is written into a repository (--repo) only when it is applied: add --apply")
    if source is not None:
        snapshot = Snapshot.load(source)
    else:
        snapshot = read_snapshot(metrics_url)
        with LittleBigClient(url) as client:
            config = client.gate_config()
        snapshot.threshold, snapshot.macs = config.thresholds[0], list(config.stage_macs)
    if len(snapshot.macs) != 2:
        raise UserError("the audit snapshot does not say the stages' MACs: save it with `littlebig audit --save`")
    report = choose_from_audit(snapshot, tuple(snapshot.macs), criterion)
    if apply:
        if not report["criterion_met"]:
            raise UserError("nothing certified: not applying a T that sends every row to big (" + describe(report).splitlines()[-1] + ")")
        report["applied"] = apply_choice(url, report["threshold"], write, None, criterion.promise)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    log(describe(report))
    return report
