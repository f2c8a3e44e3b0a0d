"""Little-Big gate: a Triton Python-backend model serving a cascade of K >= 2 stages (paper Eq. 4, Eq. 7).

Stage 0 (`little`) answers every row; rows whose gating signal is below T_0 go to stage 1 in one BLS
call per batch, those still below T_1 to stage 2, and so on; the last stage (`big`) answers the rest.
With two stages and an ensemble weight w < 1 an escalated row's answer is (1 - w) p_little + w p_big
(Eq. 8). Clients call the ensemble `littlebig`, whose last step is this model. Stage 0 runs as the
step before it, which hands its answer over as inputs LITTLE_CLASS, LITTLE_CONFIDENCE, LITTLE_PROBS, or
inside this process with onnxruntime (`little_in_gate`). Parameters: config.GateConfig. Request parameters: `threshold` (two
stages) or `thresholds` ("T1,T2,...") override the config's for that request, `on_big_failure` ("fail"
or "little") the config's; any other is refused.

Threads. A batch whose rows stage 0 all answers is answered by a plain `execute` on the stub's main
thread. A batch with unsure rows returns a coroutine, which the stub runs on its event loop: it sends
the answered requests' responses, starts the later stages as a task on that loop and returns; each
waiting request gets its response through its sender when its rows are settled (Triton lets a
non-decoupled model send its one response after execute returned). Every BLS call and response send
happens on the event loop: with sends and BLS calls from two threads (big on a thread pool, or a
synchronous execute calling little while the loop called big) tritonserver 2.51 crashed under load.
The gears (adaptive.py) decide on the loop too, so with them every execute runs there.

Errors: a bad request gets INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400); a failing or timed-out stage
UNAVAILABLE, or with on_big_failure=little the previous stage's answer and ROUTE = K + k; the gate's
own failure INTERNAL. The littlebig_* metrics (metrics.py) count them.
"""

import asyncio
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from .adaptive import Adaptive
from .audit import FLUSH_S, Audit, AuditMetrics, rows_of
from .cascade import Cascade
from .children import Children, LocalStage, Reader
from .config import ConfigError, GateConfig, RequestError, stage_roles
from .metrics import Counters, GateMetrics, audit_families, gear_metrics
from .requests import Parser, first_inputs, input_specs
from .responses import Replies, response
from .rows import Answers, Batch, ChildError, Escalation, Stage, Waiting


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        try:
            self.config = config = GateConfig.from_parameters(params)
        except ConfigError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        roles = stage_roles(len(config.stage_models))
        self.stages = tuple(Stage(k, name, roles[k], macs) for k, (name, macs) in enumerate(zip(config.stage_models, config.stage_macs)))
        self.counters = Counters(config.metrics_interval_ms / 1000.0)
        self.metrics = GateMetrics(args["model_name"], self.stages, config.thresholds)
        self.replies = Replies(self.counters, self.metrics)
        self.reader = Reader(config)
        specs = input_specs(model_config)
        self.parser = Parser(config, specs, self._first_names(model_config, config))
        children = Children(self.reader, [spec.name for spec in specs], config.child_timeout_ms / 1000.0)
        self.cascade = Cascade(config, self.stages, children, self.reader, self.replies)
        self.local = None
        if config.little_in_gate:
            # args["model_repository"] is this model's folder; the path is relative to the repository.
            path = os.path.join(os.path.dirname(args["model_repository"]), config.little_onnx)
            self.local = LocalStage(self.stages[0], path, config.little_intra_op_threads, self.reader)
        self.audit = self._audit(args["model_name"], children) if config.audit_rate else None
        self.cascade.audit = self.audit
        self.adaptive = None
        if config.adaptive:
            self._gear_families = []  # alive as long as their metrics
            metrics = gear_metrics(args["model_name"], args["model_instance_name"], config.gears, self._gear_families)
            instances = sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [])) or 1
            self.adaptive = Adaptive(config, self.cascade, metrics, args["model_name"], instances,
                                     int(model_config["max_batch_size"]), pb_utils.Logger.log_warn)

    def _audit(self, model_name, children):
        """The audit (audit.py); its per-bin counts reach /metrics every FLUSH_S, not every metrics interval."""
        self._audit_families = []  # alive as long as their metrics
        metrics = AuditMetrics(audit_families(self._audit_families), {"model": model_name}, self.config)
        counters = Counters(max(self.config.metrics_interval_ms / 1000.0, FLUSH_S))
        return Audit(self.config, self.stages[-1], children, counters, metrics)

    @staticmethod
    def _first_names(model_config, config):
        """Stage 0's answer as inputs (little as the step before); the outputs the gate reads must all be there."""
        names = first_inputs(model_config)
        if not config.little_in_gate:
            needed = Reader(config).wanted(want_probs=True)
            if set(needed) - set(names):
                raise pb_utils.TritonModelException(
                    f"little is the step before the gate: the gate must declare stage 0's outputs as inputs "
                    f"{', '.join('LITTLE_' + n for n in needed)}; it declares {', '.join(names.values()) or 'none'}"
                )
        return names

    def finalize(self):
        self.counters.flush()  # the last interval's counts; the timer does not outlive the instance
        if self.audit is not None:
            self.audit.counters.flush()
        if self.adaptive is not None:
            self.adaptive.close()

    def execute(self, requests):
        # The first execute runs on the stub's event loop to learn it (the counters' timer runs there).
        if self.adaptive is not None or self.counters.loop is None:
            return self._on_loop(requests)
        batch = self._prepare(requests, self.config.thresholds)
        if batch.accepted:
            self._run_first(batch)
        return self._route(batch, time.monotonic())

    async def _on_loop(self, requests):
        if self.counters.loop is None:
            self.counters.attach(asyncio.get_running_loop())
            if self.audit is not None:
                self.audit.counters.attach(self.counters.loop)
        now = time.monotonic()
        started = self.adaptive.start(now) if self.adaptive is not None else now
        batch = self._prepare(requests, self.adaptive.in_force if self.adaptive is not None else self.config.thresholds)
        if batch.accepted:
            if self.local is not None and self.cascade.tasks:
                # Little in the gate while escalations are in flight: on an executor thread, so the loop keeps
                # calling big and sending answers meanwhile (onnxruntime releases the GIL; no Triton call there).
                await asyncio.get_running_loop().run_in_executor(None, self._run_first, batch)
            else:
                self._run_first(batch)
        result = self._route(batch, started)
        return await result if asyncio.iscoroutine(result) else result

    def _prepare(self, requests, applied):
        """Parse every request (``applied``: the thresholds for those that send none of their own)."""
        responses, accepted = [None] * len(requests), []
        for index, request in enumerate(requests):
            try:
                accepted.append((index, self.parser.parse(request, applied)))
            except RequestError as err:
                responses[index] = self.replies.error(err)
        return Batch(requests, responses, accepted, applied)

    def _run_first(self, batch):
        """Stage 0's answer on the batch: as the ensemble handed it over, or run here."""
        keep_probs = batch.keep_probs or self.cascade.blend
        if self.local is None:
            batch.first = self.reader.answer(batch.first_output, keep_probs)
            return
        try:
            batch.first, seconds = self.local.run(batch.arrays(), keep_probs)
        except ChildError as err:
            batch.failure = err
            return
        self.counters.add(self.metrics.in_gate_seconds, seconds)

    def _route(self, batch, started):
        """Answer the requests stage 0 settles; the rest wait for the later stages. Returns the responses,
        or (some rows unsure) a coroutine for the event loop."""
        requests, responses, accepted = batch.requests, batch.responses, batch.accepted
        gears = self.adaptive.gears if self.adaptive is not None else None
        if batch.failure is not None:
            for index, _ in accepted:
                responses[index] = self.replies.error(batch.failure)
            if gears:
                gears.answered(started, len(accepted), time.monotonic())
        if not accepted or batch.failure is not None:
            return [self.replies.count(r) for r in responses]
        if gears:
            if self.local is not None:
                gears.little_answered(time.monotonic())
            gears.adapted(sum(n for n, (_, a) in zip(batch.counts, accepted) if not a.pinned), batch.applied[0])

        first = batch.first
        keep_probs = batch.keep_probs or self.cascade.blend
        answers = Answers(first.label, first.confidence, np.zeros(len(first.confidence), dtype=np.int32),
                          first.probs if keep_probs else None, self.config.task, batch.thresholds)
        unsure = self.cascade.unsure(self.stages[0], first, batch.thresholds)
        pending = np.flatnonzero(unsure)
        self.counters.add(self.metrics.rows[0], len(unsure) - len(pending))
        self.counters.add(self.metrics.macs, len(unsure) * self.stages[0].macs)
        waiting = []  # the requests with a row for a later stage
        for (index, request), rows in zip(accepted, batch.rows_of):
            if unsure[rows].any():
                waiting.append(Waiting(requests[index].get_response_sender(), rows, request.want_probs, request.on_big_failure))
            else:
                responses[index] = response(answers, rows, request.want_probs)
        if gears:
            gears.answered(started, len(accepted) - len(waiting), time.monotonic())
        audit = self._audit_begin(batch, unsure)
        if not waiting:
            if audit is not None and audit.inputs is not None:
                return self._answer_then_audit(batch, audit)
            return [self.replies.count(r) for r in responses]  # one message back for the whole batch
        # Fancy indexing copies the rows out of the requests' input buffers, which Triton may free once
        # execute returns.
        adaptive = np.repeat([not a.pinned for _, a in accepted], batch.counts)[pending]
        escalation = Escalation([x[pending] for x in batch.arrays()], pending, batch.thresholds[pending], waiting, unsure,
                                answers, adaptive, started, audit=audit)
        return self._escalate(batch, escalation)

    async def _escalate(self, batch, escalation):
        """On the event loop: what is decided leaves now; the later stages run as a task."""
        try:
            for request, answer in zip(batch.requests, batch.responses):
                if answer is not None:
                    self.replies.send(request.get_response_sender(), answer)
            self.cascade.launch(escalation)
            if self.adaptive is not None and self.adaptive.gears.threshold < batch.applied[0]:
                self.adaptive.shed(self.adaptive.gears.threshold)  # stepped down while little ran: this batch's rows too
        finally:
            if escalation.audit is not None:
                self.audit.launch(escalation.audit)  # after the answers that could leave: no client waits for it
        return None

    def _audit_begin(self, batch, unsure):
        """The batch's audit (audit.py), or None (audit off, or the batch skipped)."""
        if self.audit is None:
            return None
        gears_down = self.adaptive is not None and (self.adaptive.gears.gear > 0 or bool(self.adaptive.held and self.adaptive.held.queue))
        return self.audit.begin(batch.first.confidence, batch.first.label, unsure, lambda rows: rows_of(batch, rows), gears_down)

    async def _answer_then_audit(self, batch, audit):
        """On the event loop: every answer of the batch leaves, then the audit's call to big."""
        try:
            for request, answer in zip(batch.requests, batch.responses):
                self.replies.send(request.get_response_sender(), answer)
        finally:
            self.audit.launch(audit)
        return None
