"""An exported ONNX classifier served by the Python backend with onnxruntime.

Used for `little` and `big` where Triton has no onnxruntime backend (the CPU server that ships in the
nvidia-pytriton wheel). In the NGC container the same ONNX file runs on the native onnxruntime_onnx
backend instead. All requests of one execute call run as one onnxruntime batch, computing only the
outputs some request asked for (the gate asks for CLASS and CONFIDENCE, not all C probabilities).

Config parameters: onnx_file (default model.onnx, in the version folder), intra_op_threads (0: ORT's
default), nice (CPU priority increment of this instance's process; on a CPU server a positive value
for `big` lets the requests little answers go first).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        nice = int(params.get("nice", "0"))
        if nice:
            os.nice(nice)  # before the session exists, so its worker threads inherit it
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        # Idle spinning threads steal the cores the other model of the cascade needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.outputs = [output["name"] for output in config["output"]]
        # Whatever the config declares (IMAGE, INPUT_IDS + ATTENTION_MASK, float features, ...).
        self.inputs = [i["name"] for i in config["input"]]

    def _feeds(self, requests):
        """Each declared input, all requests' rows concatenated; and the row count of each request."""
        per_request = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        feeds = {
            name: per_request[0][i] if len(requests) == 1 else np.concatenate([arrays[i] for arrays in per_request])
            for i, name in enumerate(self.inputs)
        }
        return feeds, [len(arrays[0]) for arrays in per_request]

    def execute(self, requests):
        feeds, counts = self._feeds(requests)
        wanted = [set(r.requested_output_names()) or set(self.outputs) for r in requests]
        names = [name for name in self.outputs if any(name in w for w in wanted)]
        results = dict(zip(names, self.session.run(names, feeds)))
        responses, start = [], 0
        for count, want in zip(counts, wanted):
            rows = slice(start, start + count)
            start += count
            tensors = [pb_utils.Tensor(name, results[name][rows]) for name in names if name in want]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
