"""Escalations held in the gate for big, one call in flight (gears with one gate instance)."""

import asyncio

import numpy as np

from .rows import ChildError


class Held:
    """With gears and one gate instance, escalations wait for big here, one call in flight, instead of
    in big's queue: a step down can still settle their rows before big spends anything on them (the
    call in flight is computed whatever happens), and the open rows of all the escalations held leave
    together in the next call (up to ``max_rows``), as big's own batcher would have taken them. With
    several gate instances each would hold its rows while big takes another instance's call, so held
    rows would miss the batch big takes next: there escalations go to big at once, as without gears."""

    def __init__(self, stage, infer, max_rows):
        self.stage = stage
        self.infer = infer  # async (stage, inputs, want_probs) -> ChildAnswer, raising ChildError
        self.max_rows = max_rows
        self.queue = []  # (escalation, want_probs, future of its answer)
        self.call = None  # the task of the call in flight

    def run(self, escalation, want_probs):
        """A future of big's answer on the escalation's open rows at the time its call leaves (None when
        a step down settled all of them first); the escalation is narrowed to those rows."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((escalation, want_probs, future))
        self._next()
        return future

    def _next(self):
        if self.call is not None:
            return
        batch, rows = [], 0
        while self.queue:
            escalation, want_probs, future = self.queue[0]
            still = escalation.open[escalation.pending]
            if not still.any():
                self.queue.pop(0)
                future.set_result(None)
                continue
            if batch and rows + int(still.sum()) > self.max_rows:
                break
            self.queue.pop(0)
            escalation.narrow(still)
            batch.append((escalation, want_probs, future))
            rows += len(escalation.pending)
        if batch:
            self.call = asyncio.ensure_future(self._call(batch))

    async def _call(self, batch):
        try:
            parts = [escalation.inputs for escalation, _, _ in batch]
            inputs = parts[0] if len(parts) == 1 else [np.concatenate(columns) for columns in zip(*parts)]
            answer = await self.infer(self.stage, inputs, any(want for _, want, _ in batch))
            start = 0
            for escalation, _, future in batch:
                future.set_result(answer.rows(slice(start, start + len(escalation.pending))))
                start += len(escalation.pending)
        except Exception as err:  # noqa: BLE001 - every escalation of the call must hear of it
            failure = err if isinstance(err, ChildError) else ChildError(self.stage, repr(err))
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        finally:
            self.call = None
            self._next()

