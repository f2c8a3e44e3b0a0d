"""A served segmentation cascade: each stage's graph answers MASK and the image-level region CONFIDENCE;
the gate routes whole images on little's CONFIDENCE (Eq. 4) and answers the answering stage's mask.

The pair is two random-init shapes nets (littlebig/examples/shapes.py) exported at 64px with
export_segmentation; a gain on their classifiers spreads the confidences like a trained net's."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from littlebig.export.segmentation import export_segmentation
from littlebig.export.specs import LoadedModel, ModelInfo
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from tritonclient.utils import InferenceServerException

from littlebig.contract import CONFIDENCE, IMAGE, MASK, PROBS, ROUTE
from littlebig.examples import shapes
from littlebig.examples.segpair import cascade, scores, stage_outputs, write_split
from littlebig.serving.server import TritonServer

from .conftest import GATE_QUEUE_DELAY_US
from .test_stages import add_cascade

GAIN = {"little": 8.0, "big": 8.0}
# little inside the gate (named as clients and `calibrate` call it by default), little as the ensemble's step
GATES = {"littlebig": True, "seg_step": False}


@pytest.fixture(scope="module")
def seg_pair(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("seg-pair")
    images, masks = shapes.make_set(48, seed=3)
    for seed, role in enumerate(("little", "big")):
        torch.manual_seed(seed)
        net = shapes.SegNet(**shapes.SIZES[role]).eval()
        with torch.no_grad():
            net.classifier.weight.mul_(GAIN[role])
        info = ModelInfo(spec=f"test:shapes-{role}", resolution=shapes.WIRE, mean=(0.5,) * 3, std=(0.25,) * 3,
                         num_classes=len(shapes.LABELS), crop_pct=1.0, weights="random-init", labels=shapes.LABELS,
                         task="segmentation")
        export_segmentation(LoadedModel(net, info), out / f"{role}.onnx", wire_size=shapes.WIRE, parity_images=images[:4],
                            log=lambda *_: None)
    write_split(out / "calib", images, masks)
    return out, images


@pytest.fixture(scope="module")
def seg_server(seg_pair, tmp_path_factory):
    """One server with both forms of the cascade, T at little's median CONFIDENCE (both routes occur)."""
    folder, images = seg_pair
    threshold = float(np.median(stage_outputs(folder / "little.onnx", images)[CONFIDENCE]))
    work = tmp_path_factory.mktemp("seg-repos")
    repo = work / "repository"
    repo.mkdir()
    for gate, in_gate in GATES.items():
        options = RepositoryOptions(runtime="python", max_batch_size=16, threshold=threshold, intra_op_threads=1,
                                    gate_queue_delay_us=GATE_QUEUE_DELAY_US, little_in_gate=in_gate)
        built = build_repository(folder / "little.onnx", folder / "big.onnx", work / gate, options)
        add_cascade(repo, built, gate, 2)
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        yield server, threshold


def infer(url, gate, images, parameters=None, outputs=(MASK, CONFIDENCE, ROUTE)):
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput(IMAGE, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(gate, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                              parameters=parameters)
        return {name: result.as_numpy(name) for name in outputs}


def send_together(url, gate, requests):
    """(result, error) of each (images, threshold) request, all sent at once over async gRPC."""
    done = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        for index, (images, threshold) in enumerate(requests):
            tensor = grpcclient.InferInput(IMAGE, list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            client.async_infer(gate, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in (MASK, ROUTE)],
                               parameters={"threshold": threshold},
                               callback=lambda result, error, index=index: done.put((index, result, error)))
        answers = sorted(done.get(timeout=60) for _ in requests)
    return [(result, error) for _, result, error in answers]


@pytest.mark.parametrize("gate", GATES)
def test_served_masks_equal_the_offline_cascade(seg_pair, seg_server, gate):
    folder, images = seg_pair
    server, threshold = seg_server
    little, big = (stage_outputs(folder / f"{role}.onnx", images) for role in ("little", "big"))
    expected = cascade(little, big, threshold)
    assert set(expected.route) == {0, 1}, "the images must reach both stages"
    served = {name: [] for name in (MASK, CONFIDENCE, ROUTE)}
    for start in range(0, len(images), 16):
        for name, array in infer(server.grpc_url, gate, images[start : start + 16]).items():
            served[name].append(array)
    served = {name: np.concatenate(arrays) for name, arrays in served.items()}
    assert served[MASK].dtype == np.int32 and served[MASK].shape == (len(images), shapes.WIRE, shapes.WIRE)
    np.testing.assert_array_equal(served[ROUTE][:, 0], expected.route)
    np.testing.assert_array_equal(served[MASK], expected.mask)
    np.testing.assert_allclose(served[CONFIDENCE][:, 0], expected.confidence, atol=1e-6)


def test_served_probs_are_the_answering_stages(seg_pair, seg_server):
    """PROBS [C, S, S] when asked: little's on the images it answers, big's on the others (threshold 1: all big)."""
    folder, images = seg_pair
    server, _ = seg_server
    big = stage_outputs(folder / "big.onnx", images[:4], outputs=(PROBS,))[PROBS]
    served = infer(server.grpc_url, "littlebig", images[:4], {"threshold": 1.0}, (MASK, ROUTE, PROBS))
    assert served[PROBS].shape == (4, len(shapes.LABELS), shapes.WIRE, shapes.WIRE)
    np.testing.assert_array_equal(served[ROUTE][:, 0], 1)
    np.testing.assert_allclose(served[PROBS], big, atol=1e-6)
    np.testing.assert_array_equal(served[MASK], big.argmax(1))


def test_bad_requests_are_refused_and_their_neighbours_answered(seg_pair, seg_server):
    _, images = seg_pair
    server, threshold = seg_server
    with pytest.raises(InferenceServerException, match=r"(?i)IMAGE.*shape|shape.*IMAGE") as wrong:
        infer(server.grpc_url, "littlebig", images[:2, :32])
    assert wrong.value.status() == "StatusCode.INVALID_ARGUMENT"
    plan = [threshold, "abc", 0.0]  # sent together: they share the gate's execute
    results = send_together(server.grpc_url, "littlebig", [(images[i * 4 : (i + 1) * 4], t) for i, t in enumerate(plan)])
    (good, none), (bad, error), (all_little, fine) = results
    assert bad is None and error.status() == "StatusCode.INVALID_ARGUMENT" and "threshold" in error.message()
    assert none is None and fine is None
    np.testing.assert_array_equal(all_little.as_numpy(ROUTE)[:, 0], 0)
    assert good.as_numpy(MASK).shape == (4, shapes.WIRE, shapes.WIRE)


def test_calibration_through_the_server_matches_the_offline_cascade(seg_pair, seg_server, tmp_path):
    """`calibrate` on a segmentation gate: T chosen on mIoU; the report's cascade at T is the offline one."""
    from littlebig.client.calibrate import calibrate
    from littlebig.client.criterion import Criterion
    from littlebig.client.segmentation import load_segmentation_set, read_mask

    folder, images = seg_pair
    server, _ = seg_server
    report = calibrate(server.grpc_url, folder / "calib", tmp_path, Criterion(max_acc_drop=0.05, point_estimate=True),
                       batch_size=16, show_progress=False, log=lambda *_: None)
    assert report["task"] == "segmentation" and (tmp_path / "curves.png").is_file()
    labels = np.stack([read_mask(path) for path in load_segmentation_set(folder / "calib").masks])
    little, big = (stage_outputs(folder / f"{role}.onnx", images) for role in ("little", "big"))
    expected = cascade(little, big, report["threshold"])
    assert report["escalation"] == pytest.approx(expected.route.mean())
    assert report["miou"]["cascade"] == pytest.approx(scores(expected.mask, labels)["miou"], abs=1e-9)
    assert report["miou"]["cascade"] >= report["miou"]["big"] - 0.05


def test_classify_writes_the_served_masks(seg_pair, seg_server, tmp_path, capsys):
    """`littlebig classify --masks DIR` on a segmentation gate: one mask PNG per image, the gate's mask."""
    from littlebig.client.segmentation import read_mask

    from littlebig.cli import main

    folder, images = seg_pair
    server, _ = seg_server
    paths = [str(folder / "calib" / "images" / f"{index:05d}.png") for index in range(3)]
    main(["classify", "--url", server.grpc_url, "--masks", str(tmp_path / "masks"), *paths])
    served = infer(server.grpc_url, "littlebig", images[:3])
    for index in range(3):
        np.testing.assert_array_equal(read_mask(tmp_path / "masks" / f"{index:05d}.png"), served[MASK][index])
    assert capsys.readouterr().out.count("masks") >= 3
    with pytest.raises(SystemExit) as refused:  # without --masks: nowhere to put the answers
        main(["classify", "--url", server.grpc_url, paths[0]])
    assert refused.value.code == 2 and "--masks" in capsys.readouterr().err


def test_export_takes_torchvision_segmentation_models(tmp_path, capsys):
    """`littlebig export torchvision:lraspp_mobilenet_v3_large` (random init, no download): a segmentation
    graph the builder reads; a grid that does not divide the wire size is refused."""
    from littlebig.model_repository.facts import ModelFacts

    from littlebig.cli import main

    common = ["export", "torchvision:lraspp_mobilenet_v3_large", "--random-init", "--num-classes", "5", "--resolution", "64",
              "--wire-size", "64"]
    main([*common, "--regions", "4", "--out", str(tmp_path / "little.onnx")])
    facts = ModelFacts.from_onnx(tmp_path / "little.onnx")
    assert facts.task == "segmentation" and facts.num_classes == 5 and facts.macs > 0
    assert {o.name: o.dims for o in facts.outputs} == {MASK: (64, 64), CONFIDENCE: (1,), "PIXEL_CONFIDENCE": (64, 64),
                                                       PROBS: (5, 64, 64)}
    with pytest.raises(SystemExit) as refused:
        main([*common, "--regions", "5", "--out", str(tmp_path / "bad.onnx")])
    assert refused.value.code == 2 and "--regions 5" in capsys.readouterr().err
