"""The gears at work in the gate (opt-in, two stages): the controller (gears.Gears) moves T along the
calibrated ladder; here its decisions reach the rows. A step down settles the backlog: rows waiting for
big whose little signal is >= the new T are answered at once with little's answer (reporting the new
T). A deadline (gear_deadline_ms) bounds the wait of each adaptive row: rows still waiting for big then
get little's answer at the highest gear T their signal clears; rows below the last gear keep waiting. A
call to big whose rows the deadline would all answer carries the deadline as its timeout, and big's
queue (configured by the builder to honour it) drops it unexecuted once past it. With one gate
instance escalations wait for big in the gate (held.Held), so a step down settles them before big
spends anything on them. Requests that send their own thresholds are never adapted. Everything here
runs on the stub's event loop."""

import asyncio
import time

import numpy as np

from .gears import Gears
from .held import Held
from .observations import pooled_observations


class Adaptive:
    """The gears of one gate instance, wired into its cascade (cascade.Cascade)."""

    def __init__(self, config, cascade, metrics, model_name, instances, max_batch_size, warn):
        self.cascade = cascade
        self.counters = cascade.counters
        self.gears = Gears(list(config.gears), config.latency_target_ms / 1000.0, config.gear_interval_ms / 1000.0, metrics,
                           self.counters.add, time.monotonic(), pooled_observations(model_name, warn),
                           config.gear_deadline_ms / 1000.0)
        self.child_timeout_s = config.child_timeout_ms / 1000.0
        big = cascade.stages[-1]
        self.held = Held(big, cascade.children.infer, max_batch_size or 1) if instances == 1 else None
        self.waiting = set()  # escalations still waiting for big, which a step down may settle
        self.ticker = None  # the timer that reconsiders the gear while escalations wait
        cascade.adaptive = self

    @property
    def in_force(self):
        return self.gears.in_force

    def start(self, now):
        """At the start of an execute: maybe change gear (a step down settles what it can of the backlog);
        returns when its requests probably arrived (the gears' latency clock)."""
        before = self.gears.gear
        started = self.gears.start(now)
        self._after_decision(before)
        return started

    def close(self):
        if self.ticker is not None:
            self.ticker.cancel()
        self.gears.seen.close()

    def observe(self, escalation, later):
        """``later``, the task of ``escalation`` (its ``started`` set), with the gears told: it counts among
        the escalations waiting for big, its deadline is set, and when it ends its requests' latency is
        told (those answered early were told then)."""
        escalation.observed = True
        self.gears.escalation_started(escalation.started)
        self.waiting.add(escalation)
        self._arm_ticker()
        if self.gears.deadline_s:
            delay = max(escalation.started + self.gears.deadline_s - time.monotonic(), 0.0)
            escalation.deadline = asyncio.get_running_loop().call_later(delay, self.expire, escalation)
        return self._observed(escalation, later, len(escalation.waiting))

    async def _observed(self, escalation, later, count):
        try:
            await later
        finally:
            self.waiting.discard(escalation)
            self._unobserve(escalation)
            if escalation.deadline is not None:
                escalation.deadline.cancel()
            self.gears.answered(escalation.started, count - escalation.early, time.monotonic())

    async def call_last(self, escalation, stage, want_probs):
        """Big's answer on the escalation's open rows; None when the gears answered all of them first."""
        if self.held is not None:
            return await self.held.run(escalation, want_probs)
        drop_after_s = self._drop_after_s(escalation)
        if drop_after_s is not None and drop_after_s <= 0.0:
            self.expire(escalation)  # past its deadline before the call: little answers every row
            return None
        return await self.cascade.children.infer(stage, escalation.inputs, want_probs, drop_after_s)

    def dropped(self, escalation):
        """Big's queue dropped the escalation's call at its deadline: none of its rows needed big."""
        self.counters.add(self.gears.metrics.dropped, len(escalation.pending))
        self.expire(escalation)

    def shed(self, threshold):
        """The gears just stepped down to ``threshold``: rows waiting for big whose little signal is >= it
        are answered now with little's answer (Eq. 4 at the T they report), so each waiting request whose
        rows are all settled leaves at once instead of behind big's backlog. Big still answers the call it
        was sent; its answer on those rows is dropped. Rows of pinned requests keep their T."""
        for escalation in list(self.waiting):
            signals = escalation.answers.confidence[escalation.pending]
            self._answer_early(escalation, np.where(signals >= threshold, threshold, np.nan), self.gears.metrics.settled)

    def expire(self, escalation):
        """An escalation's deadline: its rows still waiting for big are answered now with little's answer at
        the highest gear T their signal clears (the gears' budget holds at every gear), so a burst big has
        not caught up with costs those rows that gear's expected drop instead of the latency target."""
        if escalation.deadline is not None:
            escalation.deadline.cancel()  # when called before its timer (a dropped call, a late start)
            escalation.deadline = None
        if escalation in self.waiting:
            signals = escalation.answers.confidence[escalation.pending]
            self._answer_early(escalation, self.gears.highest_cleared(signals), self.gears.metrics.deadline, late=True)

    def _after_decision(self, before):
        if self.gears.gear > before:
            self.shed(self.gears.threshold)

    def _arm_ticker(self):
        if self.ticker is None and self.waiting:
            self.ticker = asyncio.get_running_loop().call_later(self.gears.interval_s, self._tick)

    def _tick(self):
        """While escalations wait for big the gears reconsider every interval even when no request arrives
        here (the pooled view may show a miss in other instances' answers)."""
        self.ticker = None
        if self.waiting:
            before = self.gears.gear
            self.gears.decide(time.monotonic())
            self._after_decision(before)
            self._arm_ticker()

    def _drop_after_s(self, escalation):
        """Seconds to the escalation's deadline (<= 0: past it) when every row still open would be answered
        at the deadline anyway (adaptive, clearing the last gear): big's queue may drop the call then
        instead of big computing it. None otherwise: the call waits up to child_timeout_ms."""
        if not self.gears.deadline_s:
            return None
        if self.child_timeout_s and self.gears.deadline_s >= self.child_timeout_s:
            return None  # big's queue would drop it at the child timeout, not at the deadline
        pending = escalation.pending
        answerable = escalation.adaptive & (escalation.answers.confidence[pending] >= self.gears.thresholds[-1])
        if not (answerable | ~escalation.open[pending]).all():
            return None
        return escalation.started + self.gears.deadline_s - time.monotonic()

    def _answer_early(self, escalation, thresholds, metric, late=False):
        """Little answers the escalation's open, adaptive pending rows whose ``thresholds`` (per pending row;
        NaN: not this one) is set, at that T; the requests whose rows are all settled leave now. ``late``: the
        gears count them as late answers (the deadline's: big would have been late)."""
        answers, pending = escalation.answers, escalation.pending
        settle = escalation.open[pending] & escalation.adaptive & ~np.isnan(thresholds)
        if not settle.any():
            return
        rows = pending[settle]
        self.gears.reanswered(answers.thresholds[rows, 0], thresholds[settle])
        answers.thresholds[rows, 0] = thresholds[settle]
        escalation.open[rows] = False
        self.counters.add(self.cascade.metrics.rows[0], len(rows))
        self.counters.add(metric, len(rows))
        done = self.cascade.responses(escalation)
        for wait, answer in done:
            self.cascade.replies.send(wait.sender, answer)
        escalation.early += len(done)
        self.gears.answered(escalation.started, len(done), time.monotonic(), late)
        if not escalation.waiting:
            self._unobserve(escalation)  # nothing of it waits for big any more

    def _unobserve(self, escalation):
        if escalation.observed:
            escalation.observed = False
            self.gears.escalation_ended(escalation.started)
