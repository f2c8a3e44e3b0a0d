"""Answers as Triton responses: the outputs of some rows, error answers with their codes, sending and
counting them."""

import numpy as np
import triton_python_backend_utils as pb_utils

from .config import (
    ANSWER_OF_TASK,
    CLASS,
    CONFIDENCE,
    PROBS,
    ROUTE,
    THRESHOLD,
    RequestError,
)
from .rows import ChildError


def response(answers, rows, want_probs):
    """The response of the rows ``rows`` (a slice) of ``answers``."""
    label = answers.label[rows]
    name = ANSWER_OF_TASK[answers.task]  # CLASS [1], LABELS [C] or MASK [H, W] per row
    outputs = [
        pb_utils.Tensor(name, label.reshape(-1, 1) if name == CLASS else np.ascontiguousarray(label)),
        pb_utils.Tensor(CONFIDENCE, answers.confidence[rows].astype(np.float32).reshape(-1, 1)),
        pb_utils.Tensor(ROUTE, answers.route[rows].reshape(-1, 1)),
        pb_utils.Tensor(THRESHOLD, answers.thresholds[rows]),
    ]
    if want_probs:
        outputs.append(pb_utils.Tensor(PROBS, np.ascontiguousarray(answers.probs[rows])))
    return pb_utils.InferenceResponse(output_tensors=outputs)


class Replies:
    """Error answers, sends and the request counters (``counters``: Counters, ``metrics``: GateMetrics)."""

    def __init__(self, counters, metrics):
        self.counters = counters
        self.metrics = metrics

    def error(self, err):
        """The error answer for a RequestError (INVALID_ARG), a ChildError (UNAVAILABLE), or the gate's own
        failure (INTERNAL)."""
        message = str(err)
        if isinstance(err, RequestError):
            cause, code = "request", pb_utils.TritonError.INVALID_ARG
        elif isinstance(err, ChildError):
            cause, code = err.stage.role, pb_utils.TritonError.UNAVAILABLE
        else:
            cause, code, message = "gate", pb_utils.TritonError.INTERNAL, f"the gate failed: {err!r}"
        self.counters.add(self.metrics.errors[cause])
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def count(self, answer):
        """``answer`` (a response) is on its way back: count it."""
        self.counters.add(self.metrics.error if answer.has_error() else self.metrics.ok)
        return answer

    def send(self, sender, answer):
        """Send one request's final response through its sender (a non-decoupled model may send it instead
        of returning it, also after execute returned: it leaves at once, not with its batch)."""
        try:
            sender.send(answer, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # noqa: BLE001 - that request is lost; the others sent with it still leave
            pb_utils.Logger.log_error(f"littlebig: sending a response failed: {err!r}")
            if not answer.has_error():  # an error answer was counted by its cause already
                self.counters.add(self.metrics.errors["gate"])
            self.counters.add(self.metrics.error)
            return
        self.count(answer)
