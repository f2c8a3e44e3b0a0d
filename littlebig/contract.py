"""What the package and the served models agree on: model names, tensor names, routes, request
parameters and the threshold rule.

The gate's own rules and names are those of its package (model_repository/gate/config.py), imported
here, so the package and the gate cannot disagree; this module adds the names only the host uses.
"""

from __future__ import annotations

import enum

from littlebig.errors import UserError
from littlebig.gate.config import (  # noqa: F401 - re-exported: the names the package shares with the gate
    ANSWER_OF_TASK, CLASS, CONFIDENCE, FIRST_PREFIX, GATE_OUTPUTS, LABELS, MASK, MULTILABEL_CUT, ON_BIG_FAILURE, PROBS,
    REQUEST_PARAMETERS, ROUTE, ROUTE_BIG, ROUTE_LITTLE, ROUTE_LITTLE_FALLBACK, TASKS, THRESHOLD, ConfigError, GateConfig,
    RequestError, parse_threshold, parse_thresholds, stage_roles,
)

# Clients call GATE_MODEL: the ensemble (stage 0, then the gate step GATE_STEP_MODEL), or with little in
# the gate the python gate itself. The stages are served as little, stage1 ... stage{K-2}, big.
GATE_MODEL, GATE_STEP_MODEL, LITTLE_MODEL, BIG_MODEL = "littlebig", "gate", "little", "big"
# The wire images in: uint8 [N, S, S, 3]; video models take clips, uint8 [N, F, S, S, 3].
IMAGE = "IMAGE"
VIDEO = "VIDEO"
# Segmentation stages also answer each pixel's max softmax probability (float32 [H, W]), which the gate
# does not read: calibration aggregates it over other regions (SLIC superpixels) to compare with the
# graph's own region confidence.
PIXEL_CONFIDENCE = "PIXEL_CONFIDENCE"


def wire_input(frames: int) -> str:
    """The name of the wire tensor: VIDEO for clips of ``frames`` frames, IMAGE for images (frames 0)."""
    return VIDEO if frames else IMAGE


def stage_models(count: int) -> tuple[str, ...]:
    """Model names of a cascade of ``count`` stages in cost order: little, stage1 ... stage{K-2}, big."""
    try:
        return stage_roles(count)
    except ConfigError as err:
        raise UserError(str(err)) from None


def fallback_route(stage: int, count: int) -> int:
    """ROUTE of a row answered by ``stage`` because stage + 1 failed (on_big_failure=little) in a
    cascade of ``count`` stages (two stages: 2, Route.LITTLE_FALLBACK)."""
    return count + stage


def route_label(route: int, count: int = 2) -> str:
    """A ROUTE value in words, for a cascade of ``count`` stages: the model that answered, and which
    one failed for a fallback answer (two stages: Route's labels)."""
    if count == 2:
        return Route(route).label
    names = stage_models(count)
    if 0 <= route < count:
        return names[route]
    if count <= route < 2 * count - 1:
        return f"{names[route - count]} ({names[route - count + 1]} failed)"
    raise ValueError(f"ROUTE {route} is not a route of a {count}-stage cascade")


class Route(enum.IntEnum):
    """Which model answered a row (the gate's ROUTE output)."""

    LITTLE = ROUTE_LITTLE
    BIG = ROUTE_BIG
    LITTLE_FALLBACK = ROUTE_LITTLE_FALLBACK  # escalated, big failed, little answered (on_big_failure=little)

    @property
    def label(self) -> str:
        return {Route.LITTLE: "little", Route.BIG: "big", Route.LITTLE_FALLBACK: "little (big failed)"}[self]


# The python-backend onnxruntime runtime's config parameters (model_repository/python_runtime/1/model.py):
# its ONNX file in the version folder, onnxruntime's intra-op threads, and the nice value its stub takes.
RUNTIME_PARAMETERS = ("onnx_file", "intra_op_threads", "nice")
# The torch runtime's (model_repository/torch_runtime/1/model.py): its TorchScript file and torch's threads.
TORCH_RUNTIME_PARAMETERS = ("torchscript_file", "intra_op_threads")
# Every stage model's config (any runtime) states its MACs per image, for the clients' cost figures,
# and the sha256 of the ONNX file it was built from, so a cache of its answers can tell other weights.
STAGE_MACS = "macs"
STAGE_SHA256 = "onnx_sha256"
