"""K-stage calibration, gating signals, the ensemble sweep and micro-F1 (client/kstage.py), checked against
brute-force numpy references; `littlebig pairs` end to end through a real server with three digit models."""

from __future__ import annotations

import itertools
import json
from functools import partial

import numpy as np
import pytest
import torch.nn as nn
from PIL import Image

from littlebig.client import calibrate_stages as cs
from littlebig.client import kstage as ks
from littlebig.client import thresholds as th
from littlebig.client.collect import Collected
from littlebig.client.criterion import Criterion
from littlebig.serving.pairs import pairs
from littlebig.export import LoadedModel, ModelInfo, export_onnx, ort_session
from littlebig.gate.signals import signal as gating_signal
from tests.test_calibrate import NAMES, SIZE, digits_as_uint8, train


def synthetic(n: int, classes: int, k: int, seed: int, multilabel: bool = False):
    """Stages that know the answer better the later (costlier) they are, with noisy confidence."""
    rng = np.random.default_rng(seed)
    if multilabel:
        labels = rng.random((n, classes)) < 0.4
    else:
        labels = rng.integers(0, classes, n)
    stages = []
    for stage in range(k):
        logits = rng.normal(size=(n, classes)) * 2.0
        if multilabel:
            logits += np.where(labels, 1.0, -1.0) * (0.5 + stage)
            stages.append((1.0 / (1.0 + np.exp(-logits))).astype(np.float32))
        else:
            logits[np.arange(n), labels] += 3.0 + 1.0 * stage
            e = np.exp(logits - logits.max(1, keepdims=True))
            stages.append((e / e.sum(1, keepdims=True)).astype(np.float32))
    return stages, labels, [int(10**9 * 0.4 * 1.5**stage) for stage in range(k)]  # about EfficientNet-Lite0, 1, 2


def brute(stages, labels, macs, signal, thresholds, multilabel=False):
    """Eq. 7 row by row: the first stage whose signal >= its T answers, else the last. (metric, GMACs, routes)."""
    conf = [gating_signal(signal, p) for p in stages]
    routes = []
    for row in range(len(labels)):
        route = next((k for k, t in enumerate(thresholds) if conf[k][row] >= t), len(stages) - 1)
        routes.append(route)
    routes = np.array(routes)
    gmacs = np.cumsum(macs)[routes].mean() / 1e9
    if multilabel:
        answers = np.stack([stages[r][row] >= 0.5 for row, r in enumerate(routes)])
        tp, fp, fn = (answers & labels).sum(), (answers & ~labels).sum(), (~answers & labels).sum()
        return 2 * tp / (2 * tp + fp + fn), gmacs, routes
    answers = np.array([stages[r][row].argmax() for row, r in enumerate(routes)])
    return float((answers == labels).mean()), gmacs, routes


@pytest.mark.parametrize("k,signal", [(3, "max_softmax"), (3, "margin"), (4, "entropy")])
def test_joint_choice_matches_brute_force(k, signal):
    stages, labels, macs = synthetic(30 if k == 3 else 16, 4, k, seed=k)
    o = ks.StageOutcomes.from_probs(stages, labels, macs, signal=signal)
    s = ks.sweep_stages(o)
    assert s.exact
    candidates, _ = ks.stage_candidates(o)
    best = {}
    for combo in itertools.product(*candidates):  # every combination, evaluated row by row
        metric, gmacs, _ = brute(stages, labels, macs, signal, combo)
        best[combo] = (metric, gmacs)
    # the sweep holds exactly these combinations with exactly these numbers
    assert len(s.thresholds) == len(best)
    for row, combo in enumerate(map(tuple, s.thresholds)):
        assert s.metric[row] == pytest.approx(best[combo][0], abs=1e-12)
        assert s.gmacs[row] == pytest.approx(best[combo][1], abs=1e-12)
    for drop in (0.0, 0.05):
        choice = ks.choose_max_drop(o, s, drop)
        target = o.reference_metric() - drop - 1e-12
        cheapest = min(g for m, g in best.values() if m >= target)
        metric, gmacs, _ = brute(stages, labels, macs, signal, choice.thresholds)  # the settled thresholds
        assert choice.met and metric >= target and gmacs == pytest.approx(cheapest, abs=1e-12)
        # settling moved the thresholds off the signal values but answers the same rows
        assert brute(stages, labels, macs, signal, s.thresholds[choice.index])[2].tolist() == \
            brute(stages, labels, macs, signal, choice.thresholds)[2].tolist()


def test_two_stage_certified_choice_equals_the_two_stage_rule():
    stages, labels, macs = synthetic(400, 5, 2, seed=3)
    o = ks.StageOutcomes.from_probs(stages, labels, macs)
    joint = ks.choose_with_bound(o, ks.sweep_stages(o), 0.05, 0.9)
    two = th.Outcomes.from_probs(stages[0], stages[1], labels, *macs)
    s2 = th.sweep(two)
    single = th.choose_with_bound(s2, two.n, 0.05, 0.9)
    # the same rule, except that K-stage "met" also asks for fewer MACs than big alone
    assert joint.met == (single.met and s2.relative_macs[single.index] < 1.0)
    assert np.array_equal(stages[0].max(1) < joint.thresholds[0], stages[0].max(1) < s2.thresholds[single.index])
    assert joint.bound["upper_drop"] == pytest.approx(single.bound["upper_drop"], abs=1e-12)


def test_three_stage_certified_choice_states_a_bound_that_holds_on_its_rows():
    stages, labels, _ = synthetic(500, 5, 3, seed=5)
    macs = [10**8, 3 * 10**8, 10**9]  # steep costs: the early stages are worth asking
    o = ks.StageOutcomes.from_probs(stages, labels, macs)
    choice = ks.choose_with_bound(o, ks.sweep_stages(o), 0.05, 0.95)
    metric, gmacs, routes = brute(stages, labels, macs, "max_softmax", choice.thresholds)
    answers = np.choose(routes, [p.argmax(1) for p in stages])
    big_right, right = stages[-1].argmax(1) == labels, answers == labels
    upper = th.drop_upper_bound(np.array([(big_right & ~right).sum()]), np.array([(right & ~big_right).sum()]), 500, 0.95)[0]
    assert choice.met and choice.bound["upper_drop"] == pytest.approx(upper) and upper <= 0.05
    # costs more than the last stage alone: not "met", whatever its bound
    costly = ks.StageOutcomes.from_probs(stages, labels, [1, 2, 2])
    assert not ks.choose_with_bound(costly, ks.sweep_stages(costly), 0.05, 0.95).met
    assert gmacs < macs[-1] / 1e9 and (routes == 0).any() and (routes == 1).any()


def test_micro_f1_by_hand_and_multilabel_choice():
    labels = np.array([[1, 0, 1], [0, 1, 0]], bool)
    little = np.array([[0.9, 0.2, 0.1], [0.05, 0.95, 0.1]], np.float32)  # row 0: 1 tp, 1 fn; row 1: 1 tp
    big = np.array([[0.9, 0.1, 0.8], [0.1, 0.9, 0.2]], np.float32)  # all right
    o = ks.StageOutcomes.from_probs([little, big], labels, [1, 4], signal="mean_abs_margin", task="multilabel")
    assert o.metric == "micro_f1" and o.stage_metric(0) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert o.reference_metric() == 1.0
    # mean |p - 0.5|: row 0 (0.4 + 0.3 + 0.4) / 3, row 1 (0.45 + 0.45 + 0.4) / 3
    np.testing.assert_allclose(o.confidence[0], [1.1 / 3, 1.3 / 3], rtol=1e-6)
    block = ks.choose_multilabel([little, big], labels, [1, 4], max_f1_drop=0.0)
    assert block["metric"] == 1.0 and block["answered"] == [0.5, 0.5]  # row 0 to big, row 1 kept by little
    assert block["thresholds"][0] == pytest.approx(0.4, abs=1e-6)  # settled between the two signals
    # three stages on random multi-label data: the chosen thresholds reproduce their micro-F1 row by row
    stages, labels, macs = synthetic(40, 6, 3, seed=9, multilabel=True)
    block = ks.choose_multilabel(stages, labels, macs, max_f1_drop=0.01)
    metric, gmacs, _ = brute(stages, labels, macs, "mean_abs_margin", block["thresholds"], multilabel=True)
    assert block["metric"] == pytest.approx(metric) and block["gmacs"] == pytest.approx(gmacs)
    assert metric >= block["reference_metric"] - 0.01 - 1e-12 and block["criterion_met"]


def test_ensemble_sweep_reproduces_equation_8():
    stages, labels, macs = synthetic(300, 5, 2, seed=11)
    collected = Collected(stages=stages, labels=labels, paths=[str(i) for i in range(300)], macs=macs)
    rows = cs.ensemble_sweep(collected, Criterion(max_acc_drop=0.0, point_estimate=True), weights=(0.5, 0.75, 1.0))
    assert [r["ensemble_weight"] for r in rows] == [0.5, 0.75, 1.0]
    big_accuracy = float((stages[1].argmax(1) == labels).mean())
    for row in rows:
        w, t = row["ensemble_weight"], row["threshold"]
        escalate = stages[0].max(1) < t
        blend = (1 - w) * stages[0] + w * stages[1]
        answers = np.where(escalate, blend.argmax(1), stages[0].argmax(1))
        assert row["metric"] == pytest.approx((answers == labels).mean())
        assert row["macs_reduction"] == pytest.approx(1 - (macs[0] + escalate.mean() * macs[1]) / macs[1])
        assert row["metric"] >= big_accuracy and row["reference_metric"] == pytest.approx(big_accuracy)
    plain = ks.choose_max_drop(*(lambda o: (o, ks.sweep_stages(o)))(ks.StageOutcomes.from_probs(stages, labels, macs)), 0.0)
    assert rows[-1]["threshold"] == pytest.approx(plain.thresholds[0])


def test_old_two_stage_caches_still_load(tmp_path):
    little, big = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[::-1]
    np.savez_compressed(tmp_path / "old.npz", little=little, big=big, labels=np.arange(3), has_labels=True,
                        paths=np.asarray(["a", "b", "c"]), macs=np.asarray([1, 2]), model_labels=np.asarray(""))
    old = Collected.load(tmp_path / "old.npz")
    assert len(old.stages) == 2 and np.array_equal(old.big, big) and old.macs_big == 2 and old.models == ()
    three = Collected(stages=[little, big, little], labels=np.arange(3), paths=["a", "b", "c"], macs=[1, 2, 3], models=("a", "b", "c"))
    three.save(tmp_path / "new.npz")
    again = Collected.load(tmp_path / "new.npz")
    assert again.models == ("a", "b", "c") and again.macs == [1, 2, 3] and np.array_equal(again.stages[2], little)


@pytest.fixture(scope="module")
def digit_models(tmp_path_factory):
    """Three digit classifiers of rising cost (4x4 linear, 8x8 linear, MLP), exported, and a labelled folder."""
    root = tmp_path_factory.mktemp("stages")
    images, labels = digits_as_uint8()
    order = np.random.default_rng(1).permutation(len(images))
    fit, calib = order[:700], order[700:1000]
    modules = {
        "pool": nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(48, 10)),
        "linear": nn.Sequential(nn.Flatten(), nn.Linear(192, 10)),
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(192, 128), nn.ReLU(), nn.Linear(128, 10)),
    }
    info = dict(resolution=SIZE, mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=10, crop_pct=1.0, weights="trained in test", labels=NAMES)
    parity = np.repeat(images[:8, :, :, None], 3, axis=3)
    paths = {}
    for seed, (name, module) in enumerate(modules.items()):
        train(module, images[fit], labels[fit], 60, seed)
        paths[name] = export_onnx(LoadedModel(module, ModelInfo(spec=f"local:{name}", **info)), root / f"{name}.onnx",
                                  wire_size=SIZE, parity_images=parity, log=lambda *_: None).path
    for i in calib:
        folder = root / "calib" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    return root, paths


def test_pairs_serves_collects_and_ranks_every_chain(digit_models):
    root, paths = digit_models
    out = root / "pairs"
    report = pairs(paths["mlp"], [paths["linear"], paths["pool"]], root / "calib", out,
                   Criterion(max_acc_drop=0.0, point_estimate=True), show_progress=False, log=lambda *_: None)
    collected = Collected.load(out / "collected.npz")
    assert collected.models == ("pool", "linear", "big")  # cost order, big last
    wire = np.stack([np.repeat(np.asarray(Image.open(p).convert("L"))[:, :, None], 3, axis=2) for p in collected.paths])
    for name, probs in zip(("pool", "linear", "mlp"), collected.stages):  # through the server == onnxruntime offline
        np.testing.assert_allclose(probs, ort_session(paths[name]).run(["PROBS"], {"IMAGE": wire})[0], atol=1e-6)
    chains = {tuple(b["stages"]): b for b in report["ranking"]}
    assert set(chains) == {("pool", "big"), ("linear", "big"), ("pool", "linear", "big")}
    savings = [b["macs_reduction_vs_big"] for b in report["ranking"] if b["criterion_met"]]
    assert savings == sorted(savings, reverse=True)
    index = {"pool": 0, "linear": 1, "big": 2}
    for names, block in chains.items():  # each block's numbers, recomputed row by row
        picked = [collected.stages[index[n]] for n in names]
        macs = [collected.macs[index[n]] for n in names]
        metric, gmacs, _ = brute(picked, collected.labels, macs, "max_softmax", block["thresholds"])
        assert block["metric"] == pytest.approx(metric) and block["gmacs"] == pytest.approx(gmacs)
        assert metric >= block["reference_metric"]
    saved = json.loads((out / "pairs.json").read_text())
    assert saved["ranking"][0]["stages"] == report["ranking"][0]["stages"]
    assert (out / "pairs.png").read_bytes()[:4] == b"\x89PNG"
    # the same collection calibrated as a 3-stage cascade: chains, signals and their plots
    stage_report, _, _ = cs.stage_calibration(collected, Criterion(max_acc_drop=0.0, point_estimate=True), "max_softmax")
    assert len(stage_report["chains"]) == 4 and {r["signal"] for r in stage_report["signals"]} == {"max_softmax", "margin", "entropy"}
    assert cs.write_plots(root, stage_report, collected) == ["chains.png", "signals.png"]


def test_pairs_reuses_its_cache_only_for_the_same_files(digit_models, tmp_path, monkeypatch):
    """A second `pairs` on the same files answers from its cache; once a candidate file holds other
    weights (same name, same architecture) it serves and asks again."""
    import shutil

    import onnx

    from littlebig.serving import pairs as pairs_module

    root, paths = digit_models
    files = {name: shutil.copy(paths[name], tmp_path / f"{name}.onnx") for name in ("mlp", "linear")}
    run = lambda: pairs(files["mlp"], [files["linear"]], root / "calib", tmp_path / "out",  # noqa: E731
                        Criterion(max_acc_drop=0.0, point_estimate=True), show_progress=False, log=lambda *_: None)
    first = run()

    def served_again(*args, **kwargs):
        raise AssertionError("served and collected again")

    monkeypatch.setattr(pairs_module, "collect_served", served_again)
    assert run()["ranking"] == first["ranking"]  # from the cache
    model = onnx.load(files["linear"])
    model.doc_string = "retrained"  # other bytes: what a retrained file of the same shape looks like to the cache
    onnx.save(model, files["linear"])
    with pytest.raises(AssertionError, match="served and collected again"):
        run()


def test_calibrate_three_stage_gate_and_apply_reproduce_offline_routes(digit_models):
    """`calibrate` on a served 3-stage gate: joint thresholds, applied live; the gate then routes every
    row as Eq. 7 says offline on the collected probabilities."""
    from littlebig.client.calibrate import CalibrationError, calibrate
    from littlebig.client.infer import LittleBigClient
    from littlebig.model_repository.builder import build_cascade, gate_config_path, write_thresholds
    from littlebig.model_repository.configs import read_config
    from littlebig.model_repository.options import RepositoryOptions
    from littlebig.serving.server import TritonServer

    root, paths = digit_models
    repo = build_cascade([paths["pool"], paths["linear"], paths["mlp"]], root / "cascade",
                         RepositoryOptions(runtime="python", thresholds=(0.5, 0.5), intra_op_threads=1))
    with TritonServer(repo, log_file=root / "cascade.log") as server:
        kwargs = dict(show_progress=False, log=lambda *_: None)
        with pytest.raises(CalibrationError, match="gates on 'max_softmax'"):
            calibrate(server.grpc_url, root / "calib", root / "out3", signal="margin", apply=True, **kwargs)
        report = calibrate(server.grpc_url, root / "calib", root / "out3", Criterion(max_acc_drop=0.0, point_estimate=True),
                           apply=True, write=partial(write_thresholds, repo), **kwargs)
        collected = Collected.load(root / "out3" / "calibration.npz")
        assert collected.models == ("little", "stage1", "big") and report["stages"] == list(collected.models)
        thresholds = report["thresholds"]
        metric, gmacs, routes = brute(collected.stages, collected.labels, collected.macs, "max_softmax", thresholds)
        assert report["metric"] == pytest.approx(metric) and report["gmacs"] == pytest.approx(gmacs)
        assert report["criterion_met"] and metric >= report["reference_metric"]
        config = read_config(gate_config_path(repo))
        assert [float(t) for t in config.parameters["thresholds"].string_value.split(",")] == thresholds
        wire = np.stack([np.repeat(np.asarray(Image.open(p).convert("L"))[:, :, None], 3, axis=2) for p in collected.paths])
        with LittleBigClient(server.grpc_url) as client:  # no request parameter: the applied thresholds
            out = [client.infer(wire[i : i + 64]) for i in range(0, len(wire), 64)]
        served_routes = np.concatenate([o["ROUTE"][:, 0] for o in out])
        served_classes = np.concatenate([o["CLASS"][:, 0] for o in out])
        np.testing.assert_array_equal(served_routes, routes)
        np.testing.assert_array_equal(served_classes, np.choose(routes, [p.argmax(1) for p in collected.stages]))
