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
Config parameters: little_model, big_model, threshold, ensemble_weight, on_big_failure ("fail" or
"little"), child_timeout_ms (bound on each call of little or big; 0: none). Request parameters:
`threshold` (number or numeric string in [0, 1]) overrides T for that request, `on_big_failure`
overrides the config's; any other request parameter is refused.

Errors: a bad request gets INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400); a failing or timed-out
child UNAVAILABLE. Triton counts the gate's error answers as successes in nv_inference_request_*
(the response was delivered); littlebig_requests_total{status="error"} and
littlebig_errors_total{cause=request|little|big} count them.

Reading only what it needs: when both children answer their top-1 in the graph (CLASS and
CONFIDENCE beside PROBS; config parameter children_top1=1, set by the repository builder), the gate
asks a child for PROBS only when a request asked for PROBS or the ensemble needs them: two numbers per
row instead of C probabilities. Every call asks for its outputs in CPU memory, so children on a GPU
(TensorRT, onnxruntime-GPU) answer in memory numpy can read.

Gears (opt-in, two-stage cascades): with a config `gears` ladder [[T, expected drop], ...] from the
config T down (written by `littlebig calibrate`, client/gears.py) and `latency_target_ms` > 0, class
Gears lowers T one gear at a time while its latency estimate misses the target and raises it again once
the estimate is comfortably below it (hysteresis), at most once per `gear_interval_ms`. While the target
is met it stays in gear 0: the answers are those of the fixed config T. A request that sends its own
`threshold` is never adapted. Every answer says in THRESHOLD which T applied to each row.

Degraded mode (on_big_failure="little", opt-in): when big fails or times out, escalated rows are
answered with little's answer and ROUTE=2 (counted in littlebig_fallback_rows_total) instead of an
error.
"""

import asyncio
import dataclasses
import json
import math
import time

import numpy as np
import triton_python_backend_utils as pb_utils

ROUTE_LITTLE = 0
ROUTE_BIG = 1
ROUTE_LITTLE_FALLBACK = 2  # escalated, big failed, little answered (degraded mode)
ON_BIG_FAILURE = ("fail", "little")
REQUEST_PARAMETERS = ("threshold", "on_big_failure")


class RequestError(ValueError):
    """A problem with one request; only that request fails (INVALID_ARG)."""


class ChildError(RuntimeError):
    """little or big failed, timed out or is not loaded (UNAVAILABLE)."""

    def __init__(self, model_name, message):
        super().__init__(f"model '{model_name}' failed: {message}")
        self.model_name = model_name


@dataclasses.dataclass
class Accepted:
    """A parsed request."""

    tensor: object  # the request's IMAGE pb_utils.Tensor
    image: np.ndarray
    threshold: float
    want_probs: bool
    on_big_failure: str
    pinned: bool = False  # the request sent its own threshold: gears never change it


@dataclasses.dataclass
class ChildAnswer:
    """One child's answer on a batch: top-1 class and probability per row, and PROBS when asked for."""

    label: np.ndarray  # int64 [N], writable
    confidence: np.ndarray  # float32 [N], writable
    probs: np.ndarray | None  # float32 [N, C]


@dataclasses.dataclass
class Waiting:
    """A request with at least one row for big, answered when big's call ends."""

    sender: object  # the request's response sender
    rows: slice
    want_probs: bool
    on_big_failure: str


@dataclasses.dataclass
class Answers:
    """Per-row answers of one batch: little's, then big's on the escalated rows."""

    probs: np.ndarray | None  # only when some request asked for PROBS (or the ensemble needs them)
    label: np.ndarray
    confidence: np.ndarray
    route: np.ndarray
    threshold: np.ndarray  # float64 [N]: the T that applied to each row

    def response(self, rows, want_probs):
        outputs = [
            pb_utils.Tensor("CLASS", self.label[rows].reshape(-1, 1)),
            pb_utils.Tensor("CONFIDENCE", self.confidence[rows].reshape(-1, 1)),
            pb_utils.Tensor("ROUTE", self.route[rows].reshape(-1, 1)),
            pb_utils.Tensor("THRESHOLD", self.threshold[rows].reshape(-1, 1)),
        ]
        if want_probs:
            outputs.append(pb_utils.Tensor("PROBS", np.ascontiguousarray(self.probs[rows])))
        return pb_utils.InferenceResponse(output_tensors=outputs)


def parse_on_big_failure(value, where):
    if value not in ON_BIG_FAILURE:
        raise RequestError(f"on_big_failure ({where}) must be one of {', '.join(map(repr, ON_BIG_FAILURE))}, got {value!r}")
    return value


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


def parse_gears(text, threshold):
    """The config's ladder: [[T, expected drop], ...] starting at the config T, T strictly decreasing."""
    try:
        ladder = [(float(t), float(d)) for t, d in json.loads(text)]
    except (ValueError, TypeError) as err:
        raise RequestError(f"config parameter gears must be JSON [[T, drop], ...], got {text!r} ({err})") from None
    thresholds = [t for t, _ in ladder]
    if not ladder or thresholds[0] != threshold:
        raise RequestError(f"config parameter gears must start at the config threshold {threshold}, got {thresholds[:1]}")
    if any(b >= a for a, b in zip(thresholds, thresholds[1:])) or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise RequestError(f"gear thresholds must be in [0, 1] and strictly decreasing, got {thresholds}")
    return ladder


class Gears:
    """Moves T along the calibrated ladder to keep a latency target (one instance's own view).

    Signals, all observed inside this instance (Triton does not tell a Python model when a request
    arrived or how long it queued): each answer's time from the start of its execute to its send, plus
    this instance's last wait for little as the estimate of the time spent in the gate's queue (the
    dynamic batcher hands over everything waiting, so a request waits about one execute), and the age of
    the oldest escalation still waiting for big (big's backlog shows there before any answer does).
    Every ``interval_s`` the worse of the window's p99 and that age is compared with the target: above
    it, one gear down (lower T) at once; after ``RAISE_AFTER`` intervals in a row below ``RAISE_BELOW`` x
    target, one gear up (a quiet spell counts its intervals, so it climbs back at once); otherwise hold.
    Down fast, up slowly: a backlog shows up late (when big finally answers), so climbing back as soon
    as one window looks calm went straight back into overload. While the target is met the gear stays 0.
    """

    RAISE_BELOW = 0.5
    RAISE_AFTER = 4

    def __init__(self, ladder, target_s, interval_s, metrics, now):
        self.thresholds = [t for t, _ in ladder]
        self.drops = [d for _, d in ladder]
        self.target_s, self.interval_s = target_s, interval_s
        self.metrics = metrics  # GearMetrics
        self.gear = 0
        self.queue_s = 0.0  # this instance's last wait for little: the estimated gate queue wait
        self.window = []  # latency estimates (s) of answers since the last decision
        self.pending = []  # start times of escalations waiting for big
        self.calm = 0  # intervals in a row below RAISE_BELOW x target
        self.decided = self.accounted = self.began = self.last_answer = now

    @property
    def threshold(self):
        return self.thresholds[self.gear]

    def start(self, now):
        """At the start of an execute: maybe change gear; returns when its requests probably arrived."""
        if now - self.decided >= self.interval_s:
            self._decide(now)
        self.began = now
        return now - self.queue_s

    def little_answered(self, now):
        self.queue_s = now - self.began

    def answered(self, started, count, now):
        self.window.extend([now - started] * count)
        self.last_answer = now

    def adapted(self, rows):
        """``rows`` were answered at this gear's T (not pinned): the expected accuracy they gave up."""
        if self.gear:
            self.metrics.cost.increment(rows * self.drops[self.gear])

    def escalation_started(self, started):
        self.pending.append(started)

    def escalation_ended(self, started):
        self.pending.remove(started)

    def _signal(self, now):
        if self.pending:
            return max(now - min(self.pending), float(np.percentile(self.window, 99)) if self.window else 0.0)
        if not self.window or now - self.last_answer > self.interval_s:
            return 0.0  # quiet for an interval: what the window holds is old news
        return float(np.percentile(self.window, 99))

    def _decide(self, now):
        signal = self._signal(now)
        self.metrics.seconds[self.gear].increment(now - self.accounted)
        self.accounted = now
        gear = self.gear
        if signal > self.target_s:
            gear, self.calm = min(gear + 1, len(self.thresholds) - 1), 0
        elif signal < self.RAISE_BELOW * self.target_s:
            self.calm += int((now - self.decided) / self.interval_s)
            gear = max(gear - self.calm // self.RAISE_AFTER, 0)
            self.calm %= self.RAISE_AFTER
        else:
            self.calm = 0
        if gear != self.gear:
            self.gear = gear
            self.metrics.gear.set(gear)
            self.metrics.threshold.set(self.threshold)
        self.window.clear()
        self.decided = now


@dataclasses.dataclass
class GearMetrics:
    gear: object  # gauge: the gear in force
    threshold: object  # gauge: its T
    seconds: list  # counters per gear: seconds spent in it
    cost: object  # counter: expected answers lost against the config T (sum of the gears' drops per row)


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
        try:
            self.on_big_failure = parse_on_big_failure(params.get("on_big_failure", "fail"), "config parameter")
        except RequestError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        # Bound on each BLS call, so a stalled child cannot hold a request forever.
        self.child_timeout_s = float(params.get("child_timeout_ms", "30000")) / 1000.0
        self.children_top1 = params.get("children_top1", "0") == "1"
        image_input = next(i for i in config["input"] if i["name"] == "IMAGE")
        self.row_shape = tuple(int(d) for d in image_input["dims"])
        self._init_metrics(args["model_name"])
        self.gears = self._init_gears(params, args["model_name"], args["model_instance_name"])
        # Big calls still running after their execute returned; a strong reference keeps each task
        # alive until it ends (the event loop holds tasks only weakly). No finalize waits for them:
        # Triton keeps an instance until every response it owes is sent (a reload under load
        # called finalize only after the pending escalation had answered).
        self._escalations = set()

    def _init_metrics(self, model_name):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        families = {
            name: pb_utils.MetricFamily(name=name, description=description, kind=kind)
            for name, description, kind in (
                ("littlebig_requests_total", "Inference requests the gate answered (ok) or refused (error)", counter),
                ("littlebig_rows_total", "Rows (images) answered, by the model that answered them", counter),
                ("littlebig_macs_total", "Multiply-accumulates spent (little on every row, big on escalated rows); "
                 "divided by littlebig_rows_total it is the live cost per image (paper Eq. 5)", counter),
                ("littlebig_threshold", "Confidence threshold T in force (config value; requests may override it)", gauge),
                ("littlebig_errors_total", "Error answers by cause: request (client mistake, INVALID_ARG), "
                 "little or big (child failed or timed out, UNAVAILABLE)", counter),
                ("littlebig_fallback_rows_total", "Escalated rows answered by little because big failed "
                 "(on_big_failure=little, ROUTE=2)", counter),
            )
        }

        def metric(family, **labels):
            return families[family].Metric(labels={"model": model_name, **labels})

        self.metric_ok = metric("littlebig_requests_total", status="ok")
        self.metric_error = metric("littlebig_requests_total", status="error")
        self.metric_rows = {
            ROUTE_LITTLE: metric("littlebig_rows_total", route="little"),
            ROUTE_BIG: metric("littlebig_rows_total", route="big"),
        }
        self.metric_macs = metric("littlebig_macs_total")
        self.metric_threshold = metric("littlebig_threshold")
        self.metric_threshold.set(self.threshold)
        self.metric_errors = {cause: metric("littlebig_errors_total", cause=cause) for cause in ("request", "little", "big")}
        self.metric_fallback = metric("littlebig_fallback_rows_total")
        # Keep the families alive as long as their metrics.
        self._metric_families = families

    def _init_gears(self, params, model_name, instance):
        """Gears when the config has a ladder and a latency target; None (T stays fixed) otherwise."""
        target_ms = float(params.get("latency_target_ms", "0"))
        if not params.get("gears") or target_ms <= 0:
            return None
        try:
            ladder = parse_gears(params["gears"], self.threshold)
        except RequestError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        families = [
            pb_utils.MetricFamily(name=name, description=description, kind=kind)
            for name, description, kind in (
                ("littlebig_gear", "Gear in force (0: the config T; higher: lower T), per gate instance", gauge),
                ("littlebig_gear_threshold", "T of the gear in force, per gate instance", gauge),
                ("littlebig_gear_seconds_total", "Seconds spent in each gear, per gate instance", counter),
                ("littlebig_gear_accuracy_cost_total", "Expected answers lost against the config T: each row answered "
                 "in a lower gear adds that gear's calibrated drop; divided by littlebig_rows_total it is the "
                 "expected accuracy drop", counter),
            )
        ]
        self._gear_families = families  # keep the families alive as long as their metrics

        def metric(family, **labels):
            return family.Metric(labels={"model": model_name, "instance": instance, **labels})

        metrics = GearMetrics(
            metric(families[0]), metric(families[1]),
            [metric(families[2], gear=str(k), threshold=repr(t)) for k, (t, _) in enumerate(ladder)], metric(families[3]),
        )
        metrics.gear.set(0)
        metrics.threshold.set(self.threshold)
        interval_s = float(params.get("gear_interval_ms", "500")) / 1000.0
        return Gears(ladder, target_ms / 1000.0, interval_s, metrics, time.monotonic())

    def _parse_request(self, request, threshold):
        tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if tensor is None:
            raise RequestError("missing input 'IMAGE'")
        image = tensor.as_numpy()
        if image.dtype != np.uint8:
            raise RequestError(f"input 'IMAGE' must be uint8, got {image.dtype}")
        if image.ndim != len(self.row_shape) + 1 or tuple(image.shape[1:]) != self.row_shape:
            expected = ", ".join(str(d) for d in ("N",) + self.row_shape)
            raise RequestError(f"input 'IMAGE' must have shape [{expected}], got {list(image.shape)}")
        if len(image) == 0:
            raise RequestError("input 'IMAGE' has no rows: send at least one image")
        parameters = json.loads(request.parameters() or "{}")
        unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
        if unknown:
            raise RequestError(
                f"unknown request parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_PARAMETERS)}"
            )
        pinned = "threshold" in parameters
        if pinned:
            threshold = parse_threshold(parameters["threshold"], "request parameter")
        on_big_failure = self.on_big_failure
        if "on_big_failure" in parameters:
            on_big_failure = parse_on_big_failure(parameters["on_big_failure"], "request parameter")
        return Accepted(tensor, image, threshold, "PROBS" in request.requested_output_names(), on_big_failure, pinned)

    async def _infer(self, model_name, images, want_probs):
        """``images``: a numpy batch, or a request's own IMAGE tensor (passed on without a copy)."""
        tensor = images if isinstance(images, pb_utils.Tensor) else pb_utils.Tensor("IMAGE", images)
        top1 = ["CLASS", "CONFIDENCE"] if self.children_top1 else []
        outputs = top1 + (["PROBS"] if want_probs or not top1 else [])
        # The request's own timeout is passed to Triton (its schedulers may drop a call queued past it);
        # wait_for bounds the wait whatever the child does (a stub stuck while executing).
        request = pb_utils.InferenceRequest(
            model_name=model_name,
            requested_output_names=outputs,
            inputs=[tensor],
            timeout=int(self.child_timeout_s * 1e6),
            # GPU children answer in GPU memory by default, which as_numpy() cannot read.
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        try:
            if self.child_timeout_s > 0:
                response = await asyncio.wait_for(request.async_exec(), self.child_timeout_s)
            else:
                response = await request.async_exec()
        except asyncio.TimeoutError:
            raise ChildError(model_name, f"no answer within {self.child_timeout_s:g} s (child_timeout_ms)") from None
        except Exception as err:  # noqa: BLE001 - e.g. the model is not loaded
            raise ChildError(model_name, str(err)) from None
        if response.has_error():
            raise ChildError(model_name, response.error().message())
        return self._child_answer(response, want_probs)

    def _child_answer(self, response, want_probs):
        def output(name):
            return pb_utils.get_output_tensor_by_name(response, name).as_numpy()

        probs = output("PROBS") if want_probs or not self.children_top1 else None
        if self.children_top1:  # copies: the answers are updated in place for escalated rows
            return ChildAnswer(output("CLASS")[:, 0].astype(np.int64), np.array(output("CONFIDENCE")[:, 0]), probs)
        return ChildAnswer(probs.argmax(axis=1).astype(np.int64), probs.max(axis=1), probs)

    def _count(self, response):
        (self.metric_error if response.has_error() else self.metric_ok).increment(1)
        return response

    def _send(self, sender, response):
        # A non-decoupled model may send one final response per request through the request's
        # sender instead of returning it; it leaves at once, so it does not wait for big.
        sender.send(self._count(response), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _error(self, err):
        """The error answer for a RequestError (INVALID_ARG) or a ChildError (UNAVAILABLE)."""
        if isinstance(err, RequestError):
            cause, code = "request", pb_utils.TritonError.INVALID_ARG
        else:
            cause, code = ("little" if err.model_name == self.little_model else "big"), pb_utils.TritonError.UNAVAILABLE
        self.metric_errors[cause].increment(1)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))

    def _accept(self, requests, threshold):
        """Parse every request (``threshold``: T for those that do not pin their own): (accepted ones,
        responses with the refusals filled in)."""
        responses = [None] * len(requests)
        accepted = []
        for index, request in enumerate(requests):
            try:
                accepted.append((index, self._parse_request(request, threshold)))
            except RequestError as err:
                responses[index] = self._error(err)
        return accepted, responses

    async def execute(self, requests):
        gears = self.gears
        started = gears.start(time.monotonic()) if gears else None
        accepted, responses = self._accept(requests, gears.threshold if gears else self.threshold)
        if not accepted:
            return [self._count(r) for r in responses]

        images = [a.image for _, a in accepted]
        ends = np.cumsum([len(x) for x in images])
        rows_of = [slice(end - len(x), end) for end, x in zip(ends, images)]
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        # Compare in float64 so T means exactly the number that was sent (no rounding to float32).
        row_threshold = np.repeat(np.asarray([a.threshold for _, a in accepted], dtype=np.float64), [len(x) for x in images])
        want_probs = self.ensemble_weight != 1.0 or any(a.want_probs for _, a in accepted)
        try:
            little = await self._infer(self.little_model, accepted[0][1].tensor if len(accepted) == 1 else batch, want_probs)
        except ChildError as err:
            for index, _ in accepted:
                responses[index] = self._error(err)
            if gears:
                gears.answered(started, len(accepted), time.monotonic())
            return [self._count(r) for r in responses]
        if gears:
            gears.little_answered(time.monotonic())
            gears.adapted(sum(len(a.image) for _, a in accepted if not a.pinned))

        answers = Answers(little.probs, little.label, little.confidence, None, row_threshold)
        escalated = answers.confidence.astype(np.float64) < row_threshold
        answers.route = escalated.astype(np.int32)
        escalate = np.flatnonzero(escalated)
        self.metric_rows[ROUTE_LITTLE].increment(len(batch) - len(escalate))
        self.metric_macs.increment(len(batch) * self.macs[ROUTE_LITTLE])
        waiting = []  # Waiting of the requests with a row for big
        for (index, request), rows in zip(accepted, rows_of):
            if escalated[rows].any():
                waiting.append(Waiting(requests[index].get_response_sender(), rows, request.want_probs, request.on_big_failure))
            else:
                responses[index] = answers.response(rows, request.want_probs)
        if gears:
            gears.answered(started, len(accepted) - len(waiting), time.monotonic())
        if not waiting:
            return [self._count(r) for r in responses]  # one message back for the whole batch

        # Everything already decided leaves now; the rest is answered by a background task.
        for index, response in enumerate(responses):
            if response is not None:
                self._send(requests[index].get_response_sender(), response)
        # Fancy indexing copies the rows out of the request's input buffer, which Triton may free
        # once execute returns.
        escalation = self._escalate(batch[escalate], escalate, answers, waiting)
        if gears:
            gears.escalation_started(started)
            escalation = self._observed(escalation, started, len(waiting))
        task = asyncio.create_task(escalation)
        self._escalations.add(task)
        task.add_done_callback(self._escalations.discard)
        return None

    async def _observed(self, escalation, started, count):
        """The escalation, with its requests' latency told to the gears."""
        try:
            await escalation
        finally:
            self.gears.escalation_ended(started)
            self.gears.answered(started, count, time.monotonic())

    async def _escalate(self, images, escalate, answers, waiting):
        """Run big on the escalated rows and answer the requests that wait for them."""
        ensemble = self.ensemble_weight != 1.0
        want_probs = ensemble or any(wait.want_probs for wait in waiting)
        try:
            big = await self._infer(self.big_model, images, want_probs)
        except ChildError as err:
            for wait in waiting:
                self._send(wait.sender, self._fallback(wait, answers, err))
            return
        try:
            if ensemble:  # Eq. 8: the blend decides the class and the confidence
                big.probs = (1.0 - self.ensemble_weight) * answers.probs[escalate] + self.ensemble_weight * big.probs
                big.label, big.confidence = big.probs.argmax(axis=1), big.probs.max(axis=1)
            answers.confidence[escalate] = big.confidence
            answers.label[escalate] = big.label
            if want_probs:
                answers.probs = np.array(answers.probs)  # the child's output buffer may be read-only
                answers.probs[escalate] = big.probs
            self.metric_rows[ROUTE_BIG].increment(len(escalate))
            self.metric_macs.increment(len(escalate) * self.macs[ROUTE_BIG])
            responses = [answers.response(wait.rows, wait.want_probs) for wait in waiting]
        except Exception as err:  # noqa: BLE001 - whatever fails, every waiting request gets an answer
            failure = pb_utils.TritonError(f"escalation to '{self.big_model}' failed: {err!r}")
            responses = [pb_utils.InferenceResponse(error=failure) for _ in waiting]
        for wait, response in zip(waiting, responses):
            self._send(wait.sender, response)

    def _fallback(self, wait, answers, err):
        """Big failed: an error, or (on_big_failure=little) little's answer with ROUTE=2."""
        if wait.on_big_failure != "little":
            return self._error(err)
        rows = wait.rows
        route = np.where(answers.route[rows] == ROUTE_BIG, ROUTE_LITTLE_FALLBACK, ROUTE_LITTLE).astype(np.int32)
        self.metric_fallback.increment(int((route == ROUTE_LITTLE_FALLBACK).sum()))
        probs = None if answers.probs is None else answers.probs[rows]
        fallback = Answers(probs, answers.label[rows], answers.confidence[rows], route, answers.threshold[rows])
        return fallback.response(slice(None), wait.want_probs)
