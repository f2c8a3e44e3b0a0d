"""The gate's littlebig_* metrics on Triton's /metrics, and the counters that feed them in batches."""

import threading

import triton_python_backend_utils as pb_utils

from .gears import GearMetrics

# Metric kinds by name: pb_utils.MetricFamily exists only once the stub runs the model (not while Triton
# imports model.py to complete its config).
COUNTER, GAUGE = "COUNTER", "GAUGE"

FAMILIES = (
    ("littlebig_requests_total", "Inference requests the gate answered (ok) or refused (error)", COUNTER),
    ("littlebig_rows_total", "Rows answered, by the stage that answered them", COUNTER),
    ("littlebig_macs_total", "Multiply-accumulates spent (each stage on the rows it ran on); divided by "
     "littlebig_rows_total it is the live cost per row (paper Eq. 5)", COUNTER),
    ("littlebig_threshold", "Threshold in force (config value; requests may override it); cascades of more "
     "than two stages label it by stage", GAUGE),
    ("littlebig_errors_total", "Error answers by cause: request (client mistake, INVALID_ARG), the stage that "
     "failed or timed out (UNAVAILABLE), or gate (its own failure, INTERNAL)", COUNTER),
    ("littlebig_fallback_rows_total", "Rows answered by the previous stage because a stage failed "
     "(on_big_failure=little, ROUTE = K + k)", COUNTER),
    ("littlebig_in_gate_seconds_total", "Seconds spent running a stage inside the gate's process "
     "(little in the gate); the rest of the gate's compute time is its own", COUNTER),
)

GEAR_FAMILIES = (
    ("littlebig_gear", "Gear in force (0: the config T; higher: lower T), per gate instance", GAUGE),
    ("littlebig_gear_threshold", "T of the gear in force, per gate instance", GAUGE),
    ("littlebig_gear_seconds_total", "Seconds spent in each gear, per gate instance", COUNTER),
    ("littlebig_gear_accuracy_cost_total", "Expected answers lost against the config T: each row answered in a "
     "lower gear adds that gear's calibrated drop; divided by littlebig_rows_total it is the expected accuracy drop",
     COUNTER),
    ("littlebig_gear_settled_rows_total", "Rows waiting for big that a step down of the gears answered at once "
     "with little's answer at the new T", COUNTER),
    ("littlebig_gear_deadline_rows_total", "Rows still waiting for big at the deadline (gear_deadline_ms) "
     "answered with little's answer at the highest gear T their signal clears", COUNTER),
    ("littlebig_gear_dropped_rows_total", "Rows whose call big's queue dropped at their deadline: the deadline "
     "answered them and big never computed them", COUNTER),
)


AUDIT_FAMILIES = (
    ("littlebig_audit_rate", "Share of the rows little answers that the audit also sends to big (audit_rate)", GAUGE),
    ("littlebig_audit_promise", "The calibrated level the live bound on answers differing from big's is checked "
     "against (audit_promise: the promised drop when T was certified without labels; 0: none)", GAUGE),
    ("littlebig_audit_covered_rows_total", "Rows of the batches the audit covered: each row little answered "
     "there had its chance audit_rate of being audited, and every audited one got big's answer", COUNTER),
    ("littlebig_audit_skipped_rows_total", "Rows of the batches the audit skipped, by reason: busy (audit calls in "
     "flight at audit_in_flight), gears (below gear 0), failed (big dropped or failed a call)", COUNTER),
    ("littlebig_audit_rows_total", "Rows little answered that the audit sent to big (in covered batches)", COUNTER),
    ("littlebig_audit_disagree_rows_total", "Audited rows whose answer (little's) differs from big's; divided by "
     "audit_rate x covered rows it estimates the share of answers that differ from big's", COUNTER),
    ("littlebig_audit_kept_rows_total", "Audited rows by little's signal bin (lower edge)", COUNTER),
    ("littlebig_audit_kept_differ_total", "Audited rows whose answer differs from big's, by little's signal bin", COUNTER),
    ("littlebig_audit_escalated_rows_total", "Escalated rows of covered batches, by little's signal bin", COUNTER),
    ("littlebig_audit_escalated_differ_total", "Escalated rows of covered batches where little's class differs from "
     "big's, by little's signal bin", COUNTER),
)


class Counters:
    """The gate's counts, kept here and handed to Triton at most once per interval.

    Every Metric.increment is a synchronous round trip to the server process; at two to four per
    execution they were a measurable part of the gate's own time. Counts come from the stub's main
    thread (execute) and its event loop thread (escalations); a timer on the event loop (the thread of
    every BLS call and response send) hands them over, so /metrics lags the answers by at most the
    interval and no count is lost. Until ``attach`` names the loop, counts wait.
    """

    def __init__(self, interval_s):
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.pending = {}  # metric -> amount not yet handed to Triton
        self.armed = False
        self.loop = None

    def attach(self, loop):
        self.loop = loop
        self._wake()

    def add(self, metric, amount=1):
        if amount:
            with self.lock:
                self.pending[metric] = self.pending.get(metric, 0) + amount
            self._wake()

    def _wake(self):
        with self.lock:
            if self.armed or self.loop is None or not self.pending:
                return
            self.armed = True
        self.loop.call_soon_threadsafe(self.loop.call_later, self.interval_s, self.flush)

    def flush(self):
        with self.lock:
            pending, self.pending, self.armed = self.pending, {}, False
        for metric, amount in pending.items():
            metric.increment(amount)


class GateMetrics:
    """The gate's metric families and the metrics it counts into, labelled with its model name."""

    def __init__(self, model_name, stages, thresholds):
        self.families = {name: _family(name, text, kind) for name, text, kind in FAMILIES}
        self.model_name = model_name
        self.ok = self._metric("littlebig_requests_total", status="ok")
        self.error = self._metric("littlebig_requests_total", status="error")
        self.rows = [self._metric("littlebig_rows_total", route=stage.role) for stage in stages]
        self.macs = self._metric("littlebig_macs_total")
        if len(stages) == 2:
            self._metric("littlebig_threshold").set(thresholds[0])
        else:
            for stage, threshold in zip(stages, thresholds):
                self._metric("littlebig_threshold", stage=stage.role).set(threshold)
        causes = ["request", "gate"] + [stage.role for stage in stages]
        self.errors = {cause: self._metric("littlebig_errors_total", cause=cause) for cause in causes}
        self.fallback = self._metric("littlebig_fallback_rows_total")
        self.in_gate_seconds = self._metric("littlebig_in_gate_seconds_total", stage=stages[0].role)

    def _metric(self, family, **labels):
        return self.families[family].Metric(labels={"model": self.model_name, **labels})


def gear_metrics(model_name, instance, ladder, keep):
    """The gears' metrics of one gate instance; their families are appended to ``keep`` (alive as long
    as their metrics)."""
    families = [_family(name, text, kind) for name, text, kind in GEAR_FAMILIES]
    keep.extend(families)

    def metric(family, **labels):
        return family.Metric(labels={"model": model_name, "instance": instance, **labels})

    metrics = GearMetrics(
        metric(families[0]), metric(families[1]),
        [metric(families[2], gear=str(k), threshold=repr(t)) for k, (t, _) in enumerate(ladder)],
        metric(families[3]), metric(families[4]), metric(families[5]), metric(families[6]),
    )
    metrics.gear.set(0)
    metrics.threshold.set(ladder[0][0])
    return metrics


def audit_families(keep):
    """The audit's metric families by name; appended to ``keep`` (alive as long as their metrics)."""
    families = {name: _family(name, text, kind) for name, text, kind in AUDIT_FAMILIES}
    keep.extend(families.values())
    return families


def _family(name, description, kind):
    return pb_utils.MetricFamily(name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind))
