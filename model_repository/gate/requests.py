"""Reading one request: its inputs checked against the config, its parameters, what it asks for."""

import dataclasses
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from .config import FIRST_PREFIX, PROBS, REQUEST_PARAMETERS, RequestError, parse_on_big_failure, parse_threshold, parse_thresholds
from .rows import Accepted


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A declared input: forwarded to every stage unchanged."""

    name: str
    dtype: np.dtype
    dims: tuple  # without the batch dim; -1: any size

    def check(self, array):
        if array.dtype != self.dtype:
            raise RequestError(f"input {self.name!r} must be {self.dtype.name}, got {array.dtype}")
        if array.ndim != len(self.dims) + 1 or any(d not in (-1, n) for d, n in zip(self.dims, array.shape[1:])):
            expected = ", ".join(str(d) for d in ("N",) + self.dims)
            raise RequestError(f"input {self.name!r} must have shape [{expected}], got {list(array.shape)}")


def input_specs(model_config):
    """The stage inputs the config declares (stage 0's answers handed over apart)."""
    return tuple(
        InputSpec(i["name"], np.dtype(pb_utils.triton_string_to_numpy(i["data_type"])), tuple(int(d) for d in i["dims"]))
        for i in model_config["input"] if not i["name"].startswith(FIRST_PREFIX)
    )


def first_inputs(model_config):
    """Stage 0's answer as inputs (little as the step before): output name -> input name (LITTLE_CLASS, ...)."""
    return {i["name"][len(FIRST_PREFIX):]: i["name"] for i in model_config["input"] if i["name"].startswith(FIRST_PREFIX)}


class Parser:
    """Parses requests for a gate of ``count`` stages whose config says ``config`` (GateConfig)."""

    def __init__(self, config, specs, first_names):
        self.count = len(config.stage_models)
        self.on_big_failure = config.on_big_failure
        self.specs = specs
        self.first_names = first_names

    def parse(self, request, default_thresholds):
        tensors = {tensor.name(): tensor for tensor in request.inputs()}  # one pass (get_input_tensor_by_name walks them all)
        arrays = self._inputs(tensors)
        text = request.parameters()
        parameters = json.loads(text) if text and text != "{}" else {}
        unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
        if unknown:
            raise RequestError(f"unknown request parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_PARAMETERS)}")
        thresholds = self._thresholds(parameters, default_thresholds)
        on_big_failure = self.on_big_failure
        if "on_big_failure" in parameters:
            on_big_failure = parse_on_big_failure(parameters["on_big_failure"], "request parameter")
        pinned = "threshold" in parameters or "thresholds" in parameters
        first = {name: tensors[tensor].as_numpy() for name, tensor in self.first_names.items()}
        return Accepted(arrays, thresholds, PROBS in request.requested_output_names(), on_big_failure, pinned, first)

    def _inputs(self, tensors):
        arrays = []
        for spec in self.specs:
            tensor = tensors.get(spec.name)
            if tensor is None:
                raise RequestError(f"missing input {spec.name!r}")
            array = tensor.as_numpy()
            spec.check(array)
            arrays.append(array)
        counts = {spec.name: len(array) for spec, array in zip(self.specs, arrays)}
        if len(set(counts.values())) > 1:
            raise RequestError(f"inputs must have the same number of rows, got {counts}")
        if len(arrays[0]) == 0:
            raise RequestError(f"input {self.specs[0].name!r} has no rows: send at least one row")
        return arrays

    def _thresholds(self, parameters, default):
        if "threshold" in parameters and "thresholds" in parameters:
            raise RequestError("send either 'threshold' or 'thresholds', not both")
        if "thresholds" in parameters:
            return parse_thresholds(parameters["thresholds"], self.count - 1, "request parameter")
        if "threshold" in parameters:
            if self.count != 2:
                raise RequestError(
                    f"request parameter 'threshold' is for two-stage cascades; this one has {self.count} "
                    f"stages: send 'thresholds' with {self.count - 1} values"
                )
            return (parse_threshold(parameters["threshold"], "request parameter"),)
        return default
