"""The audit's and the label-free certification's arithmetic, without a server (numpy and scipy only)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from littlebig.client import labelfree
from littlebig.client import thresholds as th
from littlebig.client.audit import Snapshot, exact_upper, live_bound, relaxed_upper
from littlebig.client.calibrate import analyse
from littlebig.client.collect import Collected
from littlebig.client.criterion import Criterion
from littlebig.client.recalibrate import audit_sweep, choose_from_audit
from littlebig.gate.audit import Audit, AuditBatch
from littlebig.gate.config import AUDIT_BINS, GateConfig, bin_label
from littlebig.gate.rows import ChildAnswer, ChildError, Stage


def test_the_alert_rules_bound_is_never_below_the_exact_one():
    for covered in (100, 1_000, 100_000):
        for rate in (0.01, 0.1, 1.0):
            for disagree in range(0, int(min(covered * rate, 300)) + 1, 7):
                assert relaxed_upper(disagree, covered, rate, 0.95) >= exact_upper(disagree, covered, rate, 0.95) - 1e-12


def test_the_live_bound_covers_the_true_share_in_95_percent_of_windows():
    rng = np.random.default_rng(0)
    q, rate, rows, windows = 0.02, 0.05, 20_000, 4_000
    audited_differ = rng.binomial(rows, rate * q, size=windows)  # each row: audited with p rate, differs with p q
    upper = np.array([exact_upper(x, rows, rate, 0.95) for x in audited_differ])
    coverage = float((upper >= q).mean())
    assert 0.95 <= coverage < 0.995, coverage  # exact, so covers; not vacuous either


def snapshot_from(conf, differ, served_t, rate, rng):
    """What the gate would count: every escalated row, each kept row audited with probability ``rate``."""
    bins = np.minimum((conf.astype(np.float64) * AUDIT_BINS).astype(int), AUDIT_BINS - 1)
    escalated = conf.astype(np.float64) < served_t
    audited = ~escalated & (rng.random(len(conf)) < rate)

    def count(mask):
        return np.bincount(bins[mask], minlength=AUDIT_BINS).astype(np.float64)

    return Snapshot(rate=rate, promise=0.02, covered=len(conf), audited=float(audited.sum()),
                    disagree=float((audited & differ).sum()), skipped={},
                    bins={"kept_rows": count(audited), "kept_differ": count(audited & differ),
                          "escalated_rows": count(escalated), "escalated_differ": count(escalated & differ)})


def synthetic(n, rng):
    """Confidences, and little differing from big mostly where it is unsure."""
    conf = rng.beta(5, 1.2, size=n).astype(np.float32)
    differ = rng.random(n) < 0.6 * (1 - conf) ** 2
    return conf, differ


def test_audit_sweep_counts_the_differing_share_at_each_bin_edge():
    rng = np.random.default_rng(1)
    conf, differ = synthetic(5_000, rng)
    snapshot = snapshot_from(conf, differ, 0.5, 1.0, rng)  # every kept row audited: the counts are the truth
    sweep, _, _ = audit_sweep(snapshot, (100, 400))
    for j in (0, 30, 50, 70, 90, 99):
        kept = conf.astype(np.float64) >= j / AUDIT_BINS
        assert 1.0 - sweep.agreement[j] == pytest.approx((kept & differ).mean(), abs=1e-12)
        assert sweep.escalation[j] == pytest.approx(1.0 - kept.mean(), abs=1e-12)


def test_from_audit_certifies_a_t_that_holds_and_refuses_with_too_little_evidence():
    rng = np.random.default_rng(2)
    conf, differ = synthetic(200_000, rng)
    report = choose_from_audit(snapshot_from(conf, differ, 0.6, 0.05, rng), (100, 400), Criterion(max_acc_drop=0.02))
    assert report["criterion_met"] and report["bound"]["upper_drop"] <= 0.02
    t = report["threshold"]
    assert (differ & (conf >= t)).mean() <= 0.02  # the truth at the chosen T
    assert "not against the truth" in report["bound"]["on"]
    thin = choose_from_audit(snapshot_from(conf[:300], differ[:300], 0.6, 0.05, rng), (100, 400), Criterion(max_acc_drop=0.02))
    assert not thin["criterion_met"] and thin["escalation"] == 1.0


def collected(little, big, labels=None):
    return Collected([little, big], labels, [f"{i}.png" for i in range(len(little))], [100, 400])


def probs_with(conf_rows, classes, agree_with, rng, n_classes=10):
    """Probabilities whose top-1 is ``classes`` at confidence ``conf_rows``."""
    probs = np.full((len(classes), n_classes), 0.0, dtype=np.float32)
    rest = (1.0 - conf_rows) / (n_classes - 1)
    probs[:] = rest[:, None]
    probs[np.arange(len(classes)), classes] = conf_rows
    return probs


def test_label_free_calibration_certifies_disagreement_and_says_what_it_bounds():
    rng = np.random.default_rng(3)
    n = 3_000
    conf, differ = synthetic(n, rng)
    big_class = rng.integers(0, 10, n)
    little_class = np.where(differ, (big_class + 1) % 10, big_class)
    little = probs_with(np.maximum(conf, 0.11), little_class, None, rng)
    big = probs_with(np.full(n, 0.9, dtype=np.float32), big_class, None, rng)
    s, _, choice = analyse(collected(little, big), Criterion(max_acc_drop=0.02))
    assert choice.met and choice.bound["upper_drop"] <= 0.02
    assert choice.bound["on"] == "the drop against big, not against the truth"
    point = th.choose_min_agreement(s, 0.98)
    assert s.thresholds[choice.index] >= s.thresholds[point.index]  # the bound costs escalations
    labels = big_class.copy()
    both = analyse(collected(little[:500], big[:500], labels[:500]), Criterion(max_acc_drop=0.02), collected(little[500:], big[500:]))[2]
    assert [source["on"] for source in both.bound["sources"]] == ["drop", "disagreement"]
    assert all(source["level"] == pytest.approx(0.975) for source in both.bound["sources"])


def test_images_to_certify_agrees_with_the_bound():
    needed = labelfree.images_to_certify(0.01, 0.02, 0.95)
    assert labelfree.cp_upper(np.floor(0.01 * needed), needed, 0.05) <= 0.02
    assert labelfree.cp_upper(np.floor(0.01 * (needed // 2)), needed // 2, 0.05) > 0.02
    assert labelfree.images_to_certify(0.03, 0.02, 0.95) is None


def test_snapshots_read_the_gates_metrics_and_make_windows():
    samples = [("littlebig_audit_rate", {"model": "gate"}, 0.5), ("littlebig_audit_promise", {"model": "gate"}, 0.02),
               ("littlebig_audit_covered_rows_total", {"model": "gate"}, 1000.0),
               ("littlebig_audit_rows_total", {"model": "gate"}, 400.0),
               ("littlebig_audit_disagree_rows_total", {"model": "gate"}, 4.0),
               ("littlebig_audit_skipped_rows_total", {"model": "gate", "reason": "busy"}, 7.0),
               ("littlebig_audit_kept_rows_total", {"model": "gate", "bin": bin_label(97)}, 400.0),
               ("littlebig_audit_rows_total", {"model": "other"}, 99.0)]
    first = Snapshot.from_samples(samples)
    assert (first.covered, first.audited, first.disagree, first.skipped) == (1000, 400, 4, {"busy": 7})
    assert first.bins["kept_rows"][97] == 400
    later = Snapshot.from_samples([(n, lab, v * 3 if n != "littlebig_audit_rate" and "promise" not in n else v)
                                   for n, lab, v in samples])
    window = later.minus(first)
    assert (window.covered, window.disagree, window.bins["kept_rows"][97]) == (2000, 8, 800)
    block = live_bound(window)
    assert block["estimate"] == pytest.approx(8 / 1000) and block["holds"] is True
    assert Snapshot.from_json(window.to_json()).bins["kept_rows"][97] == 800


class Recorder:
    """The gate's Counters interface: keeps what it is given."""

    def __init__(self):
        self.counts = {}

    def add(self, metric, amount=1):
        self.counts[metric] = self.counts.get(metric, 0) + amount


class Metrics:
    def __init__(self):
        self.covered, self.audited, self.disagree = "covered", "audited", "disagree"
        self.skipped = {reason: f"skipped {reason}" for reason in ("busy", "gears", "failed")}
        for name in ("kept_rows", "kept_differ", "escalated_rows", "escalated_differ"):
            setattr(self, name, [(name, k) for k in range(AUDIT_BINS)])


class Big:
    """Big over BLS as the gate's Children sees it: answers (class 7), or fails."""

    def __init__(self, fail=False):
        self.fail = fail

    async def infer(self, stage, inputs, want_probs, queue_s=None):
        if self.fail:
            raise ChildError(stage, "Request timeout expired")
        return ChildAnswer(np.full(len(inputs[0]), 7, dtype=np.int64), np.ones(len(inputs[0])), None)


def gate_audit(fail=False, in_flight=1):
    config = GateConfig(stage_models=("little", "big"), stage_macs=(1, 2), thresholds=(0.5,), audit_rate=1.0, audit_in_flight=in_flight)
    recorder = Recorder()
    return Audit(config, Stage(1, "big", "big", 2), Big(fail), recorder, Metrics(), seed=0), recorder.counts


def test_the_gate_counts_a_batch_once_both_answers_are_in_and_never_a_partial_one():
    signal, little = np.array([0.9, 0.2, 0.95, 0.3]), np.array([7, 1, 3, 7])
    unsure = signal < 0.5
    audit, counts = gate_audit()
    batch = audit.begin(signal, little, unsure, lambda rows: [np.arange(len(rows))], False)
    assert audit.begin(signal, little, unsure, lambda rows: [rows], False) is None  # the one call slot is taken
    assert counts == {"skipped busy": 4}
    asyncio.run(audit._call(batch))
    assert "covered" not in counts  # big has not answered the escalation yet
    audit.escalated(batch, np.flatnonzero(unsure), np.ones(2, bool), np.array([1, 2]))
    assert counts["covered"] == 4 and counts["audited"] == 2 and counts["disagree"] == 1  # little's 3 against big's 7
    assert counts[("kept_differ", 95)] == 1 and counts[("escalated_differ", 30)] == 1 and counts[("escalated_rows", 20)] == 1
    failing, failed = gate_audit(fail=True)
    batch = failing.begin(signal, little, unsure, lambda rows: [rows], False)
    asyncio.run(failing._call(batch))
    failing.ended(batch)
    assert failed == {"skipped failed": 4} and failing.in_flight == 0
    down, skipped = gate_audit()
    assert down.begin(signal, little, unsure, lambda rows: [rows], True) is None and skipped == {"skipped gears": 4}
    early, counted = gate_audit()
    batch = early.begin(signal, little, unsure, lambda rows: [rows], False)
    early.escalated(batch, np.flatnonzero(unsure), np.array([True, False]), np.array([1, 2]))  # the gears answered one
    asyncio.run(early._call(batch))
    assert counted == {"skipped gears": 4}
    assert isinstance(batch, AuditBatch)


def test_the_audit_keeps_littles_classes_when_the_answers_take_bigs():
    """The batch's answers start as little's class array and big's classes overwrite the escalated rows
    (rows.Answers.fill) before the audit's own call to big returns: the counts must still be little's."""
    signal, little = np.array([0.9, 0.2, 0.3]), np.array([7, 1, 3])
    unsure = signal < 0.5
    audit, counts = gate_audit()
    batch = audit.begin(signal, little, unsure, lambda rows: [np.arange(len(rows))], False)
    audit.escalated(batch, np.flatnonzero(unsure), np.ones(2, bool), np.array([5, 3]))  # big: 5 and 3
    little[np.flatnonzero(unsure)] = [5, 3]  # as Answers.fill does on the shared array
    asyncio.run(audit._call(batch))  # the kept row: big answers 7, as little
    assert counts["covered"] == 3 and counts["disagree"] == 0
    assert counts[("escalated_differ", 20)] == 1 and ("escalated_differ", 30) not in counts
