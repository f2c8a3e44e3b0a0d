"""The served cascade against an offline onnxruntime computation of Eq. 4 on the same ONNX files."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from littlebig.client.infer import LittleBigClient
from littlebig.client.metrics import read_samples, sample_sum
from littlebig.serving.server import SHM_DIR, ServerError, TritonServer

BATCH = 16


def serve_all(client: LittleBigClient, images: np.ndarray, threshold=None, return_probs=False):
    outs = [client.infer(images[i : i + BATCH], threshold=threshold, return_probs=return_probs) for i in range(0, len(images), BATCH)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def assert_matches_offline(out, offline, thresholds):
    cls, conf, route = offline.cascade(thresholds)
    np.testing.assert_array_equal(out["ROUTE"][:, 0], route)
    np.testing.assert_array_equal(out["CLASS"][:, 0], cls)
    # Same ONNX, same onnxruntime, but batch composition may differ: allow float noise only.
    np.testing.assert_allclose(out["CONFIDENCE"][:, 0], conf, rtol=0, atol=2e-6)


def test_config_threshold_matches_offline_cascade(served, offline, served_threshold):
    with LittleBigClient(served.grpc_url) as client:
        out = serve_all(client, offline.images)
    assert_matches_offline(out, offline, served_threshold)
    routes = np.bincount(out["ROUTE"][:, 0], minlength=2)
    assert routes[0] > 50 and routes[1] > 50, routes  # both models really answered


@pytest.mark.parametrize("quantile", [0.1, 0.8])
def test_request_threshold_overrides_config(served, offline, quantile):
    threshold = float(np.quantile(offline.little.max(1), quantile))
    with LittleBigClient(served.grpc_url) as client:
        out = serve_all(client, offline.images, threshold=threshold)
    assert_matches_offline(out, offline, threshold)
    assert out["ROUTE"].mean() == pytest.approx(quantile, abs=0.02)


def test_threshold_zero_routes_everything_to_little(served, offline):
    with LittleBigClient(served.http_url, "http") as client:
        out = serve_all(client, offline.images, threshold=0.0)
    assert not out["ROUTE"].any()
    np.testing.assert_array_equal(out["CLASS"][:, 0], offline.little.argmax(1))


def test_threshold_one_escalates_every_unsure_row(served, offline):
    with LittleBigClient(served.grpc_url) as client:
        out = serve_all(client, offline.images, threshold="1")
    unsure = offline.little.max(1) < 1.0
    np.testing.assert_array_equal(out["ROUTE"][:, 0], unsure.astype(np.int32))
    np.testing.assert_array_equal(out["CLASS"][unsure, 0], offline.big.argmax(1)[unsure])


def test_probs_only_when_requested_and_from_the_answering_model(served, offline, served_threshold):
    images = offline.images[:BATCH]
    with LittleBigClient(served.grpc_url) as client:
        with_probs = client.infer(images, return_probs=True)
        without = client.infer(images)
    assert "PROBS" not in without
    _, _, route = offline.cascade(served_threshold)
    expected = np.where(route[:BATCH, None] == 1, offline.big[:BATCH], offline.little[:BATCH])
    np.testing.assert_allclose(with_probs["PROBS"], expected, atol=2e-6)


class Arrivals:
    """Async gRPC requests to the gate; answers are collected as they arrive, with their time."""

    def __init__(self, url):
        import time

        self.clock = time.monotonic
        self.start = self.clock()
        self.client = grpcclient.InferenceServerClient(url)
        self.done: queue.Queue = queue.Queue()

    def send(self, name, images, threshold=None):
        image = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
        image.set_data_from_numpy(images)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("CLASS", "CONFIDENCE", "ROUTE")]
        params = None if threshold is None else {"threshold": threshold}
        self.client.async_infer(
            "littlebig", [image], outputs=outputs, parameters=params,
            callback=lambda result, error: self.done.put((name, self.clock() - self.start, result, error)),
        )

    def collect(self, n):
        """(name, seconds since start, result, error) of the next ``n`` answers, in arrival order."""
        arrivals = [self.done.get(timeout=60) for _ in range(n)]
        self.client.close()
        return arrivals


def send_concurrently(url, requests):
    """Fire all (images, threshold) requests at once over async gRPC; return results in order."""
    arrivals = Arrivals(url)
    for index, (images, threshold) in enumerate(requests):
        arrivals.send(index, images, threshold)
    results = [None] * len(requests)
    for index, _, result, error in arrivals.collect(len(requests)):
        results[index] = (result, error)
    return results


def gate_counts(url):
    """Rows and executions of the gate's own model (the ensemble's gate step)."""
    with LittleBigClient(url) as gate, grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(gate.gate_model()).model_stats[0]
    return stats.inference_count, stats.execution_count


def test_concurrent_requests_with_own_thresholds_share_a_batch(served, offline):
    conf = offline.little.max(1)
    thresholds = [0.0, float(np.quantile(conf, 0.3)), float(np.quantile(conf, 0.6)), "1.0", None, float(np.quantile(conf, 0.9))]
    chunks = [slice(i * 8, (i + 1) * 8) for i in range(len(thresholds))]
    rows_before, executions_before = gate_counts(served.grpc_url)
    results = send_concurrently(served.grpc_url, [(offline.images[s], t) for s, t in zip(chunks, thresholds)])
    rows_after, executions_after = gate_counts(served.grpc_url)
    assert rows_after - rows_before == 8 * len(thresholds)
    # The gate's queue delay gathered the concurrent requests: fewer executions than requests.
    assert executions_after - executions_before < len(thresholds)

    config_threshold = float(LittleBigClient(served.grpc_url).gate_info().threshold)
    for rows, threshold, (result, error) in zip(chunks, thresholds, results):
        assert error is None, error
        t = config_threshold if threshold is None else float(threshold)
        cls, conf_expected, route = offline.cascade(t)
        np.testing.assert_array_equal(result.as_numpy("ROUTE")[:, 0], route[rows])
        np.testing.assert_array_equal(result.as_numpy("CLASS")[:, 0], cls[rows])
        np.testing.assert_allclose(result.as_numpy("CONFIDENCE")[:, 0], conf_expected[rows], atol=2e-6)


def test_classify_library_takes_paths_pil_images_and_arrays(server, tmp_path):
    from PIL import Image

    from littlebig.client.images import sample_photos

    photos = sample_photos(["chelsea", "coffee", "camera"])
    path = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(path)
    with LittleBigClient(server.grpc_url) as client:
        by_path, by_pil, by_array = (
            client.classify([source])[0]
            for source in (path, Image.fromarray(photos["chelsea"]), photos["chelsea"])
        )
        assert by_path == by_pil == by_array
        batch = client.classify(list(photos.values()), batch_size=2)
    assert len(batch) == 3 and all(p.route in (0, 1) for p in batch)


def test_metrics_count_rows_by_route_and_macs(served, offline, pair):
    def scrape():
        samples = read_samples(served.metrics_url, "littlebig_", settle=True)
        return {
            "little": sample_sum(samples, "littlebig_rows_total", route="little"),
            "big": sample_sum(samples, "littlebig_rows_total", route="big"),
            "macs": sample_sum(samples, "littlebig_macs_total"),
        }

    before = scrape()
    with LittleBigClient(served.grpc_url) as client:
        out = client.infer(offline.images[:32], threshold=float(np.median(offline.little.max(1))))
    after = scrape()
    escalated = int(out["ROUTE"].sum())
    assert 0 < escalated < 32
    assert after["big"] - before["big"] == escalated
    assert after["little"] - before["little"] == 32 - escalated
    # Eq. 5: little on every row, big on the escalated ones
    assert after["macs"] - before["macs"] == pytest.approx(32 * pair.little_macs + escalated * pair.big_macs, rel=1e-9)


def test_launcher_stops_the_server_and_reports_missing_repository(repository, tmp_path, capsys):
    with pytest.raises(RuntimeError, match="the caller failed"):
        with TritonServer(repository, log_file=tmp_path / "log.txt") as second:
            assert second.is_ready()
            process = second.process
            raise RuntimeError("the caller failed")
    assert process.poll() is not None
    assert "Started GRPCInferenceService" in (tmp_path / "log.txt").read_text()
    # A block that failed gets the server log's tail on stderr (its folder is often about to go).
    err = capsys.readouterr().err
    assert "after RuntimeError" in err and "Started GRPCInferenceService" in err
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path / "absent")


def test_a_killed_server_leaves_no_shared_memory_behind(repository, server, tmp_path):
    """Triton frees a stub's shared memory (32 MiB per python-backend instance) when it unloads the
    instance; a killed server never does, so its regions stayed in /dev/shm for good (12 per test run).
    restart() and stop() remove the killed server's own regions, and no other server's."""
    mine = TritonServer(repository, log_file=tmp_path / "log.txt").start()
    try:
        first = sorted(SHM_DIR.glob(f"{mine.shm_prefix}*"))
        assert first, f"no python backend region named {mine.shm_prefix}*"
        kill_group(mine)
        assert all(path.exists() for path in first)  # what a kill leaves
        mine.restart()
        assert mine.is_ready() and not any(path.exists() for path in first)
        second = sorted(SHM_DIR.glob(f"{mine.shm_prefix}*"))
        kill_group(mine)
    finally:
        mine.stop()
    assert second and not any(path.exists() for path in second)
    assert list(SHM_DIR.glob(f"{server.shm_prefix}*")), "the session server's regions went too"


def kill_group(server: TritonServer) -> None:
    os.killpg(server.process.pid, signal.SIGKILL)  # the server and its stubs, as a crash or OOM kill would
    server.process.wait()


SCRIPT_WITH_A_SERVER = """
import sys, time
from littlebig.serving.server import TritonServer
with TritonServer(sys.argv[1], log_file=sys.argv[2]) as server:
    print(server.process.pid, flush=True)
    time.sleep(600)
"""


def test_a_script_killed_with_sigterm_stops_its_server(repository, tmp_path):
    """SIGTERM to a script inside `with TritonServer(...)` stops the server it started instead of leaving
    it running (Python's default for SIGTERM is to die without running any `finally`)."""
    script = subprocess.Popen([sys.executable, "-c", SCRIPT_WITH_A_SERVER, str(repository), str(tmp_path / "log.txt")],
                              stdout=subprocess.PIPE, text=True)
    server_pid = None
    try:
        server_pid = int(script.stdout.readline())
        script.send_signal(signal.SIGTERM)
        code = script.wait(timeout=120)
        try:
            os.kill(server_pid, 0)  # the script's own child: gone means the script stopped it
            outlived = True
        except ProcessLookupError:
            outlived = False
        assert not outlived, f"tritonserver {server_pid} outlived the script"
        assert code == 128 + signal.SIGTERM
    finally:
        if script.poll() is None:
            script.kill()
        if server_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)  # a test that failed leaves no server behind


def test_row_whose_confidence_equals_t_stays_with_little(served, offline):
    """Eq. 4 answers with little when its max prob >= T: equality is not escalated."""
    images = offline.images[:BATCH]
    with LittleBigClient(served.grpc_url) as client:
        served = client.infer(images, threshold=0.0)["CONFIDENCE"][:, 0]
        k = int(np.argsort(served)[BATCH // 2])
        exact = float(served[k])  # a float32 value, exactly representable as the request's T
        at_t = client.infer(images, threshold=exact)["ROUTE"][:, 0]
        above_t = client.infer(images, threshold=float(np.nextafter(exact, 1.0)))["ROUTE"][:, 0]
    assert at_t[k] == 0
    assert above_t[k] == 1
    np.testing.assert_array_equal(at_t, (served < exact).astype(np.int32))


def test_ensemble_weight_mixes_probabilities_of_escalated_rows(pair, offline, tmp_path):
    """Little-Big Ensemble (paper Eq. 8): an escalated row answers (1 - w) p_little + w p_big."""
    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.options import RepositoryOptions

    w = 0.25
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(ensemble_weight=w, gate_instances=1))
    threshold = float(np.median(offline.little.max(1)))
    images = offline.images[:BATCH]
    with TritonServer(repo, log_file=tmp_path / "log.txt") as ensemble_server:
        with LittleBigClient(ensemble_server.grpc_url) as client:
            out = client.infer(images, threshold=threshold, return_probs=True)
    escalated = offline.little[:BATCH].max(1) < threshold
    expected = np.where(escalated[:, None], (1 - w) * offline.little[:BATCH] + w * offline.big[:BATCH], offline.little[:BATCH])
    np.testing.assert_array_equal(out["ROUTE"][:, 0], escalated.astype(np.int32))
    np.testing.assert_allclose(out["PROBS"], expected, atol=2e-6)
    np.testing.assert_array_equal(out["CLASS"][:, 0], expected.argmax(1))
    np.testing.assert_allclose(out["CONFIDENCE"][:, 0], expected.max(1), atol=2e-6)


SLOW_BIG_SECONDS = 2.0


def slow_big_repository(pair, out, slow="big", **options):
    """A repository with one gate instance in front of a big (or ``slow``) that takes 2 s per call."""
    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.options import RepositoryOptions

    repo = build_repository(pair.little, pair.big, out, RepositoryOptions(gate_instances=1, big_nice=0, **options))
    big_model = repo / slow / "1" / "model.py"
    # A slower model: the same runtime with a sleep in front of every execute.
    big_model.write_text(big_model.read_text() + f"""

import time

_execute = TritonPythonModel.execute


def _slow_execute(self, requests):
    time.sleep({SLOW_BIG_SECONDS})
    return _execute(self, requests)


TritonPythonModel.execute = _slow_execute
""")
    return repo


def test_a_broken_answer_from_big_fails_its_request_with_internal_and_the_gate_serves_on(pair, offline, tmp_path):
    """Big answers without CONFIDENCE (a broken model, not a failed call): the gate's own code fails on
    it in the background, and the escalated request still gets an answer, INTERNAL, counted as the
    gate's error; a request little answers is unaffected, and so is the next one."""
    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.options import RepositoryOptions

    repo = build_repository(pair.little, pair.big, tmp_path / "repo", RepositoryOptions(gate_instances=1))
    big_model = repo / "big" / "1" / "model.py"
    big_model.write_text(big_model.read_text() + """

_execute = TritonPythonModel.execute


def _without_confidence(self, requests):
    return [pb_utils.InferenceResponse(output_tensors=[t for t in r.output_tensors() if t.name() != "CONFIDENCE"])
            for r in _execute(self, requests)]


TritonPythonModel.execute = _without_confidence
""")
    with TritonServer(repo, log_file=tmp_path / "log.txt") as running:
        requests = Arrivals(running.grpc_url)
        requests.send("escalated", offline.images[:2], 1.0)
        requests.send("little", offline.images[:2], 0.0)
        answers = {name: (result, error) for name, _, result, error in requests.collect(2)}
        error = answers["escalated"][1]
        assert error is not None and error.status() == "StatusCode.INTERNAL" and "the gate failed" in error.message(), error
        assert answers["little"][1] is None and not answers["little"][0].as_numpy("ROUTE").any()
        with LittleBigClient(running.grpc_url) as client:
            assert not client.infer(offline.images[:2], threshold=0.0)["ROUTE"].any()
        samples = read_samples(running.metrics_url, "littlebig_errors", settle=True)
        assert sample_sum(samples, "littlebig_errors_total", cause="gate") == 1


@pytest.fixture(scope="module")
def slow_big_server(pair, tmp_path_factory):
    """One gate instance in front of a big that takes 2 s per call."""
    work = tmp_path_factory.mktemp("slow_big")
    with TritonServer(slow_big_repository(pair, work / "repo"), log_file=work / "log.txt") as running:
        yield running


def test_little_answers_do_not_wait_for_a_slow_big(slow_big_server, offline):
    """A request little answers, sent while an escalated one waits for big, comes back long before
    it: the gate instance does not block on big."""
    import time

    images = offline.images[:4]
    requests = Arrivals(slow_big_server.grpc_url)
    requests.send("escalated", images, 1.0)
    time.sleep(0.5)  # the escalated request is with big by now
    requests.send("little", images, 0.0)
    arrivals = requests.collect(2)
    assert [error for *_, error in arrivals] == [None, None]
    (first, first_at, first_result, _), (second, second_at, second_result, _) = arrivals
    assert (first, second) == ("little", "escalated")
    assert not first_result.as_numpy("ROUTE").any() and second_result.as_numpy("ROUTE").all()
    assert first_at < SLOW_BIG_SECONDS - 0.5  # not held behind big
    assert second_at >= SLOW_BIG_SECONDS


def test_reloading_the_gate_keeps_escalations_in_flight(slow_big_server, offline):
    """A live threshold change reloads the gate; a request already waiting for big still gets its
    answer from the old instance, and the new one serves with the new T."""
    import time

    from littlebig.client.control import served_threshold, switch_threshold

    before = served_threshold(slow_big_server.grpc_url)
    requests = Arrivals(slow_big_server.grpc_url)
    requests.send("escalated", offline.images[:4], 1.0)
    time.sleep(0.5)
    switch_threshold(slow_big_server.grpc_url, 0.0)
    ((_, _, result, error),) = requests.collect(1)
    assert error is None, error
    assert result.as_numpy("ROUTE").all()
    assert served_threshold(slow_big_server.grpc_url) == 0.0 != before
    with LittleBigClient(slow_big_server.grpc_url) as client:
        assert not client.infer(offline.images[:4])["ROUTE"].any()


def test_children_without_in_graph_top1_still_match_offline(pair, offline, served_threshold, tmp_path):
    """Files exported before CLASS/CONFIDENCE were in the graph: the gate falls back to reading PROBS."""
    import onnx

    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.configs import read_config
    from littlebig.model_repository.options import RepositoryOptions

    paths = {}
    for role, path in (("little", pair.little), ("big", pair.big)):
        model = onnx.load(str(path))
        keep = [o for o in model.graph.output if o.name == "PROBS"]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        paths[role] = tmp_path / f"{role}.onnx"
        onnx.save(model, str(paths[role]))
    repo = build_repository(paths["little"], paths["big"], tmp_path / "repo", RepositoryOptions(threshold=served_threshold, intra_op_threads=1))
    assert read_config(repo / "gate" / "config.pbtxt").parameters["children_top1"].string_value == "0"
    with TritonServer(repo, log_file=tmp_path / "log.txt") as old, LittleBigClient(old.grpc_url) as client:
        images = offline.images[:64]
        out = serve_all(client, images, return_probs=True)
        little_offline = type(offline)(images, offline.little[:64], offline.big[:64])
        assert_matches_offline(out, little_offline, served_threshold)
        expected = np.where(out["ROUTE"] == 1, little_offline.big, little_offline.little)
        np.testing.assert_allclose(out["PROBS"], expected, rtol=0, atol=2e-6)


def test_little_in_the_gate_matches_offline_without_calling_little(pair, offline, served_threshold, tmp_path):
    """--little-in-gate: stage 0 runs in the gate's process. Same answers as Eq. 4 offline, at the
    config T and under concurrent requests with escalations in flight; the served `little` is never
    asked, and the seconds little spent in the gate are counted."""
    import concurrent.futures

    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.options import RepositoryOptions

    options = RepositoryOptions(threshold=served_threshold, intra_op_threads=1, little_in_gate=True)
    repo = build_repository(pair.little, pair.big, tmp_path / "repo", options)
    with TritonServer(repo, log_file=tmp_path / "log.txt") as running, LittleBigClient(running.grpc_url) as client:
        stats = grpcclient.InferenceServerClient(running.grpc_url)
        little_before = stats.get_inference_statistics("little").model_stats[0].execution_count
        assert_matches_offline(serve_all(client, offline.images, served_threshold), offline, served_threshold)
        out = serve_all(client, offline.images[:64], return_probs=True)
        expected = np.where(out["ROUTE"] == 1, offline.big[:64], offline.little[:64])
        np.testing.assert_allclose(out["PROBS"], expected, rtol=0, atol=2e-6)

        def one(start):  # a thread per request: each has its own client, so they share gate batches
            with LittleBigClient(running.grpc_url) as own:
                return start, own.infer(offline.images[start : start + 4])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parts = sorted(pool.map(one, range(0, len(offline.images), 4)))
        assert_matches_offline({k: np.concatenate([p[k] for _, p in parts]) for k in ("CLASS", "CONFIDENCE", "ROUTE")},
                               offline, served_threshold)
        assert stats.get_inference_statistics("little").model_stats[0].execution_count == little_before
        samples = read_samples(running.metrics_url, "littlebig_in_gate", settle=True)
        assert sample_sum(samples, "littlebig_in_gate_seconds_total", stage="little") > 0.0
