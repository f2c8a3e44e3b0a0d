"""Gears: the ladder from calibration data (pure numpy), and the gate moving along it through the real
server: down while a deliberately slow big misses a small latency target, back when big is fast again,
every answer equal to offline Eq. 4 at the T it reports; and Triton's queue policy refusing with
UNAVAILABLE when the gate's queue is full."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from littlebig.client import gears as g
from littlebig.gate.gears import Gears
from littlebig.gate.held import Held
from littlebig.gate.observations import PooledObservations
from littlebig.gate.rows import ChildAnswer, Escalation
from littlebig.client import thresholds as th
from littlebig.client.infer import LittleBigClient
from littlebig.client.metrics import read_samples, sample_sum
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.facts import RepositoryError
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

# ---------------------------------------------------------------- the ladder (pure numpy)


def outcomes(confidence, little_correct, big_correct) -> th.Outcomes:
    little_correct, big_correct = np.asarray(little_correct, bool), np.asarray(big_correct, bool)
    return th.Outcomes(np.asarray(confidence, np.float32), little_correct, big_correct,
                       little_correct == big_correct, 1_000_000_000, 4_000_000_000)


def test_ladder_stops_at_the_first_threshold_over_budget():
    # 10 images, chosen T = 0.95 escalates everything below it. Lowering T keeps, in order of falling
    # confidence: 0.9 (little right: no loss), 0.8 (little wrong, big right: -1 image = -10 points).
    conf = [0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    little = [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    big = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    ladder = g.ladder(outcomes(conf, little, big), 0.95, budget=0.05, count=4)
    assert ladder.gears[0].threshold == 0.95 and ladder.gears[0].drop == 0.0
    # The floor keeps 0.9 but not 0.8 (whose loss breaks the budget) although everything further down
    # is free again: the scan stops at the first breach.
    assert [round(x.escalation, 3) for x in ladder.gears] == [0.9, 0.8]
    assert 0.8 < ladder.gears[-1].threshold <= 0.9
    assert all(x.drop <= 0.05 for x in ladder.gears)


def test_ladder_spreads_gears_evenly_in_escalation_and_states_bounds():
    rng = np.random.default_rng(0)
    n = 2000
    conf = rng.uniform(0.1, 1.0, n)
    little = rng.uniform(size=n) < conf  # little is right about as often as it is sure
    big = rng.uniform(size=n) < 0.9
    o = outcomes(conf, little, big)
    ladder = g.ladder(o, 0.6, budget=0.03, count=4)
    thresholds = [x.threshold for x in ladder.gears]
    assert thresholds == sorted(thresholds, reverse=True) and len(set(thresholds)) == len(thresholds) == 4
    steps = np.diff([x.escalation for x in ladder.gears])
    assert np.all(steps < 0) and steps.max() - steps.min() < 0.01  # even steps
    s = th.sweep(o, np.array(thresholds))
    for gear, accuracy in zip(ladder.gears, s.accuracy):
        assert gear.drop == pytest.approx(s.accuracy[0] - accuracy)  # measured against the chosen T
        assert gear.drop <= 0.03 + 1e-12 and gear.upper_drop >= gear.drop
    # One more row below the floor would break the budget (or the floor is T = 0).
    below = th.candidate_thresholds(o.confidence)
    below = below[below < thresholds[-1]]
    if len(below):
        nxt = th.sweep(o, below[-1:])
        assert s.accuracy[0] - nxt.accuracy[0] > 0.03 or nxt.escalation[0] == s.escalation[-1]
    certified = g.ladder(o, 0.6, budget=0.03, count=4, certified=True)
    assert certified.gears[-1].threshold >= ladder.gears[-1].threshold
    assert all(x.upper_drop <= 0.03 + 1e-12 for x in certified.gears)


def test_ladder_needs_labels_and_roundtrips():
    o = outcomes([0.9, 0.5], [1, 0], [1, 1])
    with pytest.raises(ValueError, match="labelled"):
        g.ladder(dataclasses.replace(o, little_correct=None, big_correct=None), 0.6)
    ladder = g.ladder(o, 0.6, budget=0.0)
    assert [x.threshold for x in ladder.gears] == [0.6]  # nothing below is free: one gear
    assert g.Ladder.from_dict(json.loads(json.dumps(ladder.as_dict()))) == ladder
    assert json.loads(ladder.config_value()) == [[0.6, 0.0]]


def test_repository_refuses_a_ladder_that_does_not_start_at_t(pair, tmp_path):
    with pytest.raises(RepositoryError, match="start at the threshold"):
        build_repository(pair.little, pair.big, tmp_path / "r", RepositoryOptions(threshold=0.5, gears="[[0.4, 0]]"))
    with pytest.raises(RepositoryError, match="needs gears"):
        build_repository(pair.little, pair.big, tmp_path / "r", RepositoryOptions(latency_target_ms=10))


def test_repository_refuses_a_deadline_it_cannot_keep(pair, tmp_path):
    ladder = "[[0.5, 0], [0.4, 0.002]]"
    for options, match in (
        (RepositoryOptions(threshold=0.5, gears=ladder, latency_target_ms=100, gear_deadline_ms=float("inf")), "number of ms"),
        (RepositoryOptions(threshold=0.5, gear_deadline_ms=50), "ladder"),
        (RepositoryOptions(threshold=0.5, gears=ladder, latency_target_ms=float("nan")), "latency_target_ms must be a number of ms"),
        (RepositoryOptions(threshold=0.5, gears=ladder, latency_target_ms=float("inf")), "latency_target_ms must be a number of ms"),
        (RepositoryOptions(threshold=0.5, gears=ladder, latency_target_ms=100, gear_deadline_ms=500, child_timeout_ms=400),
         "below the child timeout"),
    ):
        with pytest.raises(RepositoryError, match=match):
            build_repository(pair.little, pair.big, tmp_path / "r", options)


# ---------------------------------------------------------------- through the server

# A model that sleeps this many seconds per execute while the file `slow` in its model folder says so.
SLOW_PATCH = '''

import os as _os
import time as _time

_plain_initialize, _plain_execute = TritonPythonModel.initialize, TritonPythonModel.execute


def _initialize(self, args):
    self._slow_file = _os.path.join(args["model_repository"], "slow")
    _plain_initialize(self, args)


def _execute(self, requests):
    try:
        with open(self._slow_file) as f:
            _time.sleep(float(f.read()))
    except FileNotFoundError:
        pass
    return _plain_execute(self, requests)


TritonPythonModel.initialize, TritonPythonModel.execute = _initialize, _execute
'''
TARGET_MS = 100
QUEUE = 4


@dataclasses.dataclass
class GearServer:
    server: TritonServer
    repository: Path
    ladder: list[float]


def serve_with_gears(pair, offline, tmp_path_factory, gate_instances, deadline_ms=0.0, little_in_gate=None):
    """Gears on a 100 ms target; no deadline unless asked (most tests here are about the controller)."""
    conf = offline.little.max(1)
    ladder = [float(np.quantile(conf, q)) for q in (0.6, 0.3, 0.1)]
    options = RepositoryOptions(
        threshold=ladder[0], intra_op_threads=1, gate_instances=gate_instances,
        gears=g.gears_parameter(zip(ladder, (0.0, 0.004, 0.009))), latency_target_ms=TARGET_MS, gear_interval_ms=100,
        max_queue_size=QUEUE, gear_deadline_ms=deadline_ms, little_in_gate=little_in_gate,
    )
    repository = build_repository(pair.little, pair.big, tmp_path_factory.mktemp("gears") / "repository", options)
    for model in ("little", "big", "gate"):
        code = repository / model / "1" / "model.py"
        code.write_text(code.read_text() + SLOW_PATCH)
    log = tmp_path_factory.mktemp("gears-server") / "tritonserver.log"
    with TritonServer(repository, log_file=log) as server:
        yield GearServer(server, repository, ladder)


@pytest.fixture(scope="module")
def gear_server(pair, offline, tmp_path_factory):
    """Two gate instances: they decide from pooled observations."""
    yield from serve_with_gears(pair, offline, tmp_path_factory, gate_instances=2)


@pytest.fixture(scope="module")
def deadline_server(pair, offline, tmp_path_factory):
    """Two gate instances, the builder's default deadline (0.9 x the target: 90 ms), and little as the
    ensemble's step before the gate (the other servers here run it inside)."""
    yield from serve_with_gears(pair, offline, tmp_path_factory, gate_instances=2, deadline_ms=None, little_in_gate=False)


@pytest.fixture(scope="module")
def held_server(pair, offline, tmp_path_factory):
    """One gate instance: it holds escalations for big."""
    yield from serve_with_gears(pair, offline, tmp_path_factory, gate_instances=1)


def load(url, images, seconds, concurrency=QUEUE, pin=None):
    """Closed loop: each worker sends 2-row requests; returns (indices, CLASS, ROUTE, THRESHOLD) of all answers."""
    answers, errors = [], []
    end = time.monotonic() + seconds

    def worker(k):
        with LittleBigClient(url) as client:
            i = k * 2
            while time.monotonic() < end:
                rows = np.arange(i, i + 2) % len(images)
                try:
                    out = client.infer(images[rows], threshold=pin if k == 0 else None,
                                       outputs=["CLASS", "ROUTE", "THRESHOLD"])
                except Exception as err:  # noqa: BLE001 - collected and asserted on below
                    errors.append(err)
                    return
                answers.append((rows, out, k == 0 and pin is not None))
                i += 2 * concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return answers


def assert_eq4_at_reported_t(answers, offline):
    """Every answer is Eq. 4 (offline, onnxruntime) at the T its THRESHOLD output reports."""
    for rows, out, _ in answers:
        thresholds = np.zeros(len(offline.images))
        thresholds[rows] = out["THRESHOLD"][:, 0]
        cls, _, route = offline.cascade(thresholds)
        np.testing.assert_array_equal(out["ROUTE"][:, 0], route[rows])
        np.testing.assert_array_equal(out["CLASS"][:, 0], cls[rows])


def gear_metric(metrics_url, name):
    return sample_sum(read_samples(metrics_url, "littlebig_gear", settle=True), name)


def test_gate_moves_down_under_load_and_back_after(gear_server, offline):
    server, ladder = gear_server.server, gear_server.ladder
    slow = gear_server.repository / "big" / "slow"
    # Met target (big fast, light load): gear 0, answers of the fixed T.
    calm = load(server.grpc_url, offline.images, 1.0, concurrency=1)
    assert {float(t) for _, out, _ in calm for t in out["THRESHOLD"][:, 0]} == {ladder[0]}
    assert_eq4_at_reported_t(calm, offline)

    slow.write_text("0.5")  # every escalation now takes > 5x the target
    pin = 0.9
    try:
        busy = load(server.grpc_url, offline.images, 4.0, pin=pin)
        assert gear_metric(server.metrics_url, "littlebig_gear") > 0
    finally:
        slow.unlink()
    reported = {float(t) for _, out, pinned in busy if not pinned for t in out["THRESHOLD"][:, 0]}
    assert reported <= set(ladder) and min(reported) < ladder[0], reported  # moved down along the ladder
    assert all((out["THRESHOLD"] == pin).all() for _, out, pinned in busy if pinned)  # pinned: never adapted
    assert any(pinned for _, _, pinned in busy)
    assert_eq4_at_reported_t(busy, offline)

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # big is fast again: back to gear 0
        after = load(server.grpc_url, offline.images, 0.5, concurrency=1)
        if all((out["THRESHOLD"] == ladder[0]).all() for _, out, _ in after[-3:]):
            break
    assert all((out["THRESHOLD"] == ladder[0]).all() for _, out, _ in after[-3:])
    assert gear_metric(server.metrics_url, "littlebig_gear") == 0
    assert_eq4_at_reported_t(after, offline)
    seconds = read_samples(server.metrics_url, "littlebig_gear_seconds_total", settle=True)
    assert sum(v for _, labels, v in seconds if labels["gear"] != "0") > 0  # time in lower gears was counted
    assert gear_metric(server.metrics_url, "littlebig_gear_accuracy_cost_total") > 0


def home(server, image):
    """Bring the gate back to gear 0 after an earlier test: a request after a quiet spell (a decision needs
    an execute or an escalation waiting), until every instance reports gear 0."""
    def one(_):
        with LittleBigClient(server.grpc_url) as client:
            client.infer(image, outputs=["CLASS"])

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.3)
        with ThreadPoolExecutor(4) as pool:  # concurrent, so that both gate instances execute
            list(pool.map(one, range(4)))
        if gear_metric(server.metrics_url, "littlebig_gear") == 0:
            return
    raise AssertionError("the gate did not come back to gear 0")


def send_while_big_sleeps(served, images, seconds, jobs):
    """Each job (name, rows, delay[, pinned T]) sends one request ``delay`` s after the start, in its own
    thread, while big sleeps ``seconds`` per execute; returns name -> (rows, outputs, latency s)."""
    answers = {}

    def send(name, rows, delay, pin=None):
        time.sleep(delay)
        with LittleBigClient(served.server.grpc_url) as client:
            sent = time.monotonic()
            out = client.infer(images[rows], threshold=pin, outputs=["CLASS", "ROUTE", "THRESHOLD"])
            answers[name] = (rows, out, time.monotonic() - sent)

    slow = served.repository / "big" / "slow"
    slow.write_text(str(seconds))
    try:
        threads = [threading.Thread(target=send, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        slow.unlink()
    return answers


def test_a_step_down_answers_requests_waiting_for_big_at_the_new_t(gear_server, offline):
    """Requests already waiting for a stuck big leave as soon as the gears step down, answered by little
    where little is sure enough at the new T; a row below every gear's T still gets big's answer."""
    server, ladder = gear_server.server, gear_server.ladder
    conf = offline.little.max(1).astype(np.float64)
    middle = np.flatnonzero((conf >= ladder[-1]) & (conf < ladder[0]))[:2]  # big's at gear 0, little's at the last gear
    low = np.flatnonzero(conf < ladder[-1])[:1]  # big's at every gear
    sure = np.flatnonzero(conf >= ladder[0])[:1]  # little's at every gear
    home(server, offline.images[sure])
    settled_before = gear_metric(server.metrics_url, "littlebig_gear_settled_rows_total")
    big_sleep = 2.0
    # Both escalate at gear 0; the later request's execute finds the oldest escalation far over the
    # target (100 ms) and steps down to the last gear.
    answers = send_while_big_sleeps(gear_server, offline.images, big_sleep,
                                    [("middle", middle, 0.0), ("low", low, 0.05), ("trigger", sure, 0.5)])
    rows, out, seconds = answers["middle"]
    assert seconds < big_sleep, seconds  # it did not wait for big
    np.testing.assert_array_equal(out["THRESHOLD"][:, 0], ladder[-1])
    np.testing.assert_array_equal(out["ROUTE"][:, 0], 0)
    rows, out, seconds = answers["low"]
    assert seconds >= big_sleep, seconds
    np.testing.assert_array_equal(out["THRESHOLD"][:, 0], ladder[0])  # escalated at gear 0: big's answer
    np.testing.assert_array_equal(out["ROUTE"][:, 0], 1)
    assert_eq4_at_reported_t(list(answers.values()), offline)
    settled = gear_metric(server.metrics_url, "littlebig_gear_settled_rows_total") - settled_before
    assert settled == len(middle)


def test_rows_still_waiting_for_big_at_the_deadline_get_little_at_the_highest_gear_they_clear(deadline_server, offline):
    """Before any miss can be confirmed, the deadline answers each adaptive row waiting for big with
    little's answer at the highest gear T its signal clears; rows below every gear and pinned requests
    wait for big."""
    served, ladder = deadline_server, deadline_server.ladder
    conf = offline.little.max(1).astype(np.float64)
    # One row clearing gear 1 and one clearing only gear 2 (the last): both big's at gear 0.
    middle = np.concatenate([np.flatnonzero((conf >= ladder[k]) & (conf < ladder[k - 1]))[:1] for k in (1, 2)])
    low = np.flatnonzero(conf < ladder[-1])[:1]
    home(served.server, offline.images[np.flatnonzero(conf >= ladder[0])[:1]])
    before = gear_metric(served.server.metrics_url, "littlebig_gear_deadline_rows_total")
    big_sleep = 1.0
    answers = send_while_big_sleeps(served, offline.images, big_sleep, [
        ("middle", middle, 0.0), ("mixed", np.concatenate([middle, low]), 0.0), ("pinned", middle, 0.0, ladder[0])])
    rows, out, seconds = answers["middle"]
    assert seconds < big_sleep, seconds  # answered at the deadline, not by big
    np.testing.assert_array_equal(out["THRESHOLD"][:, 0], ladder[1:])
    np.testing.assert_array_equal(out["ROUTE"][:, 0], 0)
    rows, out, seconds = answers["mixed"]
    assert seconds >= big_sleep, seconds  # its low row waited for big
    np.testing.assert_array_equal(out["THRESHOLD"][:, 0], [*ladder[1:], ladder[0]])
    np.testing.assert_array_equal(out["ROUTE"][:, 0], [0, 0, 1])
    rows, out, seconds = answers["pinned"]  # never adapted: big's answers, after big's sleep
    assert seconds >= big_sleep, seconds
    np.testing.assert_array_equal(out["ROUTE"][:, 0], 1)
    np.testing.assert_array_equal(out["THRESHOLD"][:, 0], ladder[0])
    assert_eq4_at_reported_t(list(answers.values()), offline)
    assert gear_metric(served.server.metrics_url, "littlebig_gear_deadline_rows_total") - before == 2 * len(middle)


def big_rows(url) -> int:
    with grpcclient.InferenceServerClient(url) as client:
        return int(client.get_inference_statistics("big", as_json=True)["model_stats"][0].get("inference_count", 0))


def test_big_never_computes_a_call_whose_rows_the_deadline_answered(deadline_server, offline):
    """Calls whose rows all clear the last gear carry their deadline as a queue timeout: while big works
    on a row that needs it, they are answered at the deadline and big's queue drops them unexecuted."""
    served, ladder = deadline_server, deadline_server.ladder
    conf = offline.little.max(1).astype(np.float64)
    middle = np.flatnonzero((conf >= ladder[-1]) & (conf < ladder[0]))[:3]
    low = np.flatnonzero(conf < ladder[-1])[:1]
    home(served.server, offline.images[np.flatnonzero(conf >= ladder[0])[:1]])
    dropped_before = gear_metric(served.server.metrics_url, "littlebig_gear_dropped_rows_total")
    computed_before = big_rows(served.server.grpc_url)
    jobs = [("low", low, 0.0)] + [(f"middle{k}", middle[k : k + 1], 0.1 + 0.02 * k) for k in range(len(middle))]
    answers = send_while_big_sleeps(served, offline.images, 1.0, jobs)
    for k in range(len(middle)):
        _, out, seconds = answers[f"middle{k}"]
        assert seconds < 1.0 and out["ROUTE"][0, 0] == 0, (seconds, out)
    assert answers["low"][1]["ROUTE"][0, 0] == 1
    assert_eq4_at_reported_t(list(answers.values()), offline)
    # Big may have begun one more 1 s execute before it was fast again: whatever it was sent has been
    # computed or dropped after 2.5 s.
    time.sleep(2.5)
    assert big_rows(served.server.grpc_url) - computed_before == 1  # low's row only
    assert gear_metric(served.server.metrics_url, "littlebig_gear_dropped_rows_total") - dropped_before == len(middle)


def test_rows_held_for_big_never_reach_it_after_a_step_down(held_server, offline):
    """While big works on the one gate instance's call, later escalations wait in the gate, where a step
    down settles them before big spends anything on them."""
    server, ladder = held_server.server, held_server.ladder
    conf = offline.little.max(1).astype(np.float64)
    middle = np.flatnonzero((conf >= ladder[-1]) & (conf < ladder[0]))[:3]  # big's at gear 0, little's at the last gear
    low = np.flatnonzero(conf < ladder[-1])[:1]
    home(server, offline.images[np.flatnonzero(conf >= ladder[0])[:1]])
    settled_before = gear_metric(server.metrics_url, "littlebig_gear_settled_rows_total")
    computed_before = big_rows(server.grpc_url)
    # `low` occupies big; the three 1-row requests escalate at gear 0 before the gate steps down
    # (the oldest escalation is far over the 100 ms target after 0.2 s) and are held meanwhile.
    jobs = [("low", low, 0.0)] + [(f"middle{k}", middle[k : k + 1], 0.03 + 0.02 * k) for k in range(len(middle))]
    answers = send_while_big_sleeps(held_server, offline.images, 1.0, jobs)
    for k in range(len(middle)):
        _, out, _ = answers[f"middle{k}"]
        assert out["THRESHOLD"][0, 0] == ladder[-1] and out["ROUTE"][0, 0] == 0
    assert answers["low"][1]["ROUTE"][0, 0] == 1
    assert_eq4_at_reported_t(list(answers.values()), offline)
    assert gear_metric(server.metrics_url, "littlebig_gear_settled_rows_total") - settled_before == len(middle)
    time.sleep(1.5)  # big finishes whatever it was sent (fast again now) before its count is read
    assert big_rows(server.grpc_url) - computed_before == 1  # low's row only


def test_gate_refuses_gear_timings_it_cannot_use_and_keeps_serving(gear_server, offline):
    """A reload with a latency target, interval or deadline that is not a usable number of ms fails with
    the parameter's name (it would have turned the gears off, or never moved them), and the gate already
    loaded keeps serving."""
    server = gear_server.server
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config("gate", as_json=True)["config"]  # the ensemble's gate step
        for key, value in (("latency_target_ms", "-5"), ("latency_target_ms", "nan"), ("gear_interval_ms", "0"),
                           ("gear_interval_ms", "soon"), ("gear_deadline_ms", "inf")):
            bad = json.loads(json.dumps(config))
            bad["parameters"][key] = {"string_value": value}
            with pytest.raises(Exception, match=key):
                client.load_model("gate", config=json.dumps(bad), headers=server.admin_headers())
    with LittleBigClient(server.grpc_url) as client:
        out = client.infer(offline.images[:4], outputs=["CLASS"])
    assert len(out["CLASS"]) == 4


def test_full_queue_is_refused_with_unavailable(gear_server, offline):
    server = gear_server.server
    slow = gear_server.repository / "gate" / "slow"  # little runs inside the gate, whose queue is bounded
    slow.write_text("0.5")  # both gate instances are slow; requests pile up in the gate's queue
    outcomes = []

    def send(i):
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            image = grpcclient.InferInput("IMAGE", [1, *offline.images.shape[1:]], "UINT8")
            image.set_data_from_numpy(offline.images[i : i + 1])
            try:
                client.infer("littlebig", [image])
                outcomes.append("ok")
            except grpcclient.InferenceServerException as err:
                outcomes.append((err.status(), err.message()))

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join()
    finally:
        slow.unlink()
    refused = [o for o in outcomes if o != "ok"]
    assert refused and outcomes.count("ok") >= QUEUE, outcomes
    for status, message in refused:
        assert status == "StatusCode.UNAVAILABLE" and "queue" in message.lower(), (status, message)


def test_repo_command_installs_gears_and_queue_policy(pair, tmp_path):
    from littlebig.cli import main
    from littlebig.model_repository.builder import gate_config_path
    from littlebig.model_repository.configs import read_config

    ladder = g.Ladder((g.Gear(0.4, 0.2, 1.0, 0.9, 0.0, 0.0), g.Gear(0.3, 0.1, 0.9, 0.895, 0.005, 0.02)), 0.01, 0.95, False)
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "report.json").write_text(json.dumps({"threshold": 0.4, "gears": ladder.as_dict()}))
    main(["repo", "--little", str(pair.little), "--big", str(pair.big), "--out", str(tmp_path / "repo"),
          "--gears", str(tmp_path / "calib"), "--latency-target-ms", "250", "--max-queue-size", "8", "--queue-timeout-ms", "2000"])
    config = read_config(gate_config_path(tmp_path / "repo"))
    assert float(config.parameters["thresholds"].string_value) == 0.4  # the ladder's top
    assert json.loads(config.parameters["gears"].string_value) == [[0.4, 0.0], [0.3, 0.005]]
    assert float(config.parameters["latency_target_ms"].string_value) == 250
    assert float(config.parameters["gear_deadline_ms"].string_value) == 225  # 0.9 x the target by default
    big = read_config(tmp_path / "repo" / "big" / "config.pbtxt").dynamic_batching.default_queue_policy
    assert big.allow_timeout_override and big.timeout_action == big.REJECT  # so a call can carry its deadline
    assert big.default_timeout_microseconds == RepositoryOptions.child_timeout_ms * 1000  # overrides need a default
    policy = config.dynamic_batching.default_queue_policy  # little runs inside the gate: requests queue there
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (8, 2_000_000)
    assert policy.timeout_action == policy.REJECT
    main(["repo", "--little", str(pair.little), "--big", str(pair.big), "--out", str(tmp_path / "step"), "--no-little-in-gate",
          "--max-queue-size", "8"])
    policy = read_config(tmp_path / "step" / "little" / "config.pbtxt").dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 8  # little as the ensemble's first step: requests queue at little
    assert not read_config(tmp_path / "step" / "gate" / "config.pbtxt").dynamic_batching.HasField("default_queue_policy")



# ---------------------------------------------------------------- the controller alone (from the gate's source)


class Recorder:
    def __init__(self):
        self.value = 0.0

    def set(self, value):
        self.value = value


def gate_gears(ladder, target_s=0.1, interval_s=0.5, seen=None):
    """The gate's Gears class with stand-in metrics."""
    counts = {}
    metrics = types.SimpleNamespace(gear=Recorder(), threshold=Recorder(), seconds=[f"s{k}" for k in range(len(ladder))], cost="cost")

    def count(metric, amount):
        counts[metric] = counts.get(metric, 0) + amount

    return Gears(ladder, target_s, interval_s, metrics, count, 0.0, seen), counts


def test_controller_down_on_a_p99_miss_up_after_calm_intervals_and_home_after_quiet():
    ladder = [(0.5, 0.0), (0.4, 0.002), (0.3, 0.008)]
    gears, counts = gate_gears(ladder)  # target 0.1 s, decisions every 0.5 s, judged on the last 2 s of answers
    t, spent = 0.0, []

    def tick(latency, rows=10, late=0):
        """One interval: ``rows`` answers that took ``latency`` and ``late`` that took 0.15 s (over the
        target); returns the T in force for them (decided at its start from the answers before)."""
        nonlocal t
        t += 0.5
        started = gears.start(t)
        gears.little_answered(t)
        gears.adapted(rows + late, gears.threshold)
        spent.append((rows + late, gears.threshold))
        gears.answered(started - latency, rows, t)
        gears.answered(started - 0.15, late, t)
        return gears.threshold

    assert [tick(0.02) for _ in range(3)] == [0.5] * 3  # met: gear 0, the fixed T
    # A burst of late answers (8 of the horizon's 48): bursts like it come and go at a met p99 target.
    assert [tick(0.02, late=8)] + [tick(0.02) for _ in range(4)] == [0.5] * 5
    # Late answers in interval after interval (12 of 52): a miss, straight to the last gear.
    assert [tick(0.02, late=4) for _ in range(4)] == [0.5] * 3 + [0.3]
    assert [tick(0.02) for _ in range(4)] == [0.3] * 4  # the late answers are still in the horizon
    assert [tick(0.07) for _ in range(4)] == [0.3] * 4  # on time but over half the target: hold
    assert [tick(0.02) for _ in range(7)] == [0.3] * 7  # calm once the 0.07 s answers left the horizon, not yet 4 times
    assert tick(0.02) == 0.4  # 4 calm intervals in a row: one gear up
    # The climb did not hold: most answers late within 4 intervals of it, down again, and the next climb
    # waits twice as long (8 calm intervals, after the late ones have left the horizon).
    assert [tick(0.15), tick(0.02)] == [0.4, 0.3]
    assert [tick(0.02) for _ in range(3 + 7)] == [0.3] * 10
    assert tick(0.02) == 0.4
    assert [tick(0.02) for _ in range(7)] == [0.4] * 7
    assert tick(0.02) == 0.5  # 8 calm intervals again; that climb held, so the wait halves back to 4
    assert gears.raise_after == 4
    # Each tick's rows meet the gear decided at its start, and the expected cost is theirs.
    drop = dict(ladder)
    assert counts["cost"] == pytest.approx(sum(rows * drop[threshold] for rows, threshold in spent))
    assert counts["s2"] == pytest.approx(0.5 * sum(threshold == 0.3 for _, threshold in spent))
    escalated = t
    gears.escalation_started(escalated)
    assert tick(0.0) == 0.3  # fast answers, but an escalation has waited 0.5 s for big: far over, down at once
    gears.escalation_ended(escalated)
    t += 5.0  # quiet spell: nothing in flight, nothing answered
    assert gears.start(t) == t and gears.threshold == 0.5


@pytest.mark.parametrize("by_deadline", [False, True])
def test_controller_counts_the_deadlines_answers_as_late(by_deadline):
    """Answers on time only because the deadline gave them (big's backlog is why they waited) are a
    miss: the overload the deadline absorbs still moves the gears. The same answers from big are not."""
    gears, _ = gate_gears([(0.5, 0.0), (0.4, 0.002), (0.3, 0.008)])  # target 0.1 s
    t = 0.0
    for _ in range(4):
        t += 0.5
        gears.decide(t)
        gears.answered(t - 0.02, 10, t)
        gears.answered(t - 0.09, 4, t, late=by_deadline)
    t += 0.5
    gears.decide(t)
    assert gears.threshold == (0.3 if by_deadline else 0.5)


def test_pooled_observations_are_shared_by_the_instances(tmp_path):
    pooled = PooledObservations
    path = str(tmp_path / "board")
    a, b = pooled(path), pooled(path)
    assert a.slot != b.slot
    a.answered(0.2, 3, 10.0)
    b.answered(0.05, 1, 10.5)
    assert sorted(b.window(9.0)) == [0.05, 0.2, 0.2, 0.2]  # each sees the other's answers
    assert list(a.window(10.2)) == [0.05]
    assert a.last_answer() == 10.5
    assert a.oldest() is None
    b.escalation_started(9.5)
    b.escalation_started(9.7)
    assert a.oldest() == 9.5
    b.escalation_ended(9.5)
    assert a.oldest() == 9.7
    # A slot whose process is gone does not count (a stub that died), and is free for the next instance.
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    b.board[b.slot, 0] = int(gone.stdout)
    assert a.oldest() is None and list(a.window(9.0)) == [0.2] * 3
    c = pooled(path)
    assert c.slot == b.slot and c.oldest() is None
    a.close()  # a closed slot is free too
    assert list(c.window(9.0)) == [] and pooled(path).slot == a.slot
    # What a closed instance still records (a call to big ending after finalize) stays out of the pool.
    a.answered(0.3, 2, 11.0)
    a.escalation_started(10.9)
    assert list(c.window(9.0)) == [] and c.oldest() is None
    with a.shared(types.SimpleNamespace()):
        pass  # a tick after finalize: decides alone, no lock to take


def test_instances_deciding_from_pooled_observations_move_together(tmp_path):
    """The controller judges the answers of every instance: one instance's late answers among the
    other's many on-time ones are what a p99 allows, more of them are a miss for both; both are in
    the gear the last decision left."""
    pooled = PooledObservations
    ladder = [(0.5, 0.0), (0.4, 0.002), (0.3, 0.008)]
    (a, _), (b, _) = (gate_gears(ladder, seen=pooled(str(tmp_path / "board"))) for _ in range(2))
    t = 0.0
    for k in range(4):
        t += 0.5
        (a if k % 2 == 0 else b).decide(t)  # a decides, then b, then a, ...
        a.answered(t - 0.02, 40, t)
        b.answered(t - 0.15, 1, t)  # b alone would see only late answers
    assert a.threshold == b.threshold == 0.5
    b.answered(t - 0.15, 50, t)
    t += 0.5
    a.decide(t)
    assert a.threshold == 0.3
    b.decide(t + 0.1)  # within the interval of the last decision: nothing to decide, but b takes its gear
    assert b.threshold == 0.3


def test_held_escalations_leave_together_each_with_its_open_rows():
    calls = []

    async def infer(stage, inputs, want_probs):
        calls.append(list(inputs[0][:, 0]))
        await asyncio.sleep(0.01)
        label = inputs[0][:, 0].astype(np.int64)
        return ChildAnswer(label, label.astype(np.float64), None)

    def escalation(values, open_rows=None):
        n = len(values)
        open_rows = np.ones(n, bool) if open_rows is None else np.asarray(open_rows)
        return Escalation([np.array(values)[:, None]], np.arange(n), np.zeros((n, 1)), [], open_rows, None,
                                  np.ones(n, bool))

    async def main():
        held = Held("big", infer, 4)
        escalations = [escalation([1, 2]), escalation([3, 4, 5], [True, False, True]), escalation([6, 7]), escalation([8], [False]),
                       escalation([9, 10, 11])]
        futures = [held.run(e, False) for e in escalations]  # the first leaves at once, the rest wait for it
        return [await f for f in futures], escalations

    answers, escalations = asyncio.run(main())
    # Then the open rows of what waited, up to 4 rows a call: 4 was settled meanwhile and never leaves;
    # the escalation with no open row gets None; the last does not fit beside the others.
    assert calls == [[1, 2], [3, 5, 6, 7], [9, 10, 11]]
    assert [None if a is None else list(a.label) for a in answers] == [[1, 2], [3, 5], [6, 7], None, [9, 10, 11]]
    assert list(escalations[1].pending) == [0, 2]  # narrowed to the rows that left
