"""The commands that had only their error paths tested, run to success through the CLI entry point:
`calibrate`, `threshold` (show, set, restore), `pairs` and `example`, each checked against the
library's own answer on the same data.

`bench` is not here: its two latency comparisons take 2 x 3 rounds x 8 s whatever its options say
(`--measurement-ms` and `--rounds` only shorten the perf_analyzer part), so it cannot run in a
test's budget; tests/test_benchmark.py runs the same `bench()` with short latency probes.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from littlebig.cli import main
from littlebig.client.calibrate import analyse
from littlebig.client.collect import Collected
from littlebig.client.control import served_threshold, switch_thresholds
from littlebig.client.criterion import Criterion
from littlebig.client.images import to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.contract import BIG_MODEL
from littlebig.export import ort_session
from littlebig.gate.config import ladder_text
from littlebig.model_repository.builder import gate_config_path
from littlebig.model_repository.facts import ModelFacts

IMAGES = 96
# The paper's rule with a tolerance: a T strictly inside (0, max confidence) on these images, so a
# wrong T (another criterion, other data, labels read wrong) shows.
MAX_ACC_DROP = "0.05"
CRITERION = Criterion(max_acc_drop=float(MAX_ACC_DROP), point_estimate=True)


@pytest.fixture(scope="module")
def labelled(offline, pair, tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A flat folder of PNGs and labels.csv; the labels are big's answers, every 7th moved one class on
    (so big is not always right either)."""
    folder = tmp_path_factory.mktemp("labelled")
    paths = []
    for i, image in enumerate(offline.images[:IMAGES]):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    big = probs_of(pair.big, paths, ModelFacts.from_onnx(pair.big))
    labels = big.argmax(1)
    labels[::7] = (labels[::7] + 1) % big.shape[1]
    csv_path = tmp_path_factory.mktemp("labels") / "labels.csv"
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label"], *((p.name, int(y)) for p, y in zip(paths, labels))])
    return folder, csv_path, labels


def probs_of(model: Path, paths: list[Path], wire) -> np.ndarray:
    """The model's probabilities with onnxruntime on the files as sent on the wire (size, crop)."""
    return ort_session(model).run(["PROBS"], {"IMAGE": to_wire_batch(paths, wire.wire_size, wire.crop_pct)})[0]


def reference_choice(little: np.ndarray, big: np.ndarray, labels: np.ndarray, macs: list[int]):
    """The library's choice on offline probabilities: the sweep and the chosen index."""
    collected = Collected(stages=[little, big], labels=labels, paths=[""] * len(labels), macs=macs)
    sweep, _, choice = analyse(collected, CRITERION)
    return sweep, choice.index


def test_calibrate_prints_and_writes_the_librarys_choice_without_applying_it(server, pair, labelled, tmp_path, capsys):
    folder, csv_path, labels = labelled
    with LittleBigClient(server.grpc_url) as client:
        info = client.gate_info()
    paths = sorted(folder.glob("*.png"))
    sweep, index = reference_choice(probs_of(pair.little, paths, info), probs_of(pair.big, paths, info), labels,
                                    [info.macs_little, info.macs_big])
    expected = float(sweep.thresholds[index])
    assert 0.0 < sweep.escalation[index] < 1.0  # both routes at the reference T: a meaningful choice
    served_before = served_threshold(server.grpc_url)

    out = tmp_path / "calib"
    main(["calibrate", "--url", server.grpc_url, "--data", str(folder), "--labels-csv", str(csv_path), "--out", str(out),
          "--max-acc-drop", MAX_ACC_DROP, "--point-estimate"])
    printed = capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    assert report["threshold"] == pytest.approx(expected, abs=1e-6)
    assert report["escalation"] == pytest.approx(sweep.escalation[index], abs=1e-12)
    assert report["criterion_met"] and "applied" not in report
    assert f"chosen T = {report['threshold']:.6f}" in printed
    assert f"calibration set: {IMAGES} images" in printed
    table = (out / "table.txt").read_text()
    assert table.strip() and table.strip() in printed  # the table printed is the table written
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert served_threshold(server.grpc_url) == served_before  # no --apply: the server keeps its T


def test_threshold_shows_sets_and_restores_the_served_t(server, repository, capsys):
    with LittleBigClient(server.grpc_url) as client:
        before = client.gate_config()
    on_disk = gate_config_path(repository).read_text()
    original = before.thresholds[0]
    new = 0.3 if abs(original - 0.3) > 1e-3 else 0.4
    try:
        main(["threshold", "--url", server.grpc_url])
        assert capsys.readouterr().out.strip() == f"{original:.6f}"
        main(["threshold", "--url", server.grpc_url, str(new)])
        set_line = capsys.readouterr().out
        assert f"server now runs T={new:.6f}" in set_line and "keeps its old T" in set_line
        main(["threshold", "--url", server.grpc_url])
        assert capsys.readouterr().out.strip() == f"{new:.6f}"
        main(["threshold", "--url", server.grpc_url, repr(original)])  # repr: the exact float back
        capsys.readouterr()
        main(["threshold", "--url", server.grpc_url])
        assert capsys.readouterr().out.strip() == f"{original:.6f}"
    finally:
        with LittleBigClient(server.grpc_url) as client:
            after = client.gate_config()
        if after != before:  # a set T drops gears made for another T: the gate exactly as it was, for the tests after this
            switch_thresholds(server.grpc_url, list(before.thresholds), gears=ladder_text(before.gears) if before.gears else None,
                              audit_promise=before.audit_promise)
    assert after.thresholds == before.thresholds  # the CLI put the exact T back
    with LittleBigClient(server.grpc_url) as client:
        assert client.gate_config() == before
    assert gate_config_path(repository).read_text() == on_disk  # no --repo: the repository keeps its T


def test_pairs_ranks_every_candidate_cascade(pair, labelled, tmp_path, capsys):
    folder, csv_path, labels = labelled
    second = tmp_path / "second_little.onnx"  # a second candidate: the same model under another name
    shutil.copyfile(pair.little, second)
    out = tmp_path / "pairs"
    main(["pairs", "--big", str(pair.big), "--candidates", str(pair.little), str(second), "--data", str(folder),
          "--labels-csv", str(csv_path), "--out", str(out), "--max-acc-drop", MAX_ACC_DROP, "--point-estimate"])
    printed = capsys.readouterr().out

    report = json.loads((out / "pairs.json").read_text())
    chains = [block["stages"] for block in report["ranking"]]
    assert sorted(chains) == sorted([["little", BIG_MODEL], ["second_little", BIG_MODEL],
                                     ["little", "second_little", BIG_MODEL]])
    for chain in chains:
        assert " -> ".join(chain) in printed
    assert [m["name"] for m in report["models"]] == ["little", "second_little", BIG_MODEL]
    assert report["images"] == IMAGES

    # little -> big is calibrate's cascade, on big's wire format here (pairs serves no gate)
    paths = sorted(folder.glob("*.png"))
    wire = ModelFacts.from_onnx(pair.big)
    sweep, index = reference_choice(probs_of(pair.little, paths, wire), probs_of(pair.big, paths, wire), labels,
                                    [pair.little_macs, pair.big_macs])
    block = report["ranking"][chains.index(["little", BIG_MODEL])]
    assert block["thresholds"] == [pytest.approx(float(sweep.thresholds[index]), abs=1e-6)]
    assert block["macs_reduction_vs_big"] == pytest.approx(
        1.0 - (pair.little_macs + sweep.escalation[index] * pair.big_macs) / pair.big_macs, abs=1e-9)
    assert (out / "pairs.png").read_bytes()[:4] == b"\x89PNG"


def test_example_multilabel_writes_a_pair_that_scores_as_reported(tmp_path, capsys):
    from littlebig.examples import digits
    from littlebig.examples.data import TensorSet

    out = tmp_path / "example"
    main(["example", "multilabel", "--out", str(out), "--epoch-scale", "0.005"])  # one epoch per model
    assert f"wrote {out}: little.onnx, big.onnx (multilabel), calib.npz, test.npz" in capsys.readouterr().out

    summary = json.loads((out / "example.json").read_text())
    assert summary["task"] == "multilabel" and summary["metric"] == "micro_f1"
    assert summary["labels"] == list(digits.LABELS.names)
    assert (out / "labels.txt").read_text().splitlines() == list(digits.LABELS.names)
    assert summary["models"]["little"]["macs"] < summary["models"]["big"]["macs"]
    test = TensorSet.load(out / "test.npz")
    assert summary["rows"]["test"] == len(test)
    for role in ("little", "big"):
        probs = ort_session(out / f"{role}.onnx").run(["PROBS"], test.inputs)[0]
        predicted, truth = probs >= 0.5, test.labels == 1
        tp = np.sum(predicted & truth)
        f1 = 2 * tp / (predicted.sum() + truth.sum())  # micro-F1, by hand
        assert summary["models"][role]["test_metric"] == pytest.approx(f1, abs=1e-12)
        assert summary["models"][role]["epochs"] == 1
