"""Calibration through a real server with a little and a big model trained on scikit-learn's digits."""

from __future__ import annotations

import json
import threading
import time
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from littlebig.client.calibrate import CalibrationError, Criterion, calibrate
from littlebig.client.control import served_threshold
from littlebig.client.datasets import load_image_set
from littlebig.client.infer import LittleBigClient
from littlebig.labels import ClassLabels
from littlebig.export import LoadedModel, ModelInfo, export_onnx, ort_session
from littlebig.model_repository.builder import build_repository, gate_config_path, write_thresholds
from littlebig.model_repository.configs import read_config
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

SIZE = 8  # digits are 8x8; the wire images are 8x8x3 and need no resizing
NAMES = ClassLabels(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
# The paper's rule, the old default: cheapest T whose measured accuracy equals big's.
ZERO_LOSS = Criterion(max_acc_drop=0.0, point_estimate=True)


def digits_as_uint8():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


def train(module: nn.Module, images: np.ndarray, labels: np.ndarray, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    x = torch.from_numpy(np.repeat(images[:, None], 3, axis=1)).float() / 255.0
    y = torch.from_numpy(labels)
    optimiser = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimiser.step()
    return module.eval()


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_as_uint8()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    train_idx, calib_idx, eval_idx = order[:700], order[700:1300], order[1300:]
    # little sees a 4x4 average-pooled digit through a linear layer; big is an MLP on all 8x8 pixels.
    little = train(nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(48, 10)), images[train_idx], labels[train_idx], 150, 1)
    big = train(
        nn.Sequential(nn.Flatten(), nn.Linear(192, 128), nn.ReLU(), nn.Linear(128, 10)), images[train_idx], labels[train_idx], 150, 2
    )
    info = dict(resolution=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=10, crop_pct=1.0, weights="trained in test",
                labels=NAMES)
    parity = np.repeat(images[:16, :, :, None], 3, axis=3)
    paths = {}
    for role, module in (("little", little), ("big", big)):
        loaded = LoadedModel(module, ModelInfo(spec=f"local:digits-{role}", **info))
        paths[role] = export_onnx(loaded, root / f"{role}.onnx", wire_size=SIZE, parity_images=parity, log=lambda *_: None).path

    for name, idx in (("calib", calib_idx), ("eval", eval_idx)):
        for i in idx:  # ImageFolder layout: <set>/<class>/<n>.png
            folder = root / name / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")

    repo = build_repository(
        paths["little"], paths["big"], root / "repository",
        RepositoryOptions(runtime="python", threshold=0.5, max_batch_size=64, intra_op_threads=1),
    )
    with TritonServer(repo, log_file=root / "tritonserver.log") as server:
        yield root, server, paths


def wire_of(image_set) -> np.ndarray:
    """The saved grey PNGs as the wire format: uint8 [N, 8, 8, 3]."""
    return np.stack([np.repeat(np.asarray(Image.open(p).convert("L"))[:, :, None], 3, axis=2) for p in image_set.paths])


def offline_probs(path, image_set):
    return ort_session(path).run(["PROBS"], {"IMAGE": wire_of(image_set)})[0]


@pytest.fixture(scope="module")
def report(digits_setup):
    root, server, _ = digits_setup
    return calibrate(
        server.grpc_url, root / "calib", root / "out", ZERO_LOSS,
        eval_data=root / "eval", show_progress=False, log=lambda *_: None,
    )


def test_report_matches_offline_computation(digits_setup, report):
    root, _, paths = digits_setup
    calib = load_image_set(root / "calib")
    little = offline_probs(paths["little"], calib)
    big = offline_probs(paths["big"], calib)
    acc_little = float((little.argmax(1) == calib.labels).mean())
    acc_big = float((big.argmax(1) == calib.labels).mean())
    assert report["accuracy"]["little"] == pytest.approx(acc_little, abs=1e-12)
    assert report["accuracy"]["big"] == pytest.approx(acc_big, abs=1e-12)
    assert acc_big > acc_little  # a meaningful pair: big is better
    # Eq. 4 at the chosen T reproduces the cascade accuracy and the escalation share.
    t = report["threshold"]
    escalate = little.max(1).astype(np.float64) < t
    answers = np.where(escalate, big.argmax(1), little.argmax(1))
    assert report["escalation"] == pytest.approx(escalate.mean(), abs=1e-12)
    assert report["accuracy"]["cascade"] == pytest.approx((answers == calib.labels).mean(), abs=1e-12)
    assert report["accuracy"]["cascade"] >= acc_big  # --max-acc-drop 0
    assert 0.0 < report["escalation"] < 1.0
    gm = report["gmacs"]
    assert gm["cascade"] == pytest.approx(gm["little"] + report["escalation"] * gm["big"])
    assert report["macs_reduction"] == pytest.approx(1 - gm["cascade"] / gm["big"])
    # Cheapest: one fewer escalation would lose accuracy against big.
    conf_sorted = np.sort(little.max(1)[escalate])
    if len(conf_sorted):
        t_lower = float(conf_sorted[-1])  # keep the most confident escalated image with little instead
        answers_lower = np.where(little.max(1) < t_lower, big.argmax(1), little.argmax(1))
        assert (answers_lower == calib.labels).mean() < acc_big


def test_report_files_and_generalisation_block(digits_setup, report):
    root = digits_setup[0]
    out = root / "out"
    saved = json.loads((out / "report.json").read_text())
    assert saved["threshold"] == report["threshold"]
    for key in ("threshold", "escalation", "accuracy", "gmacs", "macs_reduction", "bound", "eval"):
        assert key in saved
    assert saved["eval"]["threshold"] == saved["threshold"]
    assert saved["eval"]["images"] == len(load_image_set(root / "eval"))
    assert saved["corrected_mistakes"]["mean_confidence_corrected"] < saved["corrected_mistakes"]["mean_confidence_rest"]
    for png in ("curves.png", "confidence_histogram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<- chosen" in (out / "table.txt").read_text()
    assert (out / "calibration.npz").is_file()


def test_cached_probabilities_are_reused_without_server(digits_setup, report):
    root = digits_setup[0]
    again = calibrate("127.0.0.1:1", root / "calib", root / "out", ZERO_LOSS, show_progress=False, log=lambda *_: None)
    assert again["threshold"] == report["threshold"]


def test_a_cache_from_other_models_is_not_reused(digits_setup, report, tmp_path):
    import dataclasses

    from littlebig.client.collect import Collected

    root, server, _ = digits_setup
    cache = root / "out" / "calibration.npz"
    other = tmp_path / "out"
    other.mkdir()
    stale = Collected.load(cache)
    Collected(**{**{f.name: getattr(stale, f.name) for f in dataclasses.fields(stale)},
                 "macs": [m + 1 for m in stale.macs]}).save(other / "calibration.npz")
    lines = []
    again = calibrate(server.grpc_url, root / "calib", other, ZERO_LOSS, show_progress=False, log=lines.append)
    assert any("the served ones have" in line for line in lines), lines
    assert not any(line.startswith("using cached") for line in lines), lines
    assert again["threshold"] == report["threshold"]
    # Same names and MACs, other weights: the served configs state their ONNX files' sha256.
    assert len(stale.digests) == 2 and all(len(d) == 64 for d in stale.digests), stale.digests
    Collected(**{**{f.name: getattr(stale, f.name) for f in dataclasses.fields(stale)},
                 "digests": ("0" * 64,) * 2}).save(other / "calibration.npz")
    lines.clear()
    calibrate(server.grpc_url, root / "calib", other, ZERO_LOSS, show_progress=False, log=lines.append)
    assert any("other weights" in line for line in lines), lines
    assert not any(line.startswith("using cached") for line in lines), lines
    lines.clear()
    calibrate(server.grpc_url, root / "calib", other, ZERO_LOSS, show_progress=False, log=lines.append)
    assert any(line.startswith("using cached") for line in lines), lines  # what it wrote is reused


def test_label_free_and_bounded_modes(digits_setup, report):
    root, server, _ = digits_setup
    budget = calibrate(server.grpc_url, root / "calib", root / "out", Criterion(target_escalation=0.3), show_progress=False, log=lambda *_: None)
    assert budget["escalation"] == pytest.approx(0.3, abs=0.01)
    agree = calibrate(server.grpc_url, root / "calib", root / "out", Criterion(min_agreement=0.99), show_progress=False, log=lambda *_: None)
    assert agree["agreement_with_big"] >= 0.99
    bounded = calibrate(
        server.grpc_url, root / "calib", root / "out", Criterion(max_acc_drop=0.02, confidence_level=0.9), show_progress=False, log=lambda *_: None
    )
    assert bounded["bound"]["level"] == 0.9 and "Clopper-Pearson" in bounded["bound"]["method"]
    assert bounded["bound"]["upper_drop"] <= 0.02
    # the guarantee costs escalations compared with the point estimate at the same tolerance
    point = calibrate(
        server.grpc_url, root / "calib", root / "out", Criterion(max_acc_drop=0.02, point_estimate=True), show_progress=False, log=lambda *_: None
    )
    assert bounded["escalation"] >= point["escalation"]


def test_apply_live_with_no_failed_request_then_served_answers_reproduce_report(digits_setup, report):
    root, server, _ = digits_setup
    calib = load_image_set(root / "calib")
    wire = wire_of(calib)
    assert served_threshold(server.grpc_url) == 0.5

    failures, answered, stop = [], [0], threading.Event()

    def traffic():
        with LittleBigClient(server.grpc_url) as client:
            deadline = time.monotonic() + 60  # bounded in time and count
            while not stop.is_set() and time.monotonic() < deadline and answered[0] < 5000:
                try:
                    client.infer(wire[:8])
                    answered[0] += 1
                except Exception as err:  # any failed request is what this test is about
                    failures.append(repr(err))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    before = answered[0]
    applied = calibrate(
        server.grpc_url, root / "calib", root / "out", ZERO_LOSS, apply=True, write=partial(write_thresholds, root / "repository"),
        show_progress=False, log=lambda *_: None,
    )
    during = answered[0] - before  # answered while calibrate ran, the gate's reload included
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []
    assert during > 10  # requests really flowed during the switch

    t = applied["threshold"]
    assert served_threshold(server.grpc_url) == t
    config = read_config(gate_config_path(root / "repository"))
    assert float(config.parameters["thresholds"].string_value) == t
    assert applied["applied"]["config"] == str(gate_config_path(root / "repository"))

    with LittleBigClient(server.grpc_url) as client:
        predictions = client.classify(wire, batch_size=32)  # no per-request T: the applied config T
    served_accuracy = np.mean([p.class_index for p in predictions] == calib.labels)
    served_escalation = np.mean([p.route for p in predictions])
    assert served_accuracy == report["accuracy"]["cascade"]
    assert served_escalation == report["escalation"]


def test_every_report_says_how_sure_it_is(digits_setup, report):
    root, server, _ = digits_setup
    block = report["uncertainty"]
    n = len(load_image_set(root / "calib"))
    assert block["images"] == n and block["level"] == Criterion().confidence_level
    assert block["measured_drop"] == pytest.approx(report["accuracy"]["big"] - report["accuracy"]["cascade"])
    assert block["upper_drop"] >= max(block["measured_drop"], block["certifiable_drop"]) > 0
    boot = block["bootstrap"]
    assert boot["accuracy"][0] <= report["accuracy"]["cascade"] <= boot["accuracy"][1]
    assert boot["escalation"][0] <= report["escalation"] <= boot["escalation"][1]
    assert boot["macs_reduction"][0] <= report["macs_reduction"] <= boot["macs_reduction"][1]
    # The zero-loss point estimate cannot be certified on 600 images: the report says so.
    assert any("point estimate" in w and "leave out --point-estimate" in w for w in report["warnings"])
    # The default is certified: its stated bound is within the tolerance, and nothing to warn about.
    default = calibrate(server.grpc_url, root / "calib", root / "out", show_progress=False, log=lambda *_: None)
    assert default["criterion_met"] and default["uncertainty"]["upper_drop"] <= Criterion().max_acc_drop
    assert default["warnings"] == []


def test_labels_that_do_not_match_the_model_stop_calibration(digits_setup, tmp_path):
    root, server, _ = digits_setup
    calib = load_image_set(root / "calib")
    rng = np.random.default_rng(0)
    rows = [f"{p.relative_to(root / 'calib')},{NAMES.names[rng.integers(10)]}" for p in calib.paths]  # names, shuffled
    (tmp_path / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(CalibrationError, match="no better than guessing among 10 classes: the labels probably do not match"):
        calibrate(server.grpc_url, root / "calib", tmp_path / "out", labels_csv=tmp_path / "labels.csv", show_progress=False, log=lambda *_: None)
    # The same names, right this time, map through the served model's own labels.
    rows = [f"{p.relative_to(root / 'calib')},{NAMES.names[label]}" for p, label in zip(calib.paths, calib.labels)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    good = calibrate(server.grpc_url, root / "calib", tmp_path / "out", labels_csv=tmp_path / "labels.csv", show_progress=False, log=lambda *_: None)
    assert good["labels"] == "through the model's own class labels" and good["accuracy"]["big"] > 0.8


def test_class_count_answers_carry_the_model_labels(digits_setup):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    root, server, _ = digits_setup
    wire = wire_of(load_image_set(root / "calib"))[:4]
    for module, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        client = module.InferenceServerClient(url)
        image = module.InferInput("IMAGE", list(wire.shape), "UINT8")
        image.set_data_from_numpy(wire)
        for model in ("littlebig", "little", "big"):
            out = client.infer(model, [image], outputs=[module.InferRequestedOutput("PROBS", class_count=3)]).as_numpy("PROBS")
            assert out.shape == (4, 3)
            for entry in out.ravel():
                score, index, label = entry.decode().split(":")
                assert label == NAMES.names[int(index)] and 0.0 <= float(score) <= 1.0
        client.close()
    with LittleBigClient(server.grpc_url) as client:
        assert client.gate_info().labels == NAMES


def test_label_free_certification_states_what_it_bounds_and_combines_with_labels(digits_setup, report):
    root, server, _ = digits_setup
    quiet = dict(show_progress=False, log=lambda *_: None)
    free = calibrate(server.grpc_url, root / "calib", root / "free", Criterion(), unlabelled=True, **quiet)
    assert free["criterion"] == "max_disagreement=0.02@0.95" and free["accuracy"]["cascade"] is None  # labels withheld
    assert free["bound"]["on"] == "the drop against big, not against the truth"
    assert free["criterion_met"] and free["bound"]["upper_drop"] <= 0.02
    assert free["agreement"]["upper"] == pytest.approx(free["bound"]["upper_drop"])
    assert free["agreement"]["images_to_certify_tolerance"] <= free["images"]
    # Every answer that loses accuracy against big differs from big's: on these images the drop (labels) is
    # at most the measured share of differing answers.
    labelled = calibrate(server.grpc_url, root / "calib", root / "out", Criterion(target_escalation=free["escalation"]), **quiet)
    assert labelled["accuracy"]["big"] - labelled["accuracy"]["cascade"] <= labelled["agreement"]["measured"] + 1e-12
    both = calibrate(server.grpc_url, root / "calib", root / "both", Criterion(), unlabelled_data=root / "eval", **quiet)
    sources = both["bound"]["sources"]
    assert [(s["on"], s["images"]) for s in sources] == [("drop", 600), ("disagreement", 600 + len(list((root / "eval").rglob("*.png"))))]
    assert all(s["level"] == pytest.approx(0.975) for s in sources) and both["criterion_met"]
    assert min(s["upper"] for s in sources) == pytest.approx(both["bound"]["upper_drop"])
    assert both["bound"]["upper_drop"] <= 0.02
