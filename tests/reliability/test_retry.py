"""The package's clients ride through a dead gate stub and a dead server: the supervisor ends what the
stub held by restarting the server, and a request the server could not answer is sent again
(client/retry.py); a client mistake never is."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from littlebig.client.infer import LittleBigClient
from littlebig.client.retry import Retrier, RetryPolicy, retryable
from littlebig.serving.reliability import stub_pid
from littlebig.serving.server import TritonServer
from littlebig.serving.supervisor import Supervisor, SupervisorOptions


def test_only_what_the_server_could_not_answer_is_retryable():
    assert retryable(InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE"))
    assert retryable(InferenceServerException("Failed to process the request(s) for model instance 'gate_0_0', message: "
                                              "Stub process is not healthy.", status="StatusCode.INTERNAL"))
    assert retryable(ConnectionRefusedError(111, "Connection refused"))
    assert not retryable(InferenceServerException("threshold (request parameter) must be in [0, 1], got 1.5",
                                                  status="StatusCode.INVALID_ARGUMENT"))
    assert not retryable(InferenceServerException("the gate failed: KeyError('x')", status="StatusCode.INTERNAL"))
    assert not retryable(ValueError("empty batch"))


def test_a_refused_connection_is_retried_only_once_the_server_has_answered():
    """A wrong address fails at once; a server that answered and then refuses (it restarts) is asked again."""
    refused = InferenceServerException("failed to connect to all addresses; Connection refused", status="StatusCode.UNAVAILABLE")
    calls = []

    def send():
        calls.append(1)
        if len(calls) < 3:
            raise refused
        return "answer"

    with pytest.raises(InferenceServerException):
        Retrier(RetryPolicy(first_delay_s=0.01)).call(send)
    assert len(calls) == 1
    calls.clear()
    retrier = Retrier(RetryPolicy(first_delay_s=0.01), reached=True)
    assert retrier.call(send) == "answer" and retrier.retries == 2


def test_a_client_mistake_is_not_sent_again(server, offline):
    with LittleBigClient(server.grpc_url) as client:
        started = time.monotonic()
        with pytest.raises(InferenceServerException, match=r"must be in \[0, 1\]"):
            client.infer(offline.images[:2], threshold=1.5)
        assert client.retries == 0 and time.monotonic() - started < 5.0


class Loop(threading.Thread):
    """A LittleBigClient sending 4-row requests at the config T until stopped, checking every answer."""

    def __init__(self, url, offline, threshold):
        super().__init__(daemon=True)
        self.client = LittleBigClient(url, retry=RetryPolicy(deadline_s=60.0))
        self.offline, self.threshold = offline, threshold
        self.answered, self.failures, self.wrong = 0, [], 0
        self.stopping = threading.Event()

    def run(self):
        cls, _, route = self.offline.cascade(self.threshold)
        rows = 0
        while not self.stopping.is_set():
            chunk = np.arange(rows, rows + 4) % len(self.offline.images)
            rows += 4
            try:
                out = self.client.infer(self.offline.images[chunk])
            except Exception as err:  # noqa: BLE001 - recorded: the test asserts there are none
                self.failures.append(repr(err))
                continue
            self.answered += 1
            if not (np.array_equal(out["ROUTE"][:, 0], route[chunk]) and np.array_equal(out["CLASS"][:, 0], cls[chunk])):
                self.wrong += 1

    def answers_after(self, count, timeout_s=90.0):
        target, deadline = self.answered + count, time.monotonic() + timeout_s
        while self.answered < target and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.answered >= target, f"only {self.answered} answers, {self.failures[-3:]}"


def test_a_client_loop_rides_through_a_dead_gate_stub_and_a_dead_server(repository, offline, served_threshold, tmp_path):
    with TritonServer(repository, log_file=tmp_path / "log.txt") as server:
        supervisor = Supervisor(server, SupervisorOptions(interval_s=1.0))
        supervisor.start()
        loop = Loop(server.grpc_url, offline, served_threshold)
        loop.start()
        try:
            loop.answers_after(20)
            time.sleep(2.0)  # a canary round has read the gate's stubs
            os.kill(stub_pid(server.process.pid, "gate_0_0"), signal.SIGKILL)
            loop.answers_after(20)
            os.kill(server.process.pid, signal.SIGKILL)
            loop.answers_after(20)
        finally:
            loop.stopping.set()
            loop.join(90)
            supervisor.stop()
        assert not loop.is_alive(), "a request was never answered"
    assert supervisor.recoveries[("tritonserver", "restart")] == 2
    assert loop.failures == [] and loop.wrong == 0
    assert loop.client.retries > 0  # the requests the restarts ended were sent again
