"""Bad requests get an error that names the problem; other requests still get answers."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.admin import admin_headers

from .conftest import WIRE
from .test_serving import gate_counts, send_concurrently


def infer_raw(url, inputs, parameters=None):
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer("littlebig", inputs, parameters=parameters)


def image_input(array, dtype="UINT8"):
    tensor = grpcclient.InferInput("IMAGE", list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_wrong_dtype_is_named(server):
    with pytest.raises(InferenceServerException, match=r"(?i)IMAGE.*(FP32|data-?type).*UINT8|UINT8.*FP32"):
        infer_raw(server.grpc_url, [image_input(np.zeros((1, WIRE, WIRE, 3), np.float32), "FP32")])


def test_wrong_shape_is_named(server):
    with pytest.raises(InferenceServerException, match=r"(?i)IMAGE.*shape|shape.*IMAGE"):
        infer_raw(server.grpc_url, [image_input(np.zeros((1, WIRE // 2, WIRE, 3), np.uint8))])


def test_missing_input_is_named(server):
    with pytest.raises(InferenceServerException, match=r"(?i)expected 1 inputs but got 0|IMAGE"):
        infer_raw(server.grpc_url, [])


@pytest.mark.parametrize("threshold", ["abc", -0.1, 1.5, "nan"])
def test_bad_threshold_is_named(server, offline, threshold):
    with pytest.raises(InferenceServerException, match=r"threshold .*must be"):
        infer_raw(server.grpc_url, [image_input(offline.images[:2])], parameters={"threshold": threshold})


def test_bad_requests_do_not_fail_their_batch_neighbours(server, offline):
    good_t = float(np.median(offline.little.max(1)))
    plan = [("good", good_t), ("bad", "abc"), ("good", 0.0), ("bad", -0.1), ("good", "1"), ("bad", 1.5)]
    requests = [(offline.images[i * 4 : (i + 1) * 4], t) for i, (_, t) in enumerate(plan)]
    _, executions_before = gate_counts(server.grpc_url)
    results = send_concurrently(server.grpc_url, requests)
    _, executions_after = gate_counts(server.grpc_url)
    assert executions_after - executions_before < len(plan)  # they really shared execute calls

    for i, ((kind, threshold), (result, error)) in enumerate(zip(plan, results)):
        if kind == "bad":
            assert result is None and error is not None
            assert "threshold" in error.message() and repr(threshold).strip("'") in error.message()
        else:
            assert error is None, error
            _, _, route = offline.cascade(float(threshold))
            np.testing.assert_array_equal(result.as_numpy("ROUTE")[:, 0], route[i * 4 : (i + 1) * 4])

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready("littlebig")


def test_missing_big_fails_only_the_escalated_requests(server, offline):
    """Big unloaded: requests that need it get an error naming it, little's answers still come back,
    and once big is back the same request succeeds."""
    plan = [0.0, 1.0, 0.0, 1.0]  # T=0: little answers all; T=1: every row goes to big
    requests = [(offline.images[i * 4 : (i + 1) * 4], t) for i, t in enumerate(plan)]
    with grpcclient.InferenceServerClient(server.grpc_url) as admin:
        admin.unload_model("big", headers=admin_headers(server.grpc_url, "grpc"))
        try:
            results = send_concurrently(server.grpc_url, requests)
        finally:
            admin.load_model("big", headers=admin_headers(server.grpc_url, "grpc"))
    for threshold, (result, error) in zip(plan, results):
        if threshold == 0.0:
            assert error is None, error
            assert not result.as_numpy("ROUTE").any()
        else:
            assert result is None and error is not None
            assert "'big'" in error.message()
    result, error = send_concurrently(server.grpc_url, requests[1:2])[0]
    assert error is None, error
    assert result.as_numpy("ROUTE").all()


def test_degraded_mode_answers_escalated_rows_with_little_flagged(server, offline):
    """on_big_failure=little with big unloaded: escalated rows get little's answer and ROUTE=2, the
    others ROUTE=0, and littlebig_fallback_rows_total counts them; the default still fails."""
    images = offline.images[:16]
    threshold = float(np.median(offline.little.max(1)))
    escalated = offline.little[:16].max(1) < threshold
    assert 0 < escalated.sum() < 16
    before = fallback_rows(server)
    with grpcclient.InferenceServerClient(server.grpc_url) as admin:
        admin.unload_model("big", headers=admin_headers(server.grpc_url, "grpc"))
        try:
            degraded = infer_raw(server.grpc_url, [image_input(images)], {"threshold": threshold, "on_big_failure": "little"})
            with pytest.raises(InferenceServerException, match="'big'") as failed:
                infer_raw(server.grpc_url, [image_input(images)], {"threshold": threshold})
        finally:
            admin.load_model("big", headers=admin_headers(server.grpc_url, "grpc"))
    assert failed.value.status() == "StatusCode.UNAVAILABLE"
    np.testing.assert_array_equal(degraded.as_numpy("ROUTE")[:, 0], np.where(escalated, 2, 0))
    np.testing.assert_array_equal(degraded.as_numpy("CLASS")[:, 0], offline.little[:16].argmax(1))
    assert fallback_rows(server) - before == escalated.sum()


def fallback_rows(server) -> float:
    from littlebig.client.metrics import read_samples, sample_sum

    return sample_sum(read_samples(server.metrics_url, "littlebig_fallback", settle=True), "littlebig_fallback_rows_total")
