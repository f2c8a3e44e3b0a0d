"""Certification without labels: the accuracy drop against big can never exceed the share of answers
that differ from big's, and that share needs no labels (pure numpy and scipy, no server).

At a threshold T the cascade's answer differs from big's only on rows little keeps (signal >= T) and
answers differently from big; the drop against big, P(little keeps, is wrong, big right) - P(little
keeps, is right, big wrong), is at most P(little keeps and differs from big). An exact Clopper-Pearson
upper bound on that share is therefore an upper bound on the drop against big, not against the truth:
where big is wrong, agreeing with big is no merit. T is chosen as with labels: the cheapest T whose bound
is within the tolerance, by fixed-sequence testing from T = 1 down (thresholds.choose_with_bound).

Several sources of evidence (a labelled set's drop bound, a set's disagreement bound, the live audit)
combine by splitting the error level between them (Bonferroni): at each T the smallest of their bounds,
each at level 1 - (1 - level) / k, bounds the drop at ``level``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

from littlebig.errors import UserError

from . import thresholds as th

LABEL_FREE_METHOD = ("Clopper-Pearson upper bound on the share of answers that differ from big's (a bound on the "
                     "drop against big, not against the truth); fixed-sequence test from T=1 down (Learn-then-Test)")


def cp_upper(k, n, delta):
    """Exact one-sided Clopper-Pearson upper bound at 1 - ``delta`` on a binomial proportion, k of n."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe_n = np.maximum(n, 1.0)
    upper = stats.beta.ppf(1.0 - delta, k + 1.0, np.maximum(safe_n - k, 1.0))
    return np.where(n <= 0, 1.0, np.where(k >= n, 1.0, upper))


def differing(s: th.Sweep, n: int) -> np.ndarray:
    """Rows whose cascade answer differs from big's at each threshold of the sweep (little keeps them and
    answers otherwise)."""
    return np.rint(n * (1.0 - s.agreement)).astype(np.int64)


def disagreement_upper(s: th.Sweep, n: int, delta: float) -> np.ndarray:
    """Upper bound at 1 - ``delta`` on the share of answers that differ from big's, at each T of ``s``
    (0 where little keeps nothing: the cascade is big)."""
    return np.where(s.escalation >= 1.0, 0.0, cp_upper(differing(s, n), n, delta))


@dataclasses.dataclass
class Evidence:
    """One source's upper bounds at each candidate T, at its share of the error level."""

    name: str  # how the report names it
    on: str  # "drop" (labels) or "disagreement" (no labels)
    images: int
    upper: np.ndarray  # per candidate T
    measured: np.ndarray  # the measured drop, or the measured share of differing answers, per T
    level: float  # the level of each bound (1 - its share of the error level)


def choose(s: th.Sweep, evidence: list[Evidence], tolerance: float, level: float, criterion: str) -> th.Choice:
    """The cheapest T (of ``s``'s thresholds) whose smallest bound is within ``tolerance``, by fixed-sequence
    testing from T = 1 down; settled in the middle of its class of thresholds (th.middle_of_class)."""
    bound = np.min([e.upper for e in evidence], axis=0)
    chosen = None
    for index in range(len(s.thresholds) - 1, -1, -1):
        if s.escalation[index] >= 1.0 or bound[index] <= tolerance:
            chosen = index
        else:
            break
    method = LABEL_FREE_METHOD if all(e.on == "disagreement" for e in evidence) else (
        "the smallest of: " + "; ".join(f"{e.name} ({e.on}) at {e.level:.4g}" for e in evidence)
        + f" (Bonferroni over {len(evidence)} sources); fixed-sequence test from T=1 down (Learn-then-Test)")
    block = {"method": method, "level": level, "upper_drop": None, "on": "the drop against big, not against the truth"
             if all(e.on == "disagreement" for e in evidence) else "the drop against big"}
    if chosen is None:
        block["sources"] = sources_at(evidence, len(s.thresholds) - 1)
        return th.Choice(len(s.thresholds) - 1, criterion, False, block)
    chosen = th.middle_of_class(s, chosen)
    kept_nothing = s.escalation[chosen] >= 1.0
    block["upper_drop"] = 0.0 if kept_nothing else float(max(bound[chosen], 0.0))
    block["sources"] = sources_at(evidence, chosen)
    met = bool(not kept_nothing and s.relative_macs[chosen] < 1.0)
    return th.Choice(chosen, criterion, met, block)


def sources_at(evidence: list[Evidence], index: int) -> list[dict]:
    """Each source's bound at one threshold, as the report states it."""
    return [{"name": e.name, "on": e.on, "images": e.images, "level": e.level, "measured": float(e.measured[index]),
             "upper": float(e.upper[index])} for e in evidence]


def images_to_certify(rate: float, tolerance: float, level: float, max_n: int = 10**8) -> int | None:
    """About how many unlabelled images certify a share of differing answers <= ``tolerance`` at ``level``
    if the share stayed at ``rate``; None when the rate is not below the tolerance."""
    if rate >= tolerance:
        return None

    def certifies(n: int) -> bool:
        return bool(cp_upper(np.floor(rate * n), n, 1.0 - level) <= tolerance)

    return th.smallest_count(certifies, max_n)


def certifiable(n: int, level: float) -> float:
    """The smallest share of differing answers ``n`` images can certify at ``level`` (none differing)."""
    return float(cp_upper(0, n, 1.0 - level))


def union(stages: list, more: list, macs: list) -> th.Outcomes:
    """Two sets' probabilities (little's and big's: first and last stage) as one, labels left out."""
    return th.Outcomes.from_probs(np.concatenate([stages[0], more[0]]), np.concatenate([stages[-1], more[-1]]), None,
                                  macs[0], macs[-1])


def certified(s: th.Sweep, outcomes: th.Outcomes, pooled: th.Outcomes | None, criterion,
               tolerance: float | None) -> th.Choice:
    """Certified on what the data holds: with labels (and not --min-agreement) a bound on the drop, and,
    without labels or with more unlabelled images, a bound on the share of answers differing from big's;
    with both, the error level is split between them."""
    if criterion.point_estimate:
        raise UserError("--point-estimate needs labels (or --min-agreement): this data has none")
    drop = outcomes.has_labels and criterion.min_agreement is None
    tolerance = criterion.max_acc_drop if tolerance is None else tolerance
    level = criterion.confidence_level
    each = 1.0 - (1.0 - level) / (int(drop) + 1)  # Bonferroni: the error level split between the sources
    evidence = []
    if drop:
        measured = (outcomes.big_correct.sum() - (s.accuracy * outcomes.n)) / outcomes.n
        evidence.append(Evidence("labelled images", "drop", outcomes.n,
                                 th.drop_upper_bound(s.lost, s.gained, outcomes.n, each), measured, each))
    every = pooled or outcomes
    su = th.sweep(every, s.thresholds)
    name = "images, labels unused" if outcomes.has_labels or pooled is not None else "unlabelled images"
    evidence.append(Evidence(name, "disagreement", every.n, disagreement_upper(su, every.n, 1.0 - each), 1.0 - su.agreement, each))
    name = f"max_acc_drop={tolerance}@{level}" if drop else f"max_disagreement={tolerance:g}@{level}"
    return choose(su, evidence, tolerance, level, name)


def agreement_block(outcomes: th.Outcomes, threshold: float, level: float, tolerance: float | None) -> dict:
    """At the chosen T, the share of answers that differ from big's on this set and its exact bound (no
    labels needed; the live audit checks the same share on live traffic), and how many unlabelled images
    would certify ``tolerance`` at that share."""
    s = th.sweep(outcomes, np.array([threshold]))
    differ = int(differing(s, outcomes.n)[0])
    block = {
        "images": outcomes.n,
        "level": level,
        "differ": differ,
        "measured": differ / outcomes.n,
        "upper": float(disagreement_upper(s, outcomes.n, 1.0 - level)[0]),
        "certifiable": certifiable(outcomes.n, level),
        "bounds": "the drop against big, not against the truth",
    }
    if tolerance is not None:
        block["tolerance"] = tolerance
        block["images_to_certify_tolerance"] = images_to_certify(differ / outcomes.n, tolerance, level)
    return block
