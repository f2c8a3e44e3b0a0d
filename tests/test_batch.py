"""`littlebig batch`: two passes with one model loaded at a time give the served gate's answers.

The job unloads and loads models, so it runs on its own server, not the session one.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from littlebig.client.batch import BatchError, loaded_models, run_batch
from littlebig.client.infer import LittleBigClient
from littlebig.serving.server import TritonServer

from .conftest import NUM_CLASSES, wire_images

N_IMAGES = 48


@pytest.fixture(scope="module")
def batch_server(repository, tmp_path_factory):
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("batch-server") / "tritonserver.log") as running:
        yield running


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Photos and noise images as PNG files, some in a subfolder (paths are kept relative)."""
    folder = tmp_path_factory.mktemp("batch-images")
    (folder / "sub").mkdir()
    for i, image in enumerate(wire_images(N_IMAGES, seed=11)):
        Image.fromarray(image).save(folder / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.png")
    return folder


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def served_answers(url, folder, files):
    with LittleBigClient(url) as client:
        return client.classify([folder / f for f in files], batch_size=16)


def test_batch_equals_the_served_cascade(batch_server, image_folder, tmp_path):
    url = batch_server.grpc_url
    result = run_batch(url, image_folder, tmp_path / "preds.csv", show_progress=False)
    rows = read_csv(result.out)
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    assert len(rows) == N_IMAGES and any(r["file"].startswith("sub/") for r in rows)
    served = served_answers(url, image_folder, [r["file"] for r in rows])

    assert [int(r["class"]) for r in rows] == [p.class_index for p in served]
    assert [r["route"] for r in rows] == [p.route_name for p in served]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], [p.confidence for p in served], rtol=1e-5)
    assert {r["label"] for r in rows} <= {str(i) for i in range(NUM_CLASSES)}
    escalated = sum(r["route"] == "big" for r in rows)
    assert 0 < escalated < N_IMAGES, "the test images should take both routes"
    assert result.escalated == escalated and result.inferred == {"little": N_IMAGES, "big": escalated}
    assert [w.model for w in result.windows] == ["little", "big"]
    assert not (tmp_path / "preds.csv.partial.jsonl").exists()
    with grpcclient.InferenceServerClient(url) as client:
        assert {"little", "big", "littlebig"} <= loaded_models(client, batch_server.admin_headers())


class Interrupted(Exception):
    pass


def test_batch_resumes_after_an_interruption(batch_server, image_folder, tmp_path):
    url = batch_server.grpc_url
    reference = read_csv(run_batch(url, image_folder, tmp_path / "ref.csv", batch_size=8, show_progress=False).out)
    escalated = sum(r["route"] == "big" for r in reference)
    assert escalated > 16, "the interruption must fall inside pass 2"
    chunks = []

    def interrupt_in_pass_two(n):
        chunks.append(n)
        if len(chunks) == N_IMAGES // 8 + 2:  # all of pass 1, then two chunks of pass 2
            raise Interrupted

    out = tmp_path / "preds.csv"
    with pytest.raises(Interrupted):
        run_batch(url, image_folder, out, batch_size=8, concurrency=1, show_progress=False, progress=interrupt_in_pass_two)
    assert not out.exists() and (tmp_path / "preds.csv.partial.jsonl").exists()
    with grpcclient.InferenceServerClient(url) as client:
        assert {"little", "big", "littlebig"} <= loaded_models(client, batch_server.admin_headers()), "an interrupted job gives the models back"

    # A hard kill cut the last line mid-write; the resumed job is interrupted again after one chunk:
    # its rows must not be glued to the cut line (the next resume would find a line that is not JSON).
    partial = tmp_path / "preds.csv.partial.jsonl"
    partial.write_text(partial.read_text() + '{"route": "big", "fi')

    def interrupt_after_one(n):
        raise Interrupted

    with pytest.raises(Interrupted):
        run_batch(url, image_folder, out, batch_size=8, concurrency=1, show_progress=False, progress=interrupt_after_one)
    resumed = run_batch(url, image_folder, out, batch_size=8, show_progress=False)
    assert resumed.inferred == {"little": 0, "big": escalated - 24}
    assert read_csv(out) == reference


def test_batch_refuses_gates_whose_answers_it_cannot_reproduce():
    from littlebig.client.batch import _check_supported
    from littlebig.contract import GateConfig

    two = GateConfig(("little", "big"), (1, 2), (0.5,))
    _check_supported(dataclasses.replace(two, ensemble_weight=1.0, signal="max_softmax"))
    with pytest.raises(BatchError, match="serves 3 stages"):
        _check_supported(GateConfig(("a", "b", "c"), (1, 2, 3), (0.5, 0.5)))
    for change, shown in (({"signal": "margin"}, "signal is 'margin'"), ({"task": "multilabel", "signal": "mean_abs_margin"}, "signal is 'mean_abs_margin'"),
                          ({"ensemble_weight": 0.5}, "ensemble_weight is 0.5")):
        with pytest.raises(BatchError, match=f"the gate's {shown}"):
            _check_supported(dataclasses.replace(two, **change))


def test_batch_refuses_a_threshold_outside_0_1(batch_server, image_folder, tmp_path):
    with pytest.raises(BatchError, match=r"threshold must be in \[0, 1\]"):
        run_batch(batch_server.grpc_url, image_folder, tmp_path / "preds.csv", threshold=1.5, show_progress=False)


def test_cli_batch_reports_the_servers_peak_memory_per_pass(batch_server, image_folder, tmp_path, capsys):
    from littlebig.cli import main

    out = tmp_path / "preds.csv"
    main(["batch", "--url", batch_server.grpc_url, "--data", str(image_folder), "--out", str(out),
          "--server-pid", str(batch_server.process.pid)])
    printed = capsys.readouterr().out
    assert f"wrote {out}: {N_IMAGES} images" in printed
    peaks = [int(line.split("peak ")[1].split(" MiB")[0]) for line in printed.splitlines() if "server memory during" in line]
    assert len(peaks) == 2 and all(peak > 0 for peak in peaks), printed
    assert len(read_csv(out)) == N_IMAGES
