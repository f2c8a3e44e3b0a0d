"""Little-Big gate: a Triton Python-backend (BLS) model.

For all requests of one execute call: their IMAGE rows are concatenated, `little` runs once on the
whole batch, rows whose max probability is below the threshold T go to `big` in one more call
(paper Eq. 4). With ensemble_weight w < 1 an escalated row's answer is
(1 - w) * p_little + w * p_big (paper Eq. 8).

Requests that little answers entirely are sent back at once. The big call for the others runs as a
background task on the stub's event loop and answers them when it ends; execute returns without
waiting for it, so this instance takes the next batch for little while big works. (Since Triton
24.07 a non-decoupled Python model may send its one final response per request after execute has
returned.) Blocking on big instead held little-answered traffic behind every escalation. All of it
runs on the stub's event loop thread: with BLS calls and response sends from two threads at once
(a thread pool for big, or a synchronous execute that left only big to the loop) tritonserver 2.51
crashed under perf_analyzer load (signal 11 in libtriton_python.so); this form ran it cleanly.

Self-contained (numpy + triton_python_backend_utils) so the same file runs in the NGC container.
Config parameters: little_model, big_model, threshold, ensemble_weight. A request parameter
`threshold` (number or numeric string in [0, 1]) overrides T for that request.
"""

import asyncio
import json
import math

import numpy as np
import triton_python_backend_utils as pb_utils

ROUTE_LITTLE = 0
ROUTE_BIG = 1


class RequestError(ValueError):
    """A problem with one request; only that request fails."""


def parse_threshold(value, where):
    """T as a float in [0, 1]; numbers and numeric strings are accepted, anything else is refused."""
    if isinstance(value, bool):
        raise RequestError(f"threshold ({where}) must be a number in [0, 1], got {value!r}")
    try:
        threshold = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RequestError(f"threshold ({where}) must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise RequestError(f"threshold ({where}) must be in [0, 1], got {value!r}")
    return threshold


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        for key in ("little_model", "big_model"):
            if not params.get(key):
                raise pb_utils.TritonModelException(f"config parameter {key!r} is missing")
        self.little_model = params["little_model"]
        self.big_model = params["big_model"]
        try:
            self.threshold = parse_threshold(params.get("threshold", "0.5"), "config parameter")
        except RequestError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        self.ensemble_weight = float(params.get("ensemble_weight", "1"))
        # MACs per image of each model (recorded by the repository builder), for the live cost metric.
        self.macs = {ROUTE_LITTLE: int(params.get("macs_little", "0")), ROUTE_BIG: int(params.get("macs_big", "0"))}
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise pb_utils.TritonModelException(f"ensemble_weight must be in [0, 1], got {self.ensemble_weight}")
        image_input = next(i for i in config["input"] if i["name"] == "IMAGE")
        self.row_shape = tuple(int(d) for d in image_input["dims"])
        self._init_metrics(args["model_name"])
        # Big calls still running after their execute returned; a strong reference keeps each task
        # alive until it ends (the event loop holds tasks only weakly). No finalize waits for them:
        # Triton keeps an instance until every response it owes is sent (a reload under load
        # called finalize only after the pending escalation had answered).
        self._escalations = set()

    def _init_metrics(self, model_name):
        labels = {"model": model_name}
        requests = pb_utils.MetricFamily(
            name="littlebig_requests_total",
            description="Inference requests the gate answered (ok) or refused (error)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        rows = pb_utils.MetricFamily(
            name="littlebig_rows_total",
            description="Rows (images) answered, by the model that answered them",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        macs = pb_utils.MetricFamily(
            name="littlebig_macs_total",
            description="Multiply-accumulates spent (little on every row, big on escalated rows); "
            "divided by littlebig_rows_total it is the live cost per image (paper Eq. 5)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        threshold = pb_utils.MetricFamily(
            name="littlebig_threshold",
            description="Confidence threshold T in force (config value; requests may override it)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.metric_ok = requests.Metric(labels={**labels, "status": "ok"})
        self.metric_error = requests.Metric(labels={**labels, "status": "error"})
        self.metric_rows = {
            ROUTE_LITTLE: rows.Metric(labels={**labels, "route": "little"}),
            ROUTE_BIG: rows.Metric(labels={**labels, "route": "big"}),
        }
        self.metric_macs = macs.Metric(labels=labels)
        self.metric_threshold = threshold.Metric(labels=labels)
        self.metric_threshold.set(self.threshold)
        # Keep the families alive as long as their metrics.
        self._metric_families = (requests, rows, macs, threshold)

    def _parse_request(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if tensor is None:
            raise RequestError("missing input 'IMAGE'")
        image = tensor.as_numpy()
        if image.dtype != np.uint8:
            raise RequestError(f"input 'IMAGE' must be uint8, got {image.dtype}")
        if image.ndim != len(self.row_shape) + 1 or tuple(image.shape[1:]) != self.row_shape:
            expected = ", ".join(str(d) for d in ("N",) + self.row_shape)
            raise RequestError(f"input 'IMAGE' must have shape [{expected}], got {list(image.shape)}")
        threshold = self.threshold
        parameters = json.loads(request.parameters() or "{}")
        if "threshold" in parameters:
            threshold = parse_threshold(parameters["threshold"], "request parameter")
        return tensor, image, threshold, "PROBS" in request.requested_output_names()

    async def _infer(self, model_name, images):
        """``images``: a numpy batch, or a request's own IMAGE tensor (passed on without a copy)."""
        tensor = images if isinstance(images, pb_utils.Tensor) else pb_utils.Tensor("IMAGE", images)
        request = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=["PROBS"], inputs=[tensor])
        try:
            response = await request.async_exec()
        except Exception as err:  # noqa: BLE001 - e.g. the model is not loaded
            raise RuntimeError(f"model '{model_name}' failed: {err}") from None
        if response.has_error():
            raise RuntimeError(f"model '{model_name}' failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "PROBS").as_numpy()

    def _count(self, response):
        (self.metric_error if response.has_error() else self.metric_ok).increment(1)
        return response

    def _send(self, sender, response):
        # A non-decoupled model may send one final response per request through the request's
        # sender instead of returning it; it leaves at once, so it does not wait for big.
        sender.send(self._count(response), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _error(message):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))

    @staticmethod
    def _answer(rows, label, confidence, route, probs, want_probs):
        outputs = [
            pb_utils.Tensor("CLASS", label[rows].reshape(-1, 1)),
            pb_utils.Tensor("CONFIDENCE", confidence[rows].reshape(-1, 1)),
            pb_utils.Tensor("ROUTE", route[rows].reshape(-1, 1)),
        ]
        if want_probs:
            outputs.append(pb_utils.Tensor("PROBS", np.ascontiguousarray(probs[rows])))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    async def execute(self, requests):
        responses = [None] * len(requests)
        accepted = []  # (index, tensor, image, threshold, want_probs)
        for index, request in enumerate(requests):
            try:
                accepted.append((index,) + self._parse_request(request))
            except RequestError as err:
                responses[index] = self._error(str(err))
        if not accepted:
            return [self._count(r) for r in responses]

        images = [a[2] for a in accepted]
        ends = np.cumsum([len(x) for x in images])
        rows_of = [slice(end - len(x), end) for end, x in zip(ends, images)]
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        # Compare in float64 so T means exactly the number that was sent (no rounding to float32).
        row_threshold = np.repeat(np.asarray([a[3] for a in accepted], dtype=np.float64), [len(x) for x in images])
        try:
            probs = await self._infer(self.little_model, accepted[0][1] if len(accepted) == 1 else batch)
        except RuntimeError as err:
            for index, *_ in accepted:
                responses[index] = self._error(str(err))
            return [self._count(r) for r in responses]

        confidence = probs.max(axis=1)
        label = probs.argmax(axis=1).astype(np.int64)
        escalated = confidence.astype(np.float64) < row_threshold
        route = escalated.astype(np.int32)
        escalate = np.flatnonzero(escalated)
        self.metric_rows[ROUTE_LITTLE].increment(len(batch) - len(escalate))
        self.metric_macs.increment(len(batch) * self.macs[ROUTE_LITTLE])
        waiting = []  # (response sender, rows, want_probs) of requests with a row for big
        for (index, _, _, _, want_probs), rows in zip(accepted, rows_of):
            if escalated[rows].any():
                waiting.append((requests[index].get_response_sender(), rows, want_probs))
            else:
                responses[index] = self._answer(rows, label, confidence, route, probs, want_probs)
        if not waiting:
            return [self._count(r) for r in responses]  # one message back for the whole batch

        # Everything already decided leaves now; the rest is answered by a background task.
        for index, response in enumerate(responses):
            if response is not None:
                self._send(requests[index].get_response_sender(), response)
        # Fancy indexing copies the rows out of the request's input buffer, which Triton may free
        # once execute returns.
        task = asyncio.create_task(self._escalate(batch[escalate], escalate, probs, label, confidence, route, waiting))
        self._escalations.add(task)
        task.add_done_callback(self._escalations.discard)
        return None

    async def _escalate(self, images, escalate, probs, label, confidence, route, waiting):
        """Run big on the escalated rows and answer the requests that wait for them."""
        try:
            big_probs = await self._infer(self.big_model, images)
            if self.ensemble_weight != 1.0:
                big_probs = (1.0 - self.ensemble_weight) * probs[escalate] + self.ensemble_weight * big_probs
            confidence[escalate] = big_probs.max(axis=1)
            label[escalate] = big_probs.argmax(axis=1)
            if any(want_probs for _, _, want_probs in waiting):
                probs = np.array(probs)  # the child's output buffer may be read-only
                probs[escalate] = big_probs
            self.metric_rows[ROUTE_BIG].increment(len(escalate))
            self.metric_macs.increment(len(escalate) * self.macs[ROUTE_BIG])
            answers = [self._answer(rows, label, confidence, route, probs, want) for _, rows, want in waiting]
        except Exception as err:  # noqa: BLE001 - whatever fails, every waiting request gets an answer
            message = str(err) if isinstance(err, RuntimeError) else f"escalation to '{self.big_model}' failed: {err!r}"
            answers = [self._error(message) for _ in waiting]
        for (sender, _, _), answer in zip(waiting, answers):
            self._send(sender, answer)
