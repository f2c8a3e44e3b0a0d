"""The stages as the gate asks them: later stages over BLS, stage 0 in the gate's own process (little
in the gate), and their answers read as ChildAnswer (class, gating signal, PROBS when asked)."""

import asyncio
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from .config import CLASS, CONFIDENCE, MASK, MULTILABEL_CUT, PROBS
from .rows import ChildAnswer, ChildError
from .signals import FORMULAS

QUEUE_TIMEOUT = "Request timeout expired"  # Triton's error for a call dropped from a queue at its timeout


class Reader:
    """Turns a stage's outputs into a ChildAnswer, reading only what is needed: with the in-graph top-1
    (CLASS and CONFIDENCE beside PROBS) and the max_softmax signal, PROBS only when asked for. Segmentation
    stages always answer MASK and CONFIDENCE (the image-level region confidence) in their graph."""

    def __init__(self, config):
        self.multilabel = config.task == "multilabel"
        self.segmentation = config.task == "segmentation"
        self.signal_of = FORMULAS.get(config.signal)  # None for segmentation: the graph computes it
        self.top1 = self.segmentation or (config.children_top1 and config.signal == "max_softmax" and not self.multilabel)
        self.label_name = MASK if self.segmentation else CLASS

    def wanted(self, want_probs):
        """The outputs to ask a stage for."""
        top1 = [self.label_name, CONFIDENCE] if self.top1 else []
        return top1 + ([PROBS] if want_probs or not top1 else [])

    def answer(self, output, want_probs):
        """The stage's answer from ``output(name)``, its output arrays."""
        if self.top1:  # copies: the answers are updated in place for escalated rows
            probs = output(PROBS) if want_probs else None
            confidence = output(CONFIDENCE)[:, 0].astype(np.float64)
            if self.segmentation:
                return ChildAnswer(np.array(output(MASK), dtype=np.int32), confidence, probs)
            return ChildAnswer(output(CLASS)[:, 0].astype(np.int64), confidence, probs)
        return self.of_probs(output(PROBS))

    def of_probs(self, probs):
        """Class (or multi-hot labels) and gating signal from a stage's probabilities."""
        if self.multilabel:
            label = (probs >= MULTILABEL_CUT).astype(np.int32)
        else:
            label = probs.argmax(axis=1).astype(np.int64)
        return ChildAnswer(label, self.signal_of(probs), probs)


class Children:
    """Calls of the later stages over BLS, each bounded by child_timeout_ms."""

    def __init__(self, reader, input_names, timeout_s):
        self.reader = reader
        self.input_names = input_names
        self.timeout_s = timeout_s

    async def infer(self, stage, inputs, want_probs, queue_s=None):
        """``stage``'s answer on ``inputs`` (numpy arrays in declared order); ``queue_s``: how long the call may
        wait in the stage's queue (default: child_timeout_ms). Raises ChildError."""
        tensors = [pb_utils.Tensor(name, x) for name, x in zip(self.input_names, inputs)]
        # The call's own timeout goes to Triton (its schedulers may drop a call queued past it); wait_for
        # bounds the wait whatever the child does (a stub stuck while executing).
        request = pb_utils.InferenceRequest(
            model_name=stage.model,
            requested_output_names=self.reader.wanted(want_probs),
            inputs=tensors,
            timeout=int((self.timeout_s if queue_s is None else max(queue_s, 1e-3)) * 1e6),
            # GPU children answer in GPU memory by default, which as_numpy() cannot read.
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        try:
            if self.timeout_s > 0:
                response = await asyncio.wait_for(request.async_exec(), self.timeout_s)
            else:
                response = await request.async_exec()
        except asyncio.TimeoutError:
            raise ChildError(stage, f"no answer within {self.timeout_s:g} s (child_timeout_ms)") from None
        except Exception as err:  # noqa: BLE001 - e.g. the model is not loaded
            raise ChildError(stage, str(err)) from None
        if response.has_error():
            err = ChildError(stage, response.error().message())
            err.dropped = queue_s is not None and QUEUE_TIMEOUT in response.error().message()
            raise err
        return self.reader.answer(lambda name: pb_utils.get_output_tensor_by_name(response, name).as_numpy(), want_probs)


class LocalStage:
    """Stage 0 run in the gate's own process with onnxruntime (little_in_gate): no hop to another process."""

    def __init__(self, stage, path, intra_op_threads, reader):
        import onnxruntime as ort  # only here: a gate without little needs no onnxruntime

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Spinning threads would steal the cores big and the other gate instances need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.stage = stage
        self.reader = reader

    def run(self, arrays, want_probs):
        """(stage 0's answer, seconds spent). Raises ChildError."""
        names = self.reader.wanted(want_probs)
        started = time.perf_counter()
        try:
            results = self.session.run(names, dict(zip(self.input_names, arrays)))
        except Exception as err:  # noqa: BLE001 - onnxruntime's errors
            raise ChildError(self.stage, f"in the gate's process: {err}") from None
        outputs = dict(zip(names, results))
        return self.reader.answer(outputs.__getitem__, want_probs), time.perf_counter() - started
