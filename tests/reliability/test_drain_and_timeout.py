"""Nothing hangs, nothing is lost: SIGTERM to `littlebig serve` lets accepted requests finish before
little and big are unloaded; a child slower than child_timeout_ms fails the call (or, in degraded
mode, little answers) instead of holding the request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.serving.server import ServerError, TritonServer, free_port

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


def test_an_interrupted_stop_kills_the_server_and_no_restart_follows(pair, tmp_path, monkeypatch):
    """A second Ctrl-C (or SIGTERM) during the drain must not leave tritonserver running (it is in its
    own session: nothing else would stop it), and once a stop began the supervisor cannot bring it back.
    little's instance group is named here, so the supervisor's stub names follow Triton's naming."""
    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.configs import read_config, write_config
    from littlebig.model_repository.options import RepositoryOptions
    from littlebig.serving.supervisor import Supervisor, stub_processes

    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(gate_instances=1))
    config = read_config(repo / "little" / "config.pbtxt")
    config.instance_group[0].name = "pool"
    write_config(repo / "little", config)
    server = TritonServer(repo, log_file=tmp_path / "log.txt").start()
    try:
        names = Supervisor(server)._models()["little"]
        assert names and names[0].startswith("pool_"), names
        assert set(names) <= set(stub_processes(server.process.pid)), (names, stub_processes(server.process.pid))

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(server, "drain", interrupted)
        with pytest.raises(KeyboardInterrupt):
            server.stop()
        assert server.process.poll() is not None
        assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
        with pytest.raises(ServerError, match="being stopped"):
            server.restart()
    finally:
        if server.process is not None and server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
