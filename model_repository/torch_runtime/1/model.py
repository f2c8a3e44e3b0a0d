"""A stage exported as TorchScript, served by the Python backend with PyTorch on the instance's device.

For GPU machines without onnxruntime-GPU or TensorRT (a machine with only torch), and for models that do
not export to ONNX cleanly. The artifact is the serving module `littlebig export --torchscript` writes
beside the ONNX file (preprocessing, softmax and the top-1 inside). A KIND_GPU instance runs it on its
GPU (cuda:<device id>), a KIND_CPU one on the CPU. All requests of one execute run as one batch.

Outputs go back as CPU DLPack tensors: the gate reads them with numpy, so they would be copied to the
CPU anyway, and CPU tensors keep CUDA memory out of the stub's shared memory with the server.

Config parameters: torchscript_file (default model.pt, in the version folder), intra_op_threads (CPU
instances; 0: torch's default).
"""

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

# The exported module's outputs, in the order it returns them (export/onnx_export.py: WithTop1).
MODULE_OUTPUTS = ("PROBS", "CLASS", "CONFIDENCE")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
            threads = int(params.get("intra_op_threads", "0"))
            if threads:
                torch.set_num_threads(threads)
        path = os.path.join(args["model_repository"], args["model_version"], params.get("torchscript_file", "model.pt"))
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.outputs = [output["name"] for output in config["output"]]
        self.inputs = [i["name"] for i in config["input"]]

    def _feeds(self, requests):
        """Each declared input, all requests' rows concatenated on the device; and each request's row count."""
        per_request = [[from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack()) for name in self.inputs]
                       for r in requests]
        feeds = [torch.cat([arrays[i] for arrays in per_request]).to(self.device) for i in range(len(self.inputs))]
        return feeds, [len(arrays[0]) for arrays in per_request]

    def execute(self, requests):
        feeds, counts = self._feeds(requests)
        wanted = [set(r.requested_output_names()) or set(self.outputs) for r in requests]
        with torch.inference_mode():
            computed = dict(zip(MODULE_OUTPUTS, self.module(*feeds)))
        results = {name: computed[name].cpu() for name in self.outputs if any(name in w for w in wanted)}
        responses, start = [], 0
        for count, want in zip(counts, wanted):
            rows = slice(start, start + count)
            start += count
            tensors = [pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor[rows].contiguous()))
                       for name, tensor in results.items() if name in want]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
