"""The floor of any Python-backend model, for bench/gate_floor.py: read the input rows, answer zeros.

Same inputs and outputs as the gate; no inference, no BLS call. Its compute time per execution is what
the python backend itself costs (the rows copied into the stub's shared memory, the execute round
trip, the response), which every Python-backend gate pays before doing anything.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = len(pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy())
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("CLASS", np.zeros((rows, 1), np.int64)),
                pb_utils.Tensor("CONFIDENCE", np.zeros((rows, 1), np.float32)),
                pb_utils.Tensor("ROUTE", np.zeros((rows, 1), np.int32)),
                pb_utils.Tensor("THRESHOLD", np.zeros((rows, 1), np.float64)),
            ]))
        return responses
