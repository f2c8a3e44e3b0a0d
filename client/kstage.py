"""Threshold analysis for a K-stage cascade (paper Eq. 7, Appendix A.2): pure numpy, no server.

Stage k answers a row when its gating signal (model_repository/gate/signals.py) is >= T_k (k < K-1); the last stage
answers the rest. A row answered by stage k costs MACs_0 + ... + MACs_k. The thresholds are chosen
jointly: every combination of candidate thresholds is evaluated, the first K-2 stages by a loop over
their candidates and the last threshold vectorised with prefix sums over the sorted signal (as the
two-stage sweep in thresholds.py). Candidates are every distinct signal value (exact) unless the
combinations exceed MAX_POINTS; then each stage gets an evenly spaced grid of its signal's quantiles.

Metrics: top-1 accuracy (multi-class; certified bound as thresholds.choose_with_bound) or micro-F1
(multi-label, labels multi-hot [N, C], answers at p >= 0.5; chosen by its point estimate: the
Clopper-Pearson bound is for a binomial accuracy). The reference is the last stage alone, or a given
model (the ensemble: the last "stage" is the blend, the reference big alone).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from littlebig.contract import MULTILABEL_CUT  # a label is answered when its sigmoid probability is >= this (the gate's LABELS)
from littlebig.errors import UserError
from littlebig.gate.signals import signal as gating_signal

from .thresholds import check_finite, drop_upper_bound, escalation_quantile

MAX_POINTS = 2_000_000  # threshold combinations evaluated at most (memory ~ MAX_POINTS x 8 floats)
# Columns summed over the rows each stage answers: the metric's parts, then agreement with the reference,
# then (accuracy only) rows lost and gained against the reference.
ACCURACY_PARTS, F1_PARTS = ("correct",), ("tp", "fp", "fn")


@dataclasses.dataclass(frozen=True)
class StageOutcomes:
    """Per-row facts of every stage, derived once from the probabilities."""

    confidence: np.ndarray  # float64 [K, N]: each stage's gating signal
    columns: np.ndarray  # float64 [K, N, Q]: per-row parts of each stage's answer (see column_names)
    reference_parts: np.ndarray | None  # float64 [N, P]: the reference's metric parts
    macs: np.ndarray  # int64 [K]
    metric: str  # "accuracy" | "micro_f1" | "none" (no labels)
    last_is_reference: bool  # the last stage answers exactly what the reference does

    @property
    def n(self) -> int:
        return self.confidence.shape[1]

    @property
    def k(self) -> int:
        return self.confidence.shape[0]

    @property
    def has_labels(self) -> bool:
        return self.metric != "none"

    @property
    def parts(self) -> int:
        return {"accuracy": 1, "micro_f1": 3, "none": 0}[self.metric]

    @classmethod
    def from_probs(
        cls, stages: list[np.ndarray], labels: np.ndarray | None, macs, signal: str = "max_softmax",
        task: str = "multiclass", reference: np.ndarray | None = None,
    ) -> "StageOutcomes":
        shapes = {p.shape for p in stages} | ({reference.shape} if reference is not None else set())
        if len(stages) < 2 or len(shapes) != 1 or stages[0].ndim != 2:
            raise UserError(f"need >= 2 stages of probabilities, all [N, C] of one shape, got {sorted(shapes)}")
        if len(macs) != len(stages):
            raise UserError(f"{len(macs)} MACs counts for {len(stages)} stages")
        if task not in ("multiclass", "multilabel"):
            raise UserError(f"task must be multiclass or multilabel, got {task!r}")
        n = len(stages[0])
        if labels is not None and len(labels) != n:
            raise UserError(f"{len(labels)} labels for {n} rows")
        if task == "multilabel" and labels is not None and np.shape(labels) != stages[0].shape:
            raise UserError(f"multi-label labels must be multi-hot {stages[0].shape}, got {np.shape(labels)}")
        check_finite(**{f"stage {i}": p for i, p in enumerate(stages)})
        answer = _answers(task)
        ref_probs = stages[-1] if reference is None else reference
        ref_answer = answer(ref_probs)
        ref_parts = None if labels is None else _parts(task, ref_answer, labels)
        columns = []
        for probs in stages:
            ans = answer(probs)
            agree = _agree(ans, ref_answer)[:, None]
            if labels is None:
                columns.append(agree)
                continue
            parts = _parts(task, ans, labels)
            extra = [agree]
            if task == "multiclass":
                right, ref_right = parts[:, 0], ref_parts[:, 0]
                extra += [(ref_right * (1 - right))[:, None], (right * (1 - ref_right))[:, None]]  # lost, gained
            columns.append(np.hstack([parts] + extra))
        return cls(
            confidence=np.stack([gating_signal(signal, p) for p in stages]),
            columns=np.stack(columns).astype(np.float64),
            reference_parts=ref_parts,
            macs=np.asarray(macs, dtype=np.int64),
            metric="none" if labels is None else ("accuracy" if task == "multiclass" else "micro_f1"),
            last_is_reference=reference is None,
        )

    def metric_of(self, sums: np.ndarray) -> np.ndarray:
        """The metric from column sums [..., Q] (or the reference's parts summed)."""
        if self.metric == "accuracy":
            return sums[..., 0] / self.n
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        denominator = 2 * tp + fp + fn
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-300), 1.0)

    def reference_metric(self) -> float | None:
        return None if not self.has_labels else float(self.metric_of(self.reference_parts.sum(0)))

    def stage_metric(self, stage: int) -> float | None:
        return None if not self.has_labels else float(self.metric_of(self.columns[stage].sum(0)))


def _answers(task: str):
    if task == "multiclass":
        return lambda probs: probs.argmax(1)
    return lambda probs: probs >= MULTILABEL_CUT


def _agree(answer: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return answer == reference if answer.ndim == 1 else (answer == reference).all(1)


def _parts(task: str, answer: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if task == "multiclass":
        return (answer == labels).astype(np.float64)[:, None]
    truth = np.asarray(labels).astype(bool)
    tp = (answer & truth).sum(1)
    fp = (answer & ~truth).sum(1)
    fn = (~answer & truth).sum(1)
    return np.stack([tp, fp, fn], axis=1).astype(np.float64)


def stage_candidates(outcomes: StageOutcomes, max_points: int = MAX_POINTS) -> tuple[list[np.ndarray], bool]:
    """Candidate thresholds of each gated stage (0, every distinct signal value, 1) and whether they
    are exact; when their combinations exceed ``max_points``, an even grid of signal quantiles each."""
    stages = outcomes.k - 1
    exact = [np.unique(np.concatenate([[0.0], np.clip(c, 0.0, 1.0), [1.0]])) for c in outcomes.confidence[:stages]]
    if math.prod(len(c) for c in exact) <= max_points:
        return exact, True
    per_stage = max(2, int(max_points ** (1.0 / stages)))
    grids = []
    for c, values in zip(outcomes.confidence[:stages], exact):
        if len(values) <= per_stage:
            grids.append(values)
            continue
        quantiles = np.quantile(np.clip(c, 0.0, 1.0), np.linspace(0.0, 1.0, per_stage - 2), method="lower")
        grids.append(np.unique(np.concatenate([[0.0], quantiles, [1.0]])))
    return grids, False


@dataclasses.dataclass
class JointSweep:
    """The cascade at each threshold combination; every array aligned with ``thresholds``' rows."""

    thresholds: np.ndarray  # [M, K-1]
    answered: np.ndarray  # [M, K]: share of rows each stage answers
    metric: np.ndarray | None  # [M]
    agreement: np.ndarray  # [M]: share of answers equal to the reference's
    lost: np.ndarray | None  # [M]: rows the reference gets right and the cascade wrong (accuracy only)
    gained: np.ndarray | None
    gmacs: np.ndarray  # [M]: expected GMACs per row
    relative_macs: np.ndarray  # [M]: against the reference (last stage) alone
    exact: bool

    def at(self, index: int) -> dict:
        return {
            "thresholds": [float(t) for t in self.thresholds[index]],
            "answered": [float(a) for a in self.answered[index]],
            "metric": None if self.metric is None else float(self.metric[index]),
            "agreement": float(self.agreement[index]),
            "gmacs": float(self.gmacs[index]),
            "macs_reduction": float(1.0 - self.relative_macs[index]),
        }


def _last_threshold_block(outcomes: StageOutcomes, reach: np.ndarray, last: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums and the count the second-last stage answers, for every last threshold, over the
    rows that ``reach`` the second-last stage (plus ``fixed``, the sums of the rows answered before)."""
    s, k = outcomes.k - 2, outcomes.k - 1
    idx = np.flatnonzero(reach)
    order = idx[np.argsort(outcomes.confidence[s, idx], kind="stable")]
    # Rows escalated past stage s at T are the first e of the sorted order, e = #(signal < T).
    escalated = np.searchsorted(outcomes.confidence[s, order], last, side="left")
    zero = np.zeros((1, outcomes.columns.shape[2]))
    prefix_last = np.vstack([zero, np.cumsum(outcomes.columns[k, order], axis=0)])
    prefix_s = np.vstack([zero, np.cumsum(outcomes.columns[s, order], axis=0)])
    sums = fixed + prefix_last[escalated] + (prefix_s[-1] - prefix_s[escalated])
    return sums, len(idx) - escalated


def sweep_stages(outcomes: StageOutcomes, candidates: list[np.ndarray] | None = None) -> JointSweep:
    """Evaluate the cascade at every combination of ``candidates`` (default: stage_candidates)."""
    exact = candidates is None
    if candidates is None:
        candidates, exact = stage_candidates(outcomes)
    candidates = [np.asarray(c, dtype=np.float64) for c in candidates]
    if len(candidates) != outcomes.k - 1:
        raise UserError(f"{len(candidates)} threshold lists for {outcomes.k} stages (need {outcomes.k - 1})")
    last, n, kk = candidates[-1], outcomes.n, outcomes.k
    blocks_t, blocks_sums, blocks_answered = [], [], []
    for combo in itertools.product(*candidates[:-1]):
        reach = np.ones(n, bool)
        fixed = np.zeros(outcomes.columns.shape[2])
        answered = np.zeros(kk)
        for stage, t in enumerate(combo):
            here = reach & (outcomes.confidence[stage] >= t)
            fixed += outcomes.columns[stage, here].sum(0)
            answered[stage] = here.sum()
            reach &= ~here
        sums, by_second_last = _last_threshold_block(outcomes, reach, last, fixed)
        block = np.tile(answered, (len(last), 1))
        block[:, kk - 2] = by_second_last
        block[:, kk - 1] = reach.sum() - by_second_last
        blocks_t.append(np.column_stack([np.tile(np.asarray(combo, dtype=np.float64), (len(last), 1)), last]))
        blocks_sums.append(sums)
        blocks_answered.append(block / n)
    return _joint_sweep(outcomes, np.vstack(blocks_t), np.vstack(blocks_sums), np.vstack(blocks_answered), exact)


def _joint_sweep(outcomes: StageOutcomes, thresholds, sums, answered, exact: bool) -> JointSweep:
    p = outcomes.parts
    gmacs = answered @ np.cumsum(outcomes.macs).astype(np.float64) / 1e9
    accuracy_like = outcomes.metric == "accuracy"
    return JointSweep(
        thresholds=thresholds,
        answered=answered,
        metric=outcomes.metric_of(sums) if outcomes.has_labels else None,
        agreement=sums[:, p] / outcomes.n,
        lost=sums[:, p + 1] if accuracy_like else None,
        gained=sums[:, p + 2] if accuracy_like else None,
        gmacs=gmacs,
        relative_macs=gmacs * 1e9 / outcomes.macs[-1],
        exact=exact,
    )


def settle(outcomes: StageOutcomes, thresholds: np.ndarray) -> np.ndarray:
    """Each T_k moved to the middle between the largest signal value below it and itself: the same rows
    are answered (no signal value lies in between), and the pick is least sensitive to float noise."""
    settled = np.array(thresholds, dtype=np.float64)
    for stage, t in enumerate(settled):
        below = outcomes.confidence[stage][outcomes.confidence[stage] < t]
        low = float(below.max()) if len(below) else 0.0
        settled[stage] = max((low + t) / 2.0, 0.0)  # an entropy signal can be -1e-9: T stays in [0, 1]
    return settled


@dataclasses.dataclass
class JointChoice:
    index: int  # into the sweep
    thresholds: list[float]  # settled (see settle)
    criterion: str
    met: bool  # False: nothing met the criterion; the safest combination is returned
    bound: dict | None = None


def _cheapest(s: JointSweep, ok: np.ndarray) -> int:
    """Among the rows ``ok``, the lowest cost; ties: the best metric, then the most agreement."""
    candidates = np.flatnonzero(ok)
    metric = s.metric[candidates] if s.metric is not None else np.zeros(len(candidates))
    return int(candidates[np.lexsort((-s.agreement[candidates], -metric, s.gmacs[candidates]))[0]])


def _safest(s: JointSweep) -> int:
    """Everything to the last stage (the most it can send there), the best metric among those."""
    return _cheapest(s, s.answered[:, -1] >= s.answered[:, -1].max())


def _choice(outcomes: StageOutcomes, s: JointSweep, index: int, criterion: str, met: bool, bound=None) -> JointChoice:
    return JointChoice(index, [float(t) for t in settle(outcomes, s.thresholds[index])], criterion, met, bound)


def choose_max_drop(outcomes: StageOutcomes, s: JointSweep, max_drop: float) -> JointChoice:
    """The cheapest combination whose measured metric is >= the reference's - max_drop (point estimate)."""
    if s.metric is None:
        raise UserError("a metric criterion needs labels")
    name = f"max_{'acc' if outcomes.metric == 'accuracy' else 'f1'}_drop={max_drop}"
    ok = s.metric >= outcomes.reference_metric() - max_drop - 1e-12  # ratios of integers: no float noise
    if ok.any():
        return _choice(outcomes, s, _cheapest(s, ok), name, True)
    return _choice(outcomes, s, _safest(s), name, False)


def choose_with_bound(outcomes: StageOutcomes, s: JointSweep, max_drop: float, level: float) -> JointChoice:
    """The cheapest combination whose exact upper bound on the accuracy drop (thresholds.drop_upper_bound)
    is <= max_drop, testing in a fixed sequence from the combinations that send the most rows to the last
    stage down, stopping at the first that fails. Two stages: exactly thresholds.choose_with_bound's
    Learn-then-Test rule (the sequence is T from 1 down). K > 2: the sequence is ordered by a measured
    share, so the guarantee is approximate (README, K stages)."""
    if outcomes.metric != "accuracy":
        raise UserError("the certified bound is for top-1 accuracy (multi-label: use the point estimate of micro-F1)")
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must be in (0, 1), got {level}")
    upper = drop_upper_bound(s.lost, s.gained, outcomes.n, level)
    # Nothing answered before the last stage and it is the reference: the cascade is the reference.
    same = (s.answered[:, -1] >= 1.0) & outcomes.last_is_reference
    upper = np.where(same, 0.0, upper)
    # The drop comes from rows answered before the last stage: the fewer, the safer. (Ordering by cost
    # instead stopped early at costly combinations that leave most rows to a weak middle stage.)
    order = np.lexsort((upper, -s.gmacs, -s.answered[:, -1]))
    passed = upper[order] <= max_drop
    failed = np.flatnonzero(~passed)
    tested = order[: failed[0] if len(failed) else len(order)]
    bound = {
        "method": "Clopper-Pearson upper bound on P(lost) minus lower bound on P(gained), Bonferroni split; "
        "fixed-sequence test from the most rows sent to the last stage down (Learn-then-Test; exact for two "
        "stages, approximate for more)",
        "level": level,
        "upper_drop": None,
    }
    name = f"max_acc_drop={max_drop}@{level}"
    if len(tested) == 0:
        return _choice(outcomes, s, _safest(s), name, False, bound)
    ok = np.zeros(len(upper), bool)
    ok[tested] = True
    index = _cheapest(s, ok)
    bound["upper_drop"] = float(max(upper[index], 0.0))
    # Met: certified and cheaper than the reference alone (else it is the reference at extra cost).
    return _choice(outcomes, s, index, name, bool(s.relative_macs[index] < 1.0) and not bool(same[index]), bound)


def choose_min_agreement(outcomes: StageOutcomes, s: JointSweep, min_agreement: float) -> JointChoice:
    """Label-free: the cheapest combination whose answers agree with the reference on >= min_agreement."""
    ok = s.agreement >= min_agreement - 1e-12
    name = f"min_agreement={min_agreement}"
    if ok.any():
        return _choice(outcomes, s, _cheapest(s, ok), name, True)
    return _choice(outcomes, s, _safest(s), name, False)


def choose_target_escalation(outcomes: StageOutcomes, s: JointSweep, share: float) -> JointChoice:
    """Label-free, two stages: T = the ``share``-quantile of little's signal (as thresholds.choose_target_escalation)."""
    if outcomes.k != 2:
        raise UserError("--target-escalation sets one threshold (two stages): use --min-agreement or a labelled "
                         "criterion for this cascade")
    if not 0.0 <= share <= 1.0:
        raise UserError(f"target escalation must be in [0, 1], got {share}")
    target = escalation_quantile(outcomes.confidence[0], share)
    index = min(int(np.searchsorted(s.thresholds[:, 0], target, side="left")), len(s.thresholds) - 1)
    return _choice(outcomes, s, index, f"target_escalation={share}", True)


def choose(outcomes: StageOutcomes, s: JointSweep, criterion) -> JointChoice:
    """The choice a client/criterion.Criterion asks for. Multi-label (micro-F1) always uses the point
    estimate (the bound is for accuracy); --target-escalation is a two-stage criterion."""
    criterion.validate()
    if criterion.target_escalation is not None:
        return choose_target_escalation(outcomes, s, criterion.target_escalation)
    if criterion.min_agreement is not None:
        return choose_min_agreement(outcomes, s, criterion.min_agreement)
    if not outcomes.has_labels:
        raise UserError("the data has no labels: use --min-agreement (label-free)")
    if criterion.point_estimate or outcomes.metric != "accuracy":
        return choose_max_drop(outcomes, s, criterion.max_acc_drop)
    return choose_with_bound(outcomes, s, criterion.max_acc_drop, criterion.confidence_level)


def evaluate(outcomes: StageOutcomes, thresholds) -> dict:
    """The cascade at fixed thresholds (e.g. the chosen ones on another set)."""
    s = sweep_stages(outcomes, [np.array([t]) for t in thresholds])
    return summary(outcomes, s, 0, thresholds)


def summary(outcomes: StageOutcomes, s: JointSweep, index: int, thresholds=None) -> dict:
    """The report block of one combination (``thresholds``: the settled values answering the same rows)."""
    point = s.at(index)
    if thresholds is not None:
        point["thresholds"] = [float(t) for t in thresholds]
    point.update(
        rows=outcomes.n,
        metric_name=outcomes.metric,
        stage_metric=[outcomes.stage_metric(k) for k in range(outcomes.k)],
        reference_metric=outcomes.reference_metric(),
        stage_gmacs=[float(m) / 1e9 for m in outcomes.macs],
    )
    return point


def pareto(gmacs: np.ndarray, metric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The accuracy-vs-MACs frontier: the best metric at each cost or less (for plots)."""
    order = np.lexsort((-metric, gmacs))
    best = np.maximum.accumulate(metric[order])
    keep = np.concatenate([[True], best[1:] > best[:-1]])
    return gmacs[order][keep], best[keep]


def choose_multilabel(
    stages: list[np.ndarray], labels: np.ndarray, macs, max_f1_drop: float = 0.0, signal: str = "mean_abs_margin"
) -> dict:
    """Multi-label calibration in one call: sigmoid probabilities [N, C] per stage (cost order), multi-hot
    labels [N, C]; the cheapest thresholds whose micro-F1 is >= the last stage's - max_f1_drop."""
    outcomes = StageOutcomes.from_probs(stages, labels, macs, signal=signal, task="multilabel")
    s = sweep_stages(outcomes)
    choice = choose_max_drop(outcomes, s, max_f1_drop)
    block = summary(outcomes, s, choice.index, choice.thresholds)
    block.update(criterion=choice.criterion, criterion_met=choice.met, signal=signal, exact=s.exact)
    return block
