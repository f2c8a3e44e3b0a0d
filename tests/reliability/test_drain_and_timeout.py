"""Nothing hangs, nothing is lost: SIGTERM to `littlebig serve` lets accepted requests finish before
little and big are unloaded; a child slower than child_timeout_ms fails the call (or, in degraded
mode, little answers) instead of holding the request."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.server import TritonServer, free_port

from ..test_serving import SLOW_BIG_SECONDS, Arrivals, slow_big_repository


def test_sigterm_drains_accepted_requests_before_unloading_the_children(pair, offline, tmp_path):
    """With a slow little and one gate instance, requests accepted before SIGTERM still have their
    little and big calls to make after it (Triton's own shutdown refused those: "Server not ready")."""
    repo = slow_big_repository(pair, tmp_path / "repo", slow="little")
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "triton.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "littlebig.cli", "serve", "--repo", str(repo), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--log-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in serve.stdout:
            if line.startswith("Ctrl-C"):
                break
        requests = Arrivals(f"127.0.0.1:{grpc}")
        for i in range(3):  # the first waits for little, the others in the gate's queue
            requests.send(i, offline.images[i * 2 : i * 2 + 2], 1.0)
            time.sleep(0.2)
        serve.send_signal(signal.SIGTERM)
        arrivals = requests.collect(3)
        assert serve.wait(timeout=120) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    assert [error for *_, error in arrivals] == [None] * 3, [e.message() for *_, e in arrivals if e]
    for _, _, result, _ in arrivals:
        assert result.as_numpy("ROUTE").all()
    text = log.read_text()
    # The gate went first; little and big were unloaded only after it.
    assert text.index("successfully unloaded 'littlebig'") < text.index("successfully unloaded 'big'")
    assert "Server not ready" not in text


def test_a_child_slower_than_the_timeout_fails_the_call_or_falls_back(pair, offline, tmp_path):
    repo = slow_big_repository(pair, tmp_path / "repo", child_timeout_ms=int(SLOW_BIG_SECONDS * 1000 / 4))
    images = offline.images[:4]
    with TritonServer(repo, log_file=tmp_path / "log.txt") as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            image = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
            image.set_data_from_numpy(images)
            with pytest.raises(InferenceServerException, match=r"model 'big' failed: no answer within 0\.5 s") as info:
                client.infer("littlebig", [image], parameters={"threshold": 1.0})
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            degraded = client.infer("littlebig", [image], parameters={"threshold": 1.0, "on_big_failure": "little"})
            little_only = client.infer("littlebig", [image], parameters={"threshold": 0.0})
    np.testing.assert_array_equal(degraded.as_numpy("ROUTE")[:, 0], 2)
    np.testing.assert_array_equal(degraded.as_numpy("CLASS")[:, 0], offline.little[:4].argmax(1))
    np.testing.assert_array_equal(little_only.as_numpy("CLASS")[:, 0], offline.little[:4].argmax(1))
