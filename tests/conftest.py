"""Shared fixtures: a small exported Little-Big pair, its repository, and a real Triton server.

The pair is two random-init timm models with 10 classes at 64px: big enough to be real
convolutional networks through the whole export path, small enough for a 2-core CI machine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from littlebig.client.images import sample_photos, to_wire_batch
from littlebig.export import export_onnx, load_model, ort_session
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

WIRE = 64
NUM_CLASSES = 10
LITTLE_SPEC = "timm:mobilenetv3_small_050"
BIG_SPEC = "timm:resnet10t"
# The gate waits this long to gather requests into one dynamic batch, so concurrent requests
# (with their own thresholds, or bad inputs) really share one execute call in the tests.
GATE_QUEUE_DELAY_US = 50_000


@dataclasses.dataclass
class Pair:
    little: Path
    big: Path
    little_macs: int
    big_macs: int


def wire_images(n: int, seed: int = 0) -> np.ndarray:
    """Real photographs first, then random-pattern images: uint8 [n, WIRE, WIRE, 3]."""
    photos = to_wire_batch(list(sample_photos().values()), WIRE)
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(max(0, n - len(photos)), WIRE, WIRE, 3), dtype=np.uint8)
    return np.concatenate([photos, noise])[:n]


# Random-init heads give near-uniform softmax outputs; a gain on the head's weights spreads the
# confidences over (0.1, 1] like a trained classifier's, so routing is tested at many thresholds.
HEAD_GAIN = {"little": 150.0, "big": 60.0}


def sharpen_head(module, gain: float) -> None:
    import torch

    with torch.no_grad():
        module.get_classifier().weight.mul_(gain)


def torch_seeded(seed: int):
    import torch

    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> Pair:
    out = tmp_path_factory.mktemp("pair")
    parity = wire_images(16)
    results = {}
    for role, spec, seed in (("little", LITTLE_SPEC, 1), ("big", BIG_SPEC, 2)):
        torch_seeded(seed)
        loaded = load_model(spec, random_init=True, num_classes=NUM_CLASSES, resolution=WIRE)
        sharpen_head(loaded.module, HEAD_GAIN[role])
        # With the TorchScript twins, for the torch runtime (tests/test_torch_runtime.py).
        results[role] = export_onnx(loaded, out / f"{role}.onnx", wire_size=WIRE, parity_images=parity, torchscript=True,
                                    log=lambda *_: None)
    return Pair(results["little"].path, results["big"].path, results["little"].macs, results["big"].macs)


@dataclasses.dataclass
class Offline:
    """Both models' probabilities on the test images, computed with onnxruntime outside Triton."""

    images: np.ndarray
    little: np.ndarray
    big: np.ndarray

    def cascade(self, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eq. 4: little answers where its max prob >= T, else big. Returns class, confidence, route."""
        thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(self.images),))
        conf_little = self.little.max(1)
        route = (conf_little.astype(np.float64) < thresholds).astype(np.int32)
        probs = np.where(route[:, None] == 1, self.big, self.little)
        return probs.argmax(1), probs.max(1), route


@pytest.fixture(scope="session")
def offline(pair) -> Offline:
    images = wire_images(300, seed=7)
    little = ort_session(pair.little).run(["PROBS"], {"IMAGE": images})[0]
    big = ort_session(pair.big).run(["PROBS"], {"IMAGE": images})[0]
    return Offline(images, little, big)


@pytest.fixture(scope="session")
def served_threshold(offline) -> float:
    """The config T of the test repository: little's median confidence, so both routes occur."""
    return float(np.median(offline.little.max(1)))


@pytest.fixture(scope="session")
def repository(pair, served_threshold, tmp_path_factory) -> Path:
    options = RepositoryOptions(runtime="python", max_batch_size=64, threshold=served_threshold, intra_op_threads=1,
                                gate_queue_delay_us=GATE_QUEUE_DELAY_US)
    return build_repository(pair.little, pair.big, tmp_path_factory.mktemp("repo") / "repository", options)


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    """The session server: the default repository (python runtime: little inside the gate)."""
    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    with TritonServer(repository, log_file=log) as running:
        yield running


@pytest.fixture(scope="session")
def step_server(pair, served_threshold, tmp_path_factory):
    """The same cascade with little as the ensemble's step before the gate (the native runtimes' form)."""
    options = RepositoryOptions(runtime="python", max_batch_size=64, threshold=served_threshold, intra_op_threads=1,
                                gate_queue_delay_us=GATE_QUEUE_DELAY_US, little_in_gate=False)
    repository = build_repository(pair.little, pair.big, tmp_path_factory.mktemp("step-repo") / "repository", options)
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("step-server") / "tritonserver.log") as running:
        yield running


@pytest.fixture(params=["in_gate", "step"])
def served(request):
    """Each form of the served cascade in turn: little inside the gate, little as the step before it."""
    return request.getfixturevalue("server" if request.param == "in_gate" else "step_server")
