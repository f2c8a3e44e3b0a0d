"""Little-Big gate: a Triton Python-backend (BLS) model.

For all requests of one execute call: their IMAGE rows are concatenated, `little` runs once on the
whole batch, rows whose max probability is below the threshold T go to `big` in one more call, and
the answers are scattered back to their requests in order (paper Eq. 4). With ensemble_weight w < 1
an escalated row's answer is (1 - w) * p_little + w * p_big (paper Eq. 8).

Self-contained (numpy + triton_python_backend_utils) so the same file runs in the NGC container.
Config parameters: little_model, big_model, threshold, ensemble_weight. A request parameter
`threshold` (number or numeric string in [0, 1]) overrides T for that request.
"""

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
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise pb_utils.TritonModelException(f"ensemble_weight must be in [0, 1], got {self.ensemble_weight}")
        image_input = next(i for i in config["input"] if i["name"] == "IMAGE")
        self.row_shape = tuple(int(d) for d in image_input["dims"])
        self._init_metrics(args["model_name"])

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
        self.metric_threshold = threshold.Metric(labels=labels)
        self.metric_threshold.set(self.threshold)
        # Keep the families alive as long as their metrics.
        self._metric_families = (requests, rows, threshold)

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
        return image, threshold, "PROBS" in request.requested_output_names()

    def _infer(self, model_name, images):
        request = pb_utils.InferenceRequest(
            model_name=model_name,
            requested_output_names=["PROBS"],
            inputs=[pb_utils.Tensor("IMAGE", images)],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"model '{model_name}' failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "PROBS").as_numpy()

    def _cascade(self, images, thresholds, want_probs):
        counts = [len(x) for x in images]
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        # Compare in float64 so T means exactly the number that was sent (no rounding to float32).
        row_threshold = np.repeat(np.asarray(thresholds, dtype=np.float64), counts)
        probs = self._infer(self.little_model, batch)
        confidence = probs.max(axis=1)
        label = probs.argmax(axis=1)
        escalate = np.flatnonzero(confidence.astype(np.float64) < row_threshold)
        route = np.zeros(len(batch), dtype=np.int32)
        if want_probs:
            probs = np.array(probs)  # the child's output buffer may be read-only
        if len(escalate):
            big_probs = self._infer(self.big_model, batch[escalate])
            if self.ensemble_weight != 1.0:
                big_probs = (1.0 - self.ensemble_weight) * probs[escalate] + self.ensemble_weight * big_probs
            confidence[escalate] = big_probs.max(axis=1)
            label[escalate] = big_probs.argmax(axis=1)
            route[escalate] = ROUTE_BIG
            if want_probs:
                probs[escalate] = big_probs
        self.metric_rows[ROUTE_LITTLE].increment(len(batch) - len(escalate))
        self.metric_rows[ROUTE_BIG].increment(len(escalate))
        return counts, label.astype(np.int64), confidence.astype(np.float32), route, probs

    def execute(self, requests):
        responses = [None] * len(requests)
        images, thresholds, owners, wants_probs = [], [], [], []
        for index, request in enumerate(requests):
            try:
                image, threshold, want_probs = self._parse_request(request)
            except RequestError as err:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
                continue
            images.append(image)
            thresholds.append(threshold)
            owners.append(index)
            wants_probs.append(want_probs)

        if images:
            try:
                counts, label, confidence, route, probs = self._cascade(images, thresholds, any(wants_probs))
            except RuntimeError as err:
                for index in owners:
                    responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
            else:
                start = 0
                for index, count, want_probs in zip(owners, counts, wants_probs):
                    rows = slice(start, start + count)
                    start += count
                    outputs = [
                        pb_utils.Tensor("CLASS", label[rows].reshape(-1, 1)),
                        pb_utils.Tensor("CONFIDENCE", confidence[rows].reshape(-1, 1)),
                        pb_utils.Tensor("ROUTE", route[rows].reshape(-1, 1)),
                    ]
                    if want_probs:
                        outputs.append(pb_utils.Tensor("PROBS", np.ascontiguousarray(probs[rows])))
                    responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)

        failed = sum(1 for r in responses if r.has_error())
        self.metric_ok.increment(len(responses) - failed)
        self.metric_error.increment(failed)
        return responses
