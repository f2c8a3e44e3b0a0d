"""Threshold analysis for a Little-Big pair (paper Section 4.2): pure numpy, no server.

Inputs are both models' probabilities on the same images (and labels where known). For every
candidate T the cascade escalates the rows with little's confidence < T (Eq. 4); its cost per image is
MACs_little + p(T) * MACs_big (Eq. 5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from scipy import stats

from littlebig.errors import UserError

GRID_POINTS = 50


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """Per-image facts the sweep needs, derived once from both models' probabilities."""

    confidence: np.ndarray  # little's max prob, float32 as served
    little_correct: np.ndarray | None  # bool, None without labels
    big_correct: np.ndarray | None
    agree: np.ndarray  # little's class == big's class
    macs_little: int
    macs_big: int

    @classmethod
    def from_probs(cls, little: np.ndarray, big: np.ndarray, labels: np.ndarray | None, macs_little: int, macs_big: int) -> "Outcomes":
        if little.shape != big.shape or little.ndim != 2:
            raise UserError(f"little and big probabilities must both be [N, C], got {little.shape} and {big.shape}")
        if labels is not None and len(labels) != len(little):
            raise UserError(f"{len(labels)} labels for {len(little)} images")
        check_finite(little=little, big=big)
        little_class, big_class = little.argmax(1), big.argmax(1)
        return cls(
            confidence=little.max(1),
            little_correct=None if labels is None else little_class == labels,
            big_correct=None if labels is None else big_class == labels,
            agree=little_class == big_class,
            macs_little=int(macs_little),
            macs_big=int(macs_big),
        )

    @property
    def n(self) -> int:
        return len(self.confidence)

    @property
    def has_labels(self) -> bool:
        return self.little_correct is not None


def check_finite(**probabilities: np.ndarray) -> None:
    """NaN or inf probabilities (a broken export, fp16 overflow) would give a NaN threshold."""
    for name, values in probabilities.items():
        bad = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
        if bad.any():
            raise UserError(f"{name}'s probabilities are not finite (NaN or inf) on {int(bad.sum())} of {len(values)} "
                             f"rows (first: row {int(np.flatnonzero(bad)[0])}): check the model's export")


def candidate_thresholds(confidence: np.ndarray, grid_points: int = GRID_POINTS) -> np.ndarray:
    """The grid (evenly spaced in [0, 1]), every distinct confidence, and the midpoints between
    neighbouring ones. The escalated set only changes when T passes a confidence value, so the exact
    optimum is among these; the midpoints are where a choice is settled (see ``middle_of_class``)."""
    grid = np.linspace(0.0, 1.0, grid_points)
    values = np.unique(confidence.astype(np.float64))
    edges = np.concatenate([[0.0], values, [1.0]])
    midpoints = (edges[:-1] + edges[1:]) / 2.0
    return np.unique(np.concatenate([grid, values, midpoints]))


@dataclasses.dataclass
class Sweep:
    """The cascade at each threshold, all arrays aligned with ``thresholds``."""

    thresholds: np.ndarray
    escalation: np.ndarray  # p(T)
    accuracy: np.ndarray | None  # cascade accuracy
    agreement: np.ndarray  # share of cascade answers equal to big's answer
    lost: np.ndarray  # images big gets right and the cascade (little) gets wrong
    gained: np.ndarray  # images the cascade (little) gets right and big gets wrong
    gmacs: np.ndarray  # expected GMACs per image
    relative_macs: np.ndarray  # against big alone

    def at(self, index: int) -> dict:
        return {
            "threshold": float(self.thresholds[index]),
            "escalation": float(self.escalation[index]),
            "accuracy": None if self.accuracy is None else float(self.accuracy[index]),
            "agreement": float(self.agreement[index]),
            "gmacs": float(self.gmacs[index]),
            "relative_macs": float(self.relative_macs[index]),
        }


def sweep(outcomes: Outcomes, thresholds: np.ndarray | None = None) -> Sweep:
    """Evaluate the cascade at every threshold in O((N + T) log N) with prefix sums over sorted confidence."""
    if thresholds is None:
        thresholds = candidate_thresholds(outcomes.confidence)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(outcomes.confidence, kind="stable")
    conf_sorted = outcomes.confidence[order].astype(np.float64)
    # Rows escalated at T are the first k of the sorted order, k = #(confidence < T).
    k = np.searchsorted(conf_sorted, thresholds, side="left")
    n = outcomes.n

    def kept_by_little(values: np.ndarray) -> np.ndarray:
        """Sum of ``values`` over rows little keeps (confidence >= T), for each T."""
        prefix = np.concatenate([[0], np.cumsum(values[order])])
        return prefix[-1] - prefix[k]

    escalation = k / n
    agreement = (k + kept_by_little(outcomes.agree.astype(np.int64))) / n
    accuracy = lost = gained = None
    if outcomes.has_labels:
        lc, bc = outcomes.little_correct.astype(np.int64), outcomes.big_correct.astype(np.int64)
        lost = kept_by_little(bc * (1 - lc))
        gained = kept_by_little(lc * (1 - bc))
        accuracy = (bc.sum() - lost + gained) / n
    gmacs = (outcomes.macs_little + escalation * outcomes.macs_big) / 1e9
    return Sweep(
        thresholds=thresholds,
        escalation=escalation,
        accuracy=accuracy,
        agreement=agreement,
        lost=lost if lost is not None else np.zeros_like(k),
        gained=gained if gained is not None else np.zeros_like(k),
        gmacs=gmacs,
        relative_macs=gmacs * 1e9 / outcomes.macs_big,
    )


def drop_upper_bound(lost: np.ndarray, gained: np.ndarray, n: int, level: float) -> np.ndarray:
    """One-sided upper confidence bound on the accuracy drop against big, at ``level``.

    The drop is P(lost) - P(gained), where a row is *lost* if little keeps it and gets it wrong while
    big gets it right, and *gained* the other way round. Exact Clopper-Pearson bounds on both
    binomial proportions, each at (1 - level) / 2 (Bonferroni): UCB(lost) - LCB(gained).
    """
    delta = (1.0 - level) / 2.0
    lost, gained = np.asarray(lost), np.asarray(gained)
    upper_lost = np.where(lost >= n, 1.0, stats.beta.ppf(1.0 - delta, lost + 1, np.maximum(n - lost, 1)))
    lower_gained = np.where(gained <= 0, 0.0, stats.beta.ppf(delta, np.maximum(gained, 1), n - gained + 1))
    return upper_lost - lower_gained


def middle_of_class(s: Sweep, index: int) -> int:
    """The threshold halfway between the confidences that bound ``s.thresholds[index]``'s class.

    Every T in (c_escalated_max, c_kept_min] escalates the same calibration images, so any of them
    is "the" optimum. The middle is the pick least sensitive to float noise (a served confidence a
    few ulps off does not change the route) and to small shifts in unseen data.
    """
    same = np.flatnonzero(s.escalation == s.escalation[index])
    low = s.thresholds[same[0] - 1] if same[0] > 0 else 0.0
    high = s.thresholds[same[-1]]
    return int(same[np.argmin(np.abs(s.thresholds[same] - (low + high) / 2.0))])


@dataclasses.dataclass
class Choice:
    index: int  # into the sweep
    criterion: str
    met: bool  # False: no threshold met the criterion; the safest one (escalate most) is returned
    bound: dict | None = None


def choose_max_acc_drop(s: Sweep, big_accuracy: float, max_drop: float) -> Choice:
    """The cheapest T whose accuracy is >= big's - max_drop (paper: max_drop = 0)."""
    if s.accuracy is None:
        raise UserError("--max-acc-drop needs labels")
    # Small tolerance: accuracies are ratios of integers; compare counts, not float noise.
    ok = np.flatnonzero(s.accuracy >= big_accuracy - max_drop - 1e-12)
    if len(ok):
        return Choice(middle_of_class(s, int(ok[0])), f"max_acc_drop={max_drop}", True)
    return Choice(len(s.thresholds) - 1, f"max_acc_drop={max_drop}", False)


def choose_target_escalation(s: Sweep, confidence: np.ndarray, share: float) -> Choice:
    """Label-free: T = the ``share``-quantile of little's confidence, so about that share goes to big."""
    if not 0.0 <= share <= 1.0:
        raise UserError(f"target escalation must be in [0, 1], got {share}")
    target = escalation_quantile(confidence, share)
    index = min(int(np.searchsorted(s.thresholds, target, side="left")), len(s.thresholds) - 1)
    return Choice(middle_of_class(s, index), f"target_escalation={share}", True)


def escalation_quantile(confidence: np.ndarray, share: float) -> float:
    """The T at which at least ``share`` of rows have confidence < T: the m-th smallest value with m =
    ceil(share * n) (less a hair, so 0.07 * 100 is 7 rows, not 8); 1.0 when that is every row."""
    if share <= 0.0:
        return 0.0
    m = math.ceil(share * len(confidence) - 1e-9)
    return 1.0 if m >= len(confidence) else float(np.sort(confidence.astype(np.float64))[m])


def choose_min_agreement(s: Sweep, min_agreement: float) -> Choice:
    """Label-free: the cheapest T whose answers agree with big's on >= min_agreement of images."""
    ok = np.flatnonzero(s.agreement >= min_agreement - 1e-12)
    if len(ok):
        return Choice(middle_of_class(s, int(ok[0])), f"min_agreement={min_agreement}", True)
    return Choice(len(s.thresholds) - 1, f"min_agreement={min_agreement}", False)


def choose_with_bound(s: Sweep, n: int, max_drop: float, level: float) -> Choice:
    """The cheapest T whose upper bound on the accuracy drop is <= max_drop, found by fixed-sequence
    testing from T = 1 downwards (Learn-then-Test): stop at the first T that fails, so the guarantee
    P(drop(chosen T) > max_drop) <= 1 - level holds despite choosing among many thresholds."""
    if s.accuracy is None:
        raise UserError("--confidence-level needs labels")
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must be in (0, 1), got {level}")
    upper = drop_upper_bound(s.lost, s.gained, n, level)
    chosen = None
    for index in range(len(s.thresholds) - 1, -1, -1):
        # At a T above every confidence nothing is kept by little: the cascade is big, drop 0.
        if s.escalation[index] >= 1.0 or upper[index] <= max_drop:
            chosen = index
        else:
            break
    bound = {
        "method": "Clopper-Pearson upper bound on P(lost) minus lower bound on P(gained), Bonferroni "
        "split; fixed-sequence test from T=1 down (Learn-then-Test)",
        "level": level,
        "upper_drop": None,
    }
    if chosen is None:
        return Choice(len(s.thresholds) - 1, f"max_acc_drop={max_drop}@{level}", False, bound)
    chosen = middle_of_class(s, chosen)
    bound["upper_drop"] = float(max(upper[chosen], 0.0) if s.escalation[chosen] < 1.0 else 0.0)
    # Escalating every image is always "safe" but is big alone at extra cost: nothing was certified;
    # neither is a T that costs more than big alone (as kstage.choose_with_bound).
    met = bool(s.escalation[chosen] < 1.0 and s.relative_macs[chosen] < 1.0)
    return Choice(chosen, f"max_acc_drop={max_drop}@{level}", met, bound)


def summary(s: Sweep, outcomes: Outcomes, index: int) -> dict:
    """The report block for one threshold."""
    little_acc = big_acc = None
    if outcomes.has_labels:
        little_acc = float(outcomes.little_correct.mean())
        big_acc = float(outcomes.big_correct.mean())
    point = s.at(index)
    return {
        "threshold": point["threshold"],
        "escalation": point["escalation"],
        "images": outcomes.n,
        "accuracy": {"little": little_acc, "big": big_acc, "cascade": point["accuracy"]},
        "agreement_with_big": point["agreement"],
        "gmacs": {
            "little": outcomes.macs_little / 1e9,
            "big": outcomes.macs_big / 1e9,
            "cascade": point["gmacs"],
        },
        "macs_reduction": 1.0 - point["relative_macs"],
    }


def evaluate_at(outcomes: Outcomes, threshold: float) -> dict:
    """The report block for a fixed T on another set (the paper's generalisation check)."""
    s = sweep(outcomes, np.array([threshold]))
    return summary(s, outcomes, 0)


def corrected_mistakes(outcomes: Outcomes) -> dict:
    """Paper Section 3: little's mistakes that big corrects are the ones little is unsure of.
    Mean confidence of those against all other images."""
    if not outcomes.has_labels:
        raise UserError("needs labels")
    corrected = ~outcomes.little_correct & outcomes.big_correct
    rest = ~corrected
    return {
        "corrected_by_big": int(corrected.sum()),
        "mean_confidence_corrected": float(outcomes.confidence[corrected].mean()) if corrected.any() else None,
        "mean_confidence_rest": float(outcomes.confidence[rest].mean()) if rest.any() else None,
    }


def certifiable_drop(n: int, level: float) -> float:
    """The smallest drop bound ``n`` images can state at ``level``: the bound when little keeps
    rows and loses none of them. No tolerance below it can be certified with this many images."""
    return float(drop_upper_bound(np.array([0]), np.array([0]), n, level)[0])


def images_to_certify(lost_rate: float, gained_rate: float, tolerance: float, level: float, max_n: int = 10**8) -> int | None:
    """About how many images would certify ``tolerance`` at ``level`` if the rates of lost and gained
    rows stayed as measured. None when the measured drop itself is not below the tolerance."""
    if lost_rate - gained_rate >= tolerance:
        return None

    def certifies(n: int) -> bool:
        lost, gained = np.floor(lost_rate * n), np.floor(gained_rate * n)
        return bool(drop_upper_bound(np.array([lost]), np.array([gained]), n, level)[0] <= tolerance)

    return smallest_count(certifies, max_n)


def smallest_count(certifies: Callable[[int], bool], max_n: int = 10**8) -> int | None:
    """About the smallest n (within 1%) for which ``certifies(n)``, assumed monotone; None beyond ``max_n``."""
    high = 16
    while not certifies(high):
        high *= 2
        if high > max_n:
            return None
    low = high // 2
    while high - low > max(1, low // 100):  # 1% is precise enough for "roughly how many"
        middle = (low + high) // 2
        low, high = (low, middle) if certifies(middle) else (middle, high)
    return high


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Percentile intervals [low, high] from resampling the images, one column per threshold."""

    level: float
    replicates: int
    accuracy: np.ndarray | None  # [2, T]
    drop: np.ndarray | None  # big's accuracy minus the cascade's, paired on the same resample
    escalation: np.ndarray
    macs_reduction: np.ndarray


def bootstrap(outcomes: Outcomes, thresholds, level: float = 0.95, replicates: int = 1000, seed: int = 0) -> Bootstrap:
    """Paired bootstrap of the cascade at fixed thresholds: each replicate draws the n images with
    replacement (multinomial counts) and re-evaluates Eq. 4/5 on them. Replicates run in blocks so
    memory stays at (block x n) whatever n is."""
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    n = outcomes.n
    escalated = (outcomes.confidence.astype(np.float64)[:, None] < thresholds[None, :]).astype(np.float64)
    rng = np.random.default_rng(seed)
    esc_reps, acc_reps, big_reps = [], [], []
    if outcomes.has_labels:
        correct = np.where(escalated > 0, outcomes.big_correct[:, None], outcomes.little_correct[:, None]).astype(np.float64)
    block = max(1, min(replicates, 2_000_000 // max(n, 1)))
    for start in range(0, replicates, block):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(block, replicates - start)).astype(np.float64) / n
        esc_reps.append(weights @ escalated)
        if outcomes.has_labels:
            acc_reps.append(weights @ correct)
            big_reps.append(weights @ outcomes.big_correct.astype(np.float64))
    tail = (1.0 - level) / 2.0

    def interval(values: np.ndarray) -> np.ndarray:
        return np.quantile(values, [tail, 1.0 - tail], axis=0)

    escalation = np.concatenate(esc_reps)
    macs_reduction = 1.0 - (outcomes.macs_little + escalation * outcomes.macs_big) / outcomes.macs_big
    accuracy = drop = None
    if outcomes.has_labels:
        acc = np.concatenate(acc_reps)
        accuracy = interval(acc)
        drop = interval(np.concatenate(big_reps)[:, None] - acc)
    return Bootstrap(level, replicates, accuracy, drop, interval(escalation), interval(macs_reduction))


def uncertainty(outcomes: Outcomes, threshold: float, level: float, tolerance: float | None = None, replicates: int = 1000) -> dict:
    """How sure the report can be about the cascade at ``threshold``: the measured drop against big, its
    exact upper bound at ``level``, bootstrap intervals, and what this many images can certify at all."""
    n = outcomes.n
    s = sweep(outcomes, np.array([threshold]))
    boot = bootstrap(outcomes, [threshold], level, replicates)

    def pair(values: np.ndarray | None) -> list[float] | None:
        return None if values is None else [float(values[0, 0]), float(values[1, 0])]

    block = {
        "images": n,
        "level": level,
        "certifiable_drop": certifiable_drop(n, level),
        "bootstrap": {
            "replicates": replicates,
            "accuracy": pair(boot.accuracy),
            "drop": pair(boot.drop),
            "escalation": pair(boot.escalation),
            "macs_reduction": pair(boot.macs_reduction),
        },
    }
    if outcomes.has_labels:
        lost, gained = int(s.lost[0]), int(s.gained[0])
        kept_nothing = s.escalation[0] >= 1.0
        upper = 0.0 if kept_nothing else float(drop_upper_bound(np.array([lost]), np.array([gained]), n, level)[0])
        block.update(
            measured_drop=float(outcomes.big_correct.mean() - s.accuracy[0]),
            upper_drop=upper,
            lost=lost,
            gained=gained,
        )
        if tolerance is not None:
            block["tolerance"] = tolerance
            block["images_to_certify_tolerance"] = images_to_certify(lost / n, gained / n, tolerance, level)
    return block
