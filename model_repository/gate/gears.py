"""The gears: move T along the calibrated ladder to keep a latency target (opt-in, two stages)."""

import dataclasses

import numpy as np

from .observations import Observations


class Gears:
    """Moves T along the calibrated ladder to keep a latency target.

    Signals (Triton does not tell a Python model when a request arrived or how long it queued), from
    ``Observations``: this instance's own, or pooled over the model's instances on this server
    (``PooledObservations``), so that every instance sees every answer and they move together. Each
    answer's time from the start of its execute to its send, plus the instance's last wait for little as
    the estimate of the time spent in the gate's queue (the dynamic batcher hands over everything waiting,
    so a request waits about one execute), and the age of the oldest escalation still waiting for big
    (big's backlog shows there before any answer does). Every ``interval_s`` the answers of the last
    ``HORIZON`` intervals are judged as a p99 target allows: a few of them may be late. Rows the
    deadline answered count as late: they waited that long for big, and an overload the deadline
    absorbs would otherwise look like a met target while big's backlog grows.

    Down only on a miss, and then to the last gear: more than ``LATE_SHARE`` of the last ``HORIZON``
    intervals' answers over the target, or the oldest escalation waiting for more than ``FAR_OVER`` x
    the target (a backlog already built up, before its answers are in). A gate that meets a p99 target
    near its capacity has bursts in which a few answers are late; once load exceeds what gear 0
    sustains, most answers are. A rule on the slowest answers of each interval moved on such bursts and
    changed answers where the fixed T met the target (docs/gears.md, "What did not work"). When
    the miss is real, big's queue already holds a backlog that only the fewest escalations drain
    quickly, so half-measures (one gear per interval) let it grow for several more intervals. Up
    slowly: after ``raise_after`` intervals in a row with the horizon's p99 and the oldest escalation
    below ``RAISE_BELOW`` x target, one gear up; ``raise_after`` starts at ``RAISE_AFTER`` and doubles
    (up to ``MAX_RAISE_AFTER``) when a miss follows a climb within ``raise_after`` intervals (the gear
    climbed into could not take the load), and halves back at each climb after one that held. After a
    quiet spell (nothing in flight, nothing answered for an interval) there is no load to shed: back
    to gear 0, ``raise_after`` reset. While the target is met the gear stays 0.
    """

    RAISE_BELOW = 0.5
    RAISE_AFTER = 4
    MAX_RAISE_AFTER = 32
    HORIZON = 4  # intervals of answers judged at each decision
    LATE_SHARE = 0.2
    LATE = 1.01  # x target: what a deadline answer counts as
    FAR_OVER = 2.0

    def __init__(self, ladder, target_s, interval_s, metrics, count, now, seen=None, deadline_s=0.0):
        self.count = count  # Counters.add: counters reach Triton batched, like the gate's own
        self.thresholds = [t for t, _ in ladder]
        self.drops = [d for _, d in ladder]
        self.target_s, self.interval_s = target_s, interval_s
        self.deadline_s = deadline_s  # gear_deadline_ms: how long an adaptive row waits for big (0: no bound)
        self.metrics = metrics  # GearMetrics
        self.seen = seen if seen is not None else Observations()
        self.gear = 0
        self.queue_s = 0.0  # this instance's last wait for little: the estimated gate queue wait
        self.calm = 0  # intervals in a row below RAISE_BELOW x target
        self.raise_after = self.RAISE_AFTER  # calm intervals needed to climb one gear
        self.climbed = self.missed = float("-inf")  # when the gate last climbed, last confirmed a miss
        self.decided = self.accounted = self.began = now

    @property
    def threshold(self):
        return self.thresholds[self.gear]

    @property
    def in_force(self):
        """The cascade's thresholds in this gear (gears move T_0 of a two-stage cascade)."""
        return (self.thresholds[self.gear],)

    def start(self, now):
        """At the start of an execute: maybe change gear; returns when its requests probably arrived."""
        self.decide(now)
        self.began = now
        return now - self.queue_s

    def decide(self, now):
        """Reconsider the gear if an interval has passed since the last decision: this instance's, or
        with pooled observations any instance's (the controller's state is then the pool's, so the
        instances take one decision per interval between them and are always in the same gear)."""
        before = self.gear
        with self.seen.shared(self):
            if now - self.decided >= self.interval_s:
                self._decide(now)
        self.count(self.metrics.seconds[before], now - self.accounted)
        self.accounted = now
        if self.gear != before:
            self.metrics.gear.set(self.gear)
            self.metrics.threshold.set(self.threshold)

    def little_answered(self, now):
        self.queue_s = now - self.began

    def answered(self, started, count, now, late=False):
        """``count`` requests answered; ``late``: by the deadline, which the controller counts as over the
        target (they waited that long for big, so without the deadline they would have been), or an
        overload the deadline absorbs would look like a met target."""
        if count:
            latency = now - started
            self.seen.answered(max(latency, self.LATE * self.target_s) if late else latency, count, now)

    def adapted(self, rows, threshold):
        """``rows`` were answered at gear T ``threshold`` (not pinned; the gear may have moved while little
        ran): the expected accuracy they gave up."""
        drop = self.drops[self.thresholds.index(threshold)]
        if drop:
            self.count(self.metrics.cost, rows * drop)

    def reanswered(self, old_thresholds, new_thresholds):
        """Rows escalated at ``old_thresholds`` and now answered by little at ``new_thresholds`` (gears'
        T): the expected accuracy they gave up beyond what was counted when they arrived."""
        drop = {t: d for t, d in zip(self.thresholds, self.drops)}
        extra = sum(drop[float(new)] - drop.get(float(old), 0.0) for old, new in zip(old_thresholds, new_thresholds))
        if extra > 0:
            self.count(self.metrics.cost, extra)

    def highest_cleared(self, signals):
        """Per row, the highest gear T at or below its signal (NaN below the last gear)."""
        ladder = np.asarray(self.thresholds)
        gear = np.searchsorted(-ladder, -np.asarray(signals, dtype=np.float64), side="left")
        return np.where(gear < len(ladder), ladder[np.minimum(gear, len(ladder) - 1)], np.nan)

    def escalation_started(self, started):
        self.seen.escalation_started(started)

    def escalation_ended(self, started):
        self.seen.escalation_ended(started)

    def _decide(self, now):
        oldest = self.seen.oldest()
        age = now - oldest if oldest is not None else 0.0
        window = self.seen.window(now - self.HORIZON * self.interval_s)
        late = float(np.mean(window > self.target_s)) if len(window) else 0.0
        p99 = float(np.percentile(window, 99)) if len(window) else 0.0
        if oldest is None and now - self.seen.last_answer() > self.interval_s:
            gear = 0  # quiet spell: what the window holds is old news
            self.calm = 0
            self.raise_after = self.RAISE_AFTER
        elif late > self.LATE_SHARE or age > self.FAR_OVER * self.target_s:
            gear = self._missed(now)
        elif max(p99, age) < self.RAISE_BELOW * self.target_s:
            gear = self._calm(now)
        else:
            gear, self.calm = self.gear, 0
        self.gear = gear
        self.decided = now

    def _missed(self, now):
        """A miss: to the last gear."""
        self.calm = 0
        if now - self.climbed < self.raise_after * self.interval_s:
            self.raise_after = min(2 * self.raise_after, self.MAX_RAISE_AFTER)  # the last climb went too far
            self.climbed = float("-inf")  # once per climb
        self.missed = now
        return len(self.thresholds) - 1

    def _calm(self, now):
        """Comfortably under the target: one gear up after ``raise_after`` calm intervals in a row."""
        self.calm += max(int(round((now - self.decided) / self.interval_s)), 1)
        if self.gear == 0 or self.calm < self.raise_after:
            return self.gear
        if self.missed < self.climbed:
            self.raise_after = max(self.raise_after // 2, self.RAISE_AFTER)  # the last climb held
        self.calm, self.climbed = 0, now
        return self.gear - 1


@dataclasses.dataclass
class GearMetrics:
    gear: object  # gauge: the gear in force
    threshold: object  # gauge: its T
    seconds: list  # counters per gear: seconds spent in it
    cost: object  # counter: expected answers lost against the config T (sum of the gears' drops per row)
    settled: object  # counter: rows waiting for big that a step down answered with little's answer
    deadline: object  # counter: rows waiting for big past the deadline answered with little's answer
    dropped: object  # counter: rows of calls that big's queue dropped at their deadline (never computed)

