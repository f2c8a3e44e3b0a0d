"""The cascade a Triton user writes from python_backend's BLS example, for bench/peers.py.

Per request, synchronously: little on the request's rows; if any row is below T, big on the whole
request, and big answers every row. No batching across requests, no early answers. Same inputs and
outputs as the littlebig gate, and its config parameters (stage_models, thresholds), so the same
clients drive both.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.little, self.big = params["stage_models"].split(",")
        self.threshold = float(params["thresholds"])

    def _run(self, model, image):
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=["PROBS"], inputs=[image])
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return pb_utils.get_output_tensor_by_name(response, "PROBS").as_numpy()

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            probs = self._run(self.little, image)
            route = 0
            if (probs.max(axis=1) < self.threshold).any():
                probs, route = self._run(self.big, image), 1
            outputs = [
                pb_utils.Tensor("CLASS", probs.argmax(axis=1).astype(np.int64).reshape(-1, 1)),
                pb_utils.Tensor("CONFIDENCE", probs.max(axis=1).reshape(-1, 1)),
                pb_utils.Tensor("ROUTE", np.full((len(probs), 1), route, dtype=np.int32)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
