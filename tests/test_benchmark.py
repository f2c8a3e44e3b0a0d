"""perf_analyzer benchmark plumbing against the real test server (no timing assertions), the gate's
metrics, and its early answers."""

from __future__ import annotations

import base64
import json
import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from littlebig.client.benchmark import bench, ideal_speedup
from littlebig.client.metrics import read_samples
from littlebig.client.perf import perf_analyzer_command, write_input_data

from .test_serving import gate_counts


def test_ideal_speedup_formula():
    # c_little = 1/100 s, c_big = 1/25 s, p = 0.25: S* = 0.04 / (0.01 + 0.01) = 2
    assert ideal_speedup(100.0, 25.0, 0.25) == pytest.approx(2.0)
    assert ideal_speedup(100.0, 25.0, 1.0) == pytest.approx(0.8)  # escalating all is slower than big


def test_perf_input_data_holds_the_datas_mix_in_every_prefix(tmp_path):
    """perf_analyzer sends a prefix of the entries in order (one context): each prefix holds the data's escalation share."""
    images = np.arange(40 * 2 * 2 * 3).reshape(40, 2, 2, 3).astype(np.uint8)
    escalates = np.zeros(40, bool)
    escalates[[3, 17, 30, 31, 38]] = True  # 0.125
    entries = json.loads(write_input_data(images, tmp_path / "in.json", escalates).read_text())["data"]
    index = {base64.b64encode(img.tobytes()).decode(): i for i, img in enumerate(images)}
    drawn = np.array([index[e["IMAGE"]["b64"]] for e in entries])
    for n in (8, 20, 50, 256):
        assert abs(escalates[drawn[:n]].sum() - 0.125 * n) <= 1, n
    assert len(set(drawn[escalates[drawn]])) == 5 and len(set(drawn)) > 30  # drawn from every image


def test_bench_writes_report_and_plot(server, offline, tmp_path):
    perf_analyzer_command()  # a missing binary fails here with the message users see
    data = tmp_path / "images"
    data.mkdir()
    for i, img in enumerate(offline.images[:12]):
        Image.fromarray(img).save(data / f"{i:02d}.png")
    report = bench(
        server.grpc_url, data, tmp_path / "out", concurrencies=[1, 2], metrics_url=server.metrics_url,
        n_images=12, measurement_ms=800, latency_seconds=1.5, latency_rounds=1, rounds=1, log=lambda *_: None,
    )
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["big_peak_concurrency"] in (1, 2)
    for run in saved["runs"]:
        for key in ("big", "little", "gate"):
            assert run[key]["throughput"] > 0 and run[key]["p50_ms"] > 0
        assert 0.0 <= run["escalation"] <= 1.0
        expected = ideal_speedup(run["little"]["throughput"], run["big"]["throughput"], run["escalation"])
        assert run["ideal_speedup"] == pytest.approx(expected)
        assert run["achieved_fraction"] == pytest.approx(run["gate"]["throughput"] / run["big"]["throughput"] / expected)
    assert report["latency"]["requests"]["little"] > 0
    costs = saved["gate_cost"]["own_ms_per_execution"]
    assert [c["batch_size"] for c in costs] == [1, 8, 32]
    for cost in costs:
        assert cost["executions"] == 30  # one request at a time: one gate execution each
        # little runs inside the gate (the python runtime's default): its seconds are the gate's, counted apart
        assert cost["gate_ms"] > cost["little_ms"] > 0 and cost["own_ms"] == pytest.approx(cost["gate_ms"] - cost["little_ms"])
    added = saved["gate_cost"]["added_latency_c1_at_T0"]
    assert added["concurrency"] == 1 and added["requests"]["gate_big"] == 0  # T=0: little answers all
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"


def metric_lines(server, name):
    """Samples called ``name`` keyed by their sorted labels."""
    return {tuple(sorted(labels.items())): value for n, labels, value in read_samples(server.metrics_url, name, settle=True) if n == name}


def test_metrics_report_threshold_and_request_outcomes(server, offline, served_threshold):
    gauge = metric_lines(server, "littlebig_threshold")
    assert list(gauge.values()) == [pytest.approx(served_threshold)]
    before = metric_lines(server, "littlebig_requests_total")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        image = grpcclient.InferInput("IMAGE", [2, *offline.images.shape[1:]], "UINT8")
        image.set_data_from_numpy(offline.images[:2])
        client.infer("littlebig", [image])
        with pytest.raises(Exception):
            client.infer("littlebig", [image], parameters={"threshold": "abc"})
    after = metric_lines(server, "littlebig_requests_total")
    ok = next(k for k in after if ("status", "ok") in k)
    error = next(k for k in after if ("status", "error") in k)
    assert after[ok] - before.get(ok, 0) == 1
    assert after[error] - before.get(error, 0) == 1


def test_requests_little_answers_leave_before_big_runs(server, offline):
    """One request little answers (T=0) and one with 63 rows that all go to big (T=1), in the same
    gate batch: the first must come back before big has finished the second."""
    done: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    _, executions_before = gate_counts(server.grpc_url)
    for name, rows, threshold in (("big", offline.images[:63], 1.0), ("little", offline.images[63:64], 0.0)):
        image = grpcclient.InferInput("IMAGE", list(rows.shape), "UINT8")
        image.set_data_from_numpy(rows)
        client.async_infer(
            "littlebig", [image], parameters={"threshold": threshold},
            callback=lambda result, error, n=name: done.put((n, time.perf_counter(), error)),
        )
    first, second = done.get(timeout=60), done.get(timeout=60)
    client.close()
    _, executions_after = gate_counts(server.grpc_url)
    assert first[2] is None and second[2] is None
    assert executions_after - executions_before == 1  # one execute call held both
    assert first[0] == "little"
    assert second[1] - first[1] > 0.005  # big's work on 63 rows came after the early answer
