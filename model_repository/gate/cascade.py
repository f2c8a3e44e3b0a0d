"""The later stages: the rows stage 0 left unsure go to stage 1 in one call, those still unsure to
stage 2, and so on; the last stage answers the rest (paper Eq. 4 and Eq. 7). Each waiting request is
answered as soon as all its rows are settled. Runs as a task on the stub's event loop, the thread of
every BLS call and response send: execute returns without waiting for it."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from .responses import response
from .rows import ChildError


class Cascade:
    """Stages 1 .. K-1 of a gate (``stages``: all K), asked through ``children``."""

    def __init__(self, config, stages, children, reader, replies):
        self.stages = stages
        self.children = children
        self.reader = reader
        self.replies = replies
        self.counters, self.metrics = replies.counters, replies.metrics
        self.weight = config.ensemble_weight
        self.blend = config.ensemble_weight != 1.0  # Eq. 8: escalated rows blend little's and big's probabilities
        self.adaptive = None  # the gears (adaptive.Adaptive), when on
        self.audit = None  # the audit (audit.Audit), when on
        # Escalations still running after their execute returned; a strong reference keeps each task alive
        # until it ends (the event loop holds tasks only weakly). Triton keeps an instance until every
        # response it owes is sent, so finalize need not wait for them.
        self.tasks = set()

    def unsure(self, stage, answer, thresholds):
        """Rows the stage leaves to the next one: signal < T_k (float64, so T means exactly the number sent)."""
        if stage.index == len(self.stages) - 1:
            return np.zeros(len(answer.confidence), dtype=bool)
        return answer.confidence < thresholds[:, stage.index]

    def launch(self, escalation):
        """Run the later stages for ``escalation`` as a task on the running event loop."""
        later = self._escalate(escalation)
        if self.adaptive is not None:
            later = self.adaptive.observe(escalation, later)
        task = asyncio.create_task(later)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _escalate(self, escalation):
        """Whatever fails (not a stage: the gate's own code, a send), every request still waiting gets an
        answer: nothing awaits this task."""
        try:
            await self._run_stages(escalation)
        except Exception as err:  # noqa: BLE001 - answered below, logged, counted (cause gate)
            pb_utils.Logger.log_error(f"littlebig: escalation failed: {err!r}")
            failed, escalation.waiting = escalation.waiting, []
            for wait in failed:
                self.replies.send(wait.sender, self.replies.error(err))
        finally:
            if self.audit is not None:
                self.audit.ended(escalation.audit)

    async def _run_stages(self, escalation):
        for stage in self.stages[1:]:
            if not escalation.waiting:
                return  # every request answered (by the previous stage, or early by the gears): no call
            want_probs = self.blend or any(wait.want_probs for wait in escalation.waiting)
            try:
                if self.adaptive is not None and stage is self.stages[-1]:
                    answer = await self.adaptive.call_last(escalation, stage, want_probs)
                    if answer is None:  # the gears answered every row first
                        return
                else:
                    answer = await self.children.infer(stage, escalation.inputs, want_probs)
            except ChildError as err:
                if err.dropped:  # big's queue dropped a call whose rows the deadline answers
                    self.adaptive.dropped(escalation)
                while escalation.waiting:  # each leaves once its answer is built (if one fails, _escalate answers the rest)
                    answer = self._fallback(escalation.waiting[0], escalation.answers, escalation.open, stage, err)
                    self.replies.send(escalation.waiting.pop(0).sender, answer)
                return
            for wait, answer in self._settle(stage, answer, escalation):
                self.replies.send(wait.sender, answer)

    def _settle(self, stage, answer, escalation):
        """Record a stage's answer on the pending rows still open (the gears may have settled some
        meanwhile); narrow the escalation to the rows it leaves unsure. Returns (waiting, response) of the
        requests it settled."""
        answers, pending = escalation.answers, escalation.pending
        if self.blend:  # Eq. 8 (two stages): the blend decides the class and the confidence
            answer = self.reader.of_probs((1.0 - self.weight) * answers.probs[pending] + self.weight * answer.probs)
        still = escalation.open[pending]
        if self.audit is not None and stage is self.stages[-1]:
            self.audit.escalated(escalation.audit, pending, still, answer.label)
        unsure = self.unsure(stage, answer, escalation.thresholds) & still
        answers.fill(pending[still], answer if still.all() else answer.rows(still), stage.index)
        escalation.open[pending[still & ~unsure]] = False
        self.counters.add(self.metrics.rows[stage.index], int((still & ~unsure).sum()))
        self.counters.add(self.metrics.macs, len(pending) * stage.macs)
        responses = self.responses(escalation)
        if escalation.waiting:  # copies only what the next stage needs
            escalation.narrow(unsure)
        return responses

    @staticmethod
    def responses(escalation):
        """(wait, response) of the waiting requests whose rows are all settled, which leave the escalation;
        if building one fails they all stay, still owed an answer."""
        done = escalation.leave()
        try:
            return [(wait, response(escalation.answers, wait.rows, wait.want_probs)) for wait in done]
        except Exception:
            escalation.waiting = done + escalation.waiting
            raise

    def _fallback(self, wait, answers, open_rows, stage, err):
        """A stage failed: an error, or (on_big_failure=little) the previous stage's answer on the rows
        still open, with ROUTE = K + (that stage's index)."""
        if wait.on_big_failure != "little":
            return self.replies.error(err)
        rows = wait.rows
        fallback = open_rows[rows]
        route = np.where(fallback, len(self.stages) + stage.index - 1, answers.route[rows]).astype(np.int32)
        self.counters.add(self.metrics.fallback, int(fallback.sum()))
        probs = None if answers.probs is None else answers.probs[rows]
        kept = type(answers)(answers.label[rows], answers.confidence[rows], route, probs, answers.task, answers.thresholds[rows])
        return response(kept, slice(None), wait.want_probs)
