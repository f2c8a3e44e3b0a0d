"""The audit (opt-in, two stages): how often the answers little keeps differ from big's, on live traffic,
without labels. The drop in accuracy against big can never exceed that share (docs/calibration.md).

Per batch, before anything about its rows is known, the audit either covers the batch or skips it (its
calls in flight are at audit_in_flight, or the gears are below gear 0: the gears' overload must not be
made worse). In a covered batch each row little answers is sampled with probability audit_rate and sent
to big once every answer of the batch has left, as one BLS call on the stub's event loop whose wait in
big's queue is bounded by audit_timeout_ms (big's queue drops it before the escalations, which may wait
up to child_timeout_ms). The rows escalated to big need no extra call: big's answer is there. A covered
batch counts once both are in; if either is missing (the audit call dropped or failed, big failed on the
escalation, the gears answered an escalated row early) the whole batch counts as skipped, so whether a
batch counts never depends on its rows' answers.

So in the covered rows, the audited rows that differ from big's answer are a binomial count with
success probability audit_rate x (the share of rows whose served answer differs from big's): the
client's exact bound (client/audit.py) rests on that. The metrics also keep, by stage-0 signal bin,
the escalated rows and how many of them little would have got differently from big (all of them), and
the audited rows and how many of those differ, from which `littlebig calibrate --from-audit` chooses a
new T on the live distribution."""

import asyncio
import threading

import numpy as np

from .config import AUDIT_BINS, bin_label
from .rows import ChildError

SKIP_REASONS = ("busy", "gears", "failed")
# The audit's counts reach /metrics at most this often: a hand-over is a round trip to the server per
# metric, and the signal bins make up to a few hundred of them.
FLUSH_S = 1.0


def rows_of(batch, rows):
    """The inputs of the batch's rows ``rows`` (ascending), copied out of the requests' own buffers."""
    parts = []
    for (_, accepted), where in zip(batch.accepted, batch.rows_of):
        local = rows[(rows >= where.start) & (rows < where.stop)] - where.start
        if len(local):
            parts.append([x[local] for x in accepted.arrays])
    return [np.concatenate(columns) for columns in zip(*parts)]


class AuditBatch:
    """One covered batch's part in the audit: its rows' signal bins and little's classes, which rows
    little kept, the kept rows sampled for big, and big's classes on those and on the escalated rows."""

    def __init__(self, bins, little, kept, sampled):
        self.bins, self.little, self.kept, self.sampled = bins, little, kept, sampled
        self.inputs = None  # the sampled rows' inputs, copied out of the requests, until the call leaves
        self.big_sampled = None if len(sampled) else np.zeros(0, dtype=np.int64)
        self.big_escalated = None if (~kept).any() else np.zeros(0, dtype=np.int64)
        self.failed = None  # why the batch does not count
        self.done = False
        self.lock = threading.Lock()  # the parts arrive on the stub's main thread and on its event loop

    def complete(self):
        """True once, when both parts are in (or one failed): the caller then records the batch."""
        with self.lock:
            if self.done or (self.failed is None and (self.big_sampled is None or self.big_escalated is None)):
                return False
            self.done = True
            return True


class Audit:
    """The audit of one gate instance: samples, calls big, counts into ``metrics`` (AuditMetrics)."""

    def __init__(self, config, big, children, counters, metrics, seed=None):
        self.rate = config.audit_rate
        self.limit = config.audit_in_flight
        self.queue_s = (config.audit_timeout_ms or config.child_timeout_ms) / 1000.0 or None
        self.big, self.children = big, children
        self.counters, self.metrics = counters, metrics
        self.rng = np.random.default_rng(seed)
        self.in_flight = 0  # audit calls reserved or running
        self.lock = threading.Lock()
        self.tasks = set()  # strong references: the loop holds tasks only weakly

    def begin(self, signal, little, unsure, take, gears_down):
        """The batch's audit, or None when it is skipped (counted). ``signal``, ``little``: stage 0's signal
        and class per row; ``unsure``: the rows escalated; ``take(rows)``: those rows' inputs, copied."""
        count = len(signal)
        with self.lock:
            reason = "gears" if gears_down else ("busy" if self.in_flight >= self.limit else None)
            if reason is None:
                self.in_flight += 1  # reserved before the coins: covering a batch never depends on its rows
        if reason is not None:
            self.counters.add(self.metrics.skipped[reason], count)
            return None
        kept = ~unsure
        sampled = np.flatnonzero(kept & (self.rng.random(count) < self.rate))
        bins = np.minimum((np.asarray(signal, dtype=np.float64) * AUDIT_BINS).astype(np.int64), AUDIT_BINS - 1)
        # A copy: the batch's answers (rows.Answers) start as this very array and big's classes overwrite
        # the escalated rows before the batch is recorded.
        batch = AuditBatch(np.maximum(bins, 0), np.array(little), kept, sampled)
        if len(sampled):
            batch.inputs = take(sampled)  # a copy: Triton may free the requests' buffers once execute returns
        else:
            self._release()
        self._maybe_record(batch)
        return batch

    def launch(self, batch):
        """On the event loop, once the batch's answers have left: big's answer on the sampled rows."""
        if batch is not None and batch.inputs is not None:
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _call(self, batch):
        inputs, batch.inputs = batch.inputs, None
        try:
            answer = await self.children.infer(self.big, inputs, False, self.queue_s)
            batch.big_sampled = answer.label
        except ChildError:  # dropped from big's queue under load, or big failed: the batch does not count
            batch.failed = "failed"
        except Exception:  # noqa: BLE001 - never let the audit disturb serving; the batch does not count
            batch.failed = "failed"
        finally:
            self._release()
        self._maybe_record(batch)

    def escalated(self, batch, pending, still, label):
        """Big answered the escalation: ``label`` on the rows ``pending`` (those ``still`` open)."""
        if batch is None or batch.big_escalated is not None:
            return
        if still.all() and np.array_equal(pending, np.flatnonzero(~batch.kept)):
            batch.big_escalated = np.asarray(label)
        else:  # the gears answered some rows early: those were served little's answer at a lower T
            batch.failed = batch.failed or "gears"
        self._maybe_record(batch)

    def ended(self, batch):
        """The escalation is over: without big's answer on it (big failed, the gears answered it) the batch
        does not count."""
        if batch is not None and batch.big_escalated is None:
            batch.failed = batch.failed or "failed"
            self._maybe_record(batch)

    def _release(self):
        with self.lock:
            self.in_flight -= 1

    def _maybe_record(self, batch):
        if not batch.complete():
            return
        add, metrics = self.counters.add, self.metrics
        if batch.failed is not None:
            add(metrics.skipped[batch.failed], len(batch.bins))
            return
        add(metrics.covered, len(batch.bins))
        escalated = np.flatnonzero(~batch.kept)
        differ = batch.little[batch.sampled] != batch.big_sampled
        add(metrics.audited, len(batch.sampled))
        add(metrics.disagree, int(differ.sum()))
        self._bins(metrics.kept_rows, batch.bins[batch.sampled])
        self._bins(metrics.kept_differ, batch.bins[batch.sampled][differ])
        self._bins(metrics.escalated_rows, batch.bins[escalated])
        self._bins(metrics.escalated_differ, batch.bins[escalated][batch.little[escalated] != batch.big_escalated])

    def _bins(self, metrics, bins):
        counts = np.bincount(bins, minlength=AUDIT_BINS)
        for k in np.flatnonzero(counts):
            self.counters.add(metrics[k], int(counts[k]))


class LazyMetric:
    """A metric created on its first increment (on the event loop, where the counters are handed over):
    only the signal bins that see rows become series."""

    def __init__(self, family, labels):
        self.family, self.labels, self.metric = family, labels, None

    def increment(self, amount):
        if self.metric is None:
            self.metric = self.family.Metric(labels=self.labels)
        self.metric.increment(amount)


class AuditMetrics:
    """The audit's metrics of a gate (``families``: name -> MetricFamily, ``labels``: the model's)."""

    def __init__(self, families, labels, config):
        def metric(name, **more):
            return families[name].Metric(labels={**labels, **more})

        metric("littlebig_audit_rate").set(config.audit_rate)
        metric("littlebig_audit_promise").set(config.audit_promise)
        self.covered = metric("littlebig_audit_covered_rows_total")
        self.skipped = {reason: metric("littlebig_audit_skipped_rows_total", reason=reason) for reason in SKIP_REASONS}
        self.audited = metric("littlebig_audit_rows_total")
        self.disagree = metric("littlebig_audit_disagree_rows_total")

        def binned(name):
            return [LazyMetric(families[name], {**labels, "bin": bin_label(k)}) for k in range(AUDIT_BINS)]

        self.kept_rows, self.kept_differ = binned("littlebig_audit_kept_rows_total"), binned("littlebig_audit_kept_differ_total")
        self.escalated_rows = binned("littlebig_audit_escalated_rows_total")
        self.escalated_differ = binned("littlebig_audit_escalated_differ_total")
