"""What the package and the gate (model_repository/littlebig/1/model.py) must agree on: model and
tensor names, routes, config and request parameter keys, and what a valid threshold is.

The gate file stays self-contained (it runs unchanged in the NGC container), so it keeps its own copy
of these; tests/test_contract.py checks that the two agree.
"""

from __future__ import annotations

import enum
import math

GATE_MODEL, LITTLE_MODEL, BIG_MODEL = "littlebig", "little", "big"


def served_stages(parameters: dict[str, str]) -> tuple[str, ...]:
    """The stage models a gate calls, in cost order, from its config parameters (string values):
    `stage_models` (K stages), else the two-stage `little_model`, `big_model`."""
    if parameters.get("stage_models"):
        return tuple(name.strip() for name in parameters["stage_models"].split(","))
    return (parameters["little_model"], parameters["big_model"])


def stage_models(count: int) -> tuple[str, ...]:
    """Model names of a cascade of ``count`` stages in cost order: little, stage1 ... stage{K-2}, big
    (two stages: little, big)."""
    if count < 2:
        raise ValueError(f"a cascade needs at least two stages, got {count}")
    return (LITTLE_MODEL, *(f"stage{k}" for k in range(1, count - 1)), BIG_MODEL)

# Tensors: the wire images in; each child answers PROBS and (in-graph) CLASS and CONFIDENCE; the gate
# answers CLASS, CONFIDENCE, ROUTE, THRESHOLD and, when asked, PROBS.
IMAGE, PROBS, CLASS, CONFIDENCE, ROUTE = "IMAGE", "PROBS", "CLASS", "CONFIDENCE", "ROUTE"
# THRESHOLD, FP64 [K-1] per row: the thresholds that applied (the config's, the gear's under overload,
# or the request's own).
THRESHOLD = "THRESHOLD"
GATE_OUTPUTS = (CLASS, CONFIDENCE, ROUTE, PROBS, THRESHOLD)
# Multi-label models (export metadata task=multilabel): the gate answers LABELS (multi-hot at
# p >= 0.5, INT32 [C]) instead of CLASS.
LABELS = "LABELS"
TASKS = ("multiclass", "multilabel")
MULTILABEL_CUT = 0.5


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

    LITTLE = 0
    BIG = 1
    LITTLE_FALLBACK = 2  # escalated, big failed, little answered (degraded mode, on_big_failure=little)

    @property
    def label(self) -> str:
        return {Route.LITTLE: "little", Route.BIG: "big", Route.LITTLE_FALLBACK: "little (big failed)"}[self]


# The gate's config parameters (all string values in config.pbtxt), written by the repository builder
# (all but metrics_interval_ms, which only a hand-edited config sets; the gate's default is below).
CONFIG_PARAMETERS = (
    "little_model", "big_model", "threshold", "ensemble_weight", "macs_little", "macs_big", "wire_size",
    "crop_pct", "num_classes", "children_top1", "labels", "on_big_failure", "child_timeout_ms",
    "metrics_interval_ms",
    # K stages: model names in cost order, K-1 thresholds ("T1,T2,..."; two stages write `threshold`),
    # MACs per stage, the gating signal and the task.
    "stage_models", "thresholds", "stage_macs", "signal", "task",
    "gears", "latency_target_ms", "gear_interval_ms", "gear_deadline_ms",
    # Little run inside the gate's process (python runtime): its ONNX file relative to the repository.
    "little_onnx", "little_intra_op_threads",
)
# The gate hands its littlebig_* counters to Triton at most this often (config metrics_interval_ms):
# readers of /metrics wait this long after the last answer to see every count.
METRICS_INTERVAL_MS = 100
# Gears (client/gears.py; two-stage cascades): the ladder [[T, expected drop], ...] from the config T
# down, the latency the gate keeps by moving along it (ms, its p99 estimate), how often it may move (ms),
# and how long an adaptive row waits for big before little answers it at a lower gear (ms, 0: no bound).
GEARS, LATENCY_TARGET_MS, GEAR_INTERVAL_MS = "gears", "latency_target_ms", "gear_interval_ms"
GEAR_DEADLINE_MS = "gear_deadline_ms"
# The python-backend onnxruntime runtime's config parameters (model_repository/python_runtime/1/model.py,
# as self-contained as the gate): its ONNX file in the version folder, onnxruntime's intra-op threads,
# and the nice value its stub takes.
RUNTIME_PARAMETERS = ("onnx_file", "intra_op_threads", "nice")
# Every stage model's config (any runtime) states its MACs per image, for the clients' cost figures.
STAGE_MACS = "macs"
# ... and the sha256 of the ONNX file it was built from, so a cache of its answers can tell other weights.
STAGE_SHA256 = "onnx_sha256"
# Request parameters the gate accepts; any other is refused.
REQUEST_PARAMETERS = ("threshold", "thresholds", "on_big_failure")
ON_BIG_FAILURE = ("fail", "little")


def parse_threshold(value, where: str) -> float:
    """T as a float in [0, 1]: numbers and numeric strings; booleans, NaN and anything else refused
    with a ValueError naming ``where`` (the gate's rule; the CLI checks --threshold/--thresholds with it)."""
    if isinstance(value, bool):
        raise ValueError(f"threshold ({where}) must be a number in [0, 1], got {value!r}")
    try:
        threshold = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold ({where}) must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold ({where}) must be in [0, 1], got {value!r}")
    return threshold


def parse_thresholds(value, count: int, where: str) -> tuple[float, ...]:
    """``count`` thresholds from "T1,T2,..." (or one number when count is 1), each checked by
    parse_threshold; a wrong count is refused with a ValueError naming ``where``."""
    parts = value.split(",") if isinstance(value, str) else [value]
    if len(parts) != count:
        raise ValueError(
            f"thresholds ({where}) must be {count} comma-separated numbers in [0, 1] (one per stage but the last), got {value!r}"
        )
    return tuple(parse_threshold(part, where) for part in parts)
