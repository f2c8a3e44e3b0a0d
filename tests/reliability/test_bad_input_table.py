"""Client mistakes are client errors: each kind of bad request, over gRPC and HTTP, gets
INVALID_ARGUMENT / HTTP 400 (NOT_FOUND / 404 for a model that does not exist) with a message that
names the problem; the gate's refusals show in littlebig_errors_total{cause="request"}; the server
keeps serving."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from littlebig.client.metrics import read_samples, sample_sum

from ..conftest import WIRE

GATE = "littlebig"

@dataclasses.dataclass(frozen=True)
class Bad:
    """One kind of bad request: what to send and what the error must say."""

    name: str
    message: str  # a regex the error message must match
    image: tuple = (2, WIRE, WIRE, 3)
    dtype: str = "UINT8"
    params: dict | None = None
    input_name: str = "IMAGE"
    send_input: bool = True
    extra_input: bool = False
    outputs: tuple = ("CLASS", "ROUTE")
    model: str = GATE
    version: str = ""
    by_gate: bool = True  # refused by the gate (counted in its metric) rather than by Triton before it
    not_found: bool = False

CASES = [
    Bad("threshold above 1", r"threshold .*must be in \[0, 1\], got 1\.5", params={"threshold": 1.5}),
    Bad("threshold below 0", r"threshold .*must be in \[0, 1\], got -0\.1", params={"threshold": -0.1}),
    Bad("threshold not a number", r"threshold .*must be a number.*'abc'", params={"threshold": "abc"}),
    Bad("threshold nan", r"threshold .*must be in \[0, 1\].*nan", params={"threshold": "nan"}),
    Bad("threshold inf", r"threshold .*must be in \[0, 1\].*inf", params={"threshold": "inf"}),
    Bad("threshold overflowing", r"threshold .*must be in \[0, 1\].*1e999", params={"threshold": "1e999"}),
    Bad("threshold empty", r"threshold .*must be a number.*''", params={"threshold": ""}),
    Bad("threshold a bool", r"threshold .*must be a number.*True", params={"threshold": True}),
    Bad("misspelled threshold", r"unknown request parameter.*'treshold'.*known: threshold, thresholds, on_big_failure", params={"treshold": 0.3}),
    Bad("threshold in capitals", r"unknown request parameter.*'Threshold'", params={"Threshold": 0.3}),
    Bad("two unknown parameters", r"unknown request parameter.*'a'.*'b'", params={"a": 1, "b": 2}),
    Bad("on_big_failure unknown", r"on_big_failure .*must be one of 'fail', 'little', got 'maybe'", params={"on_big_failure": "maybe"}),
    Bad("on_big_failure in capitals", r"on_big_failure .*got 'LITTLE'", params={"on_big_failure": "LITTLE"}),
    Bad("on_big_failure a number", r"on_big_failure .*got 1", params={"on_big_failure": 1}),
    Bad("FP32 image", r"(?i)IMAGE.*FP32.*UINT8|UINT8.*FP32", dtype="FP32", by_gate=False),
    Bad("INT8 image", r"(?i)IMAGE.*INT8.*UINT8|UINT8.*INT8", dtype="INT8", by_gate=False),
    Bad("UINT16 image", r"(?i)IMAGE.*UINT16.*UINT8|UINT8.*UINT16", dtype="UINT16", by_gate=False),
    Bad("half-height image", r"(?i)IMAGE.*shape|shape.*IMAGE", image=(2, WIRE // 2, WIRE, 3), by_gate=False),
    Bad("four channels", r"(?i)IMAGE.*shape|shape.*IMAGE", image=(2, WIRE, WIRE, 4), by_gate=False),
    Bad("no batch dimension", r"(?i)IMAGE.*shape|shape.*IMAGE", image=(WIRE, WIRE, 3), by_gate=False),
    Bad("zero rows", r"(?i)byte size mismatch.*IMAGE.*got 0", image=(0, WIRE, WIRE, 3), by_gate=False),
    Bad("batch above max_batch_size", r"(?i)batch.?size must be <= 64", image=(65, WIRE, WIRE, 3), by_gate=False),
    Bad("no input", r"(?i)expected 1 inputs but got 0", send_input=False, by_gate=False),
    Bad("misnamed input", r"(?i)IMAGES", input_name="IMAGES", by_gate=False),
    Bad("extra input", r"(?i)EXTRA", extra_input=True, by_gate=False),
    Bad("unknown output", r"(?i)LOGITS", outputs=("CLASS", "LOGITS"), by_gate=False),
    Bad("unknown model", r"(?i)littlebigg", model="littlebigg", by_gate=False, not_found=True),
    Bad("unknown version", r"(?i)version", version="7", by_gate=False, not_found=True),
]

def send(protocol: str, url: str, case: Bad) -> None:
    tc = grpcclient if protocol == "grpc" else httpclient
    inputs = []
    if case.send_input:
        array = np.zeros(case.image, dtype={"UINT8": np.uint8, "FP32": np.float32, "INT8": np.int8, "UINT16": np.uint16}[case.dtype])
        tensor = tc.InferInput(case.input_name, list(array.shape), case.dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    if case.extra_input:
        extra = tc.InferInput("EXTRA", [2, 1], "INT32")
        extra.set_data_from_numpy(np.zeros((2, 1), np.int32))
        inputs.append(extra)
    outputs = [tc.InferRequestedOutput(name) for name in case.outputs]
    with tc.InferenceServerClient(url) as client:
        client.infer(case.model, inputs, model_version=case.version, outputs=outputs, parameters=case.params)

def request_errors(server) -> float:
    return sample_sum(read_samples(server.metrics_url, "littlebig_errors", settle=True), "littlebig_errors_total", cause="request")

@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_are_client_errors_naming_the_problem(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    before = request_errors(server)
    failures = []
    for case in CASES:
        try:
            send(protocol, url, case)
        except InferenceServerException as err:
            status, message = str(err.status()), err.message() or ""
            want = ("StatusCode.NOT_FOUND", "404") if case.not_found else ("StatusCode.INVALID_ARGUMENT", "400")
            if status not in want or not re.search(case.message, message):
                failures.append(f"{case.name}: got {status} {message!r}")
        else:
            failures.append(f"{case.name}: accepted")
    assert not failures, "\n".join(failures)
    # Every refusal by the gate is counted (Triton's nv_inference_request_failure does not see them).
    assert request_errors(server) - before == sum(case.by_gate for case in CASES)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        image = grpcclient.InferInput("IMAGE", [1, WIRE, WIRE, 3], "UINT8")
        image.set_data_from_numpy(np.zeros((1, WIRE, WIRE, 3), np.uint8))
        assert client.infer(GATE, [image]).as_numpy("ROUTE").shape == (1, 1)
