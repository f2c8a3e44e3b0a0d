"""What the gate and its clients agree on (tensor names, routes, request parameters, the threshold
rule), and GateConfig: the gate model's config parameters parsed once into typed values.

Defaults and rules live here and nowhere else: the gate reads its config.pbtxt parameters with
GateConfig.from_parameters, the repository builder writes them with GateConfig.parameters, and the
clients read a served gate's config through the same class. Pure Python: no Triton needed.
"""

import dataclasses
import json
import math

from .signals import DEFAULT_SIGNAL, SIGNALS_OF_TASK

# Tensors. Every stage answers PROBS [C] and, with the in-graph top-1, CLASS [1] and CONFIDENCE [1]. The
# gate answers CLASS (multi-label: LABELS, multi-hot INT32 [C]; segmentation: MASK, INT32 [H, W] class
# indices), CONFIDENCE (the answering stage's signal), ROUTE (the stage that answered), THRESHOLD (FP64
# [K-1], the thresholds that applied) and PROBS (segmentation: [C, H, W]).
PROBS, CLASS, CONFIDENCE, ROUTE, THRESHOLD, LABELS = "PROBS", "CLASS", "CONFIDENCE", "ROUTE", "THRESHOLD", "LABELS"
MASK = "MASK"
GATE_OUTPUTS = (CLASS, CONFIDENCE, ROUTE, PROBS, THRESHOLD)
# Little as an ensemble step before the gate hands its answer over as the gate's inputs LITTLE_CLASS,
# LITTLE_CONFIDENCE, LITTLE_PROBS.
FIRST_PREFIX = "LITTLE_"
# ROUTE: the index of the stage that answered; K + k when stage k answered because stage k + 1 failed
# (on_big_failure=little). Two stages: 0 little, 1 big, 2 little because big failed.
ROUTE_LITTLE, ROUTE_BIG, ROUTE_LITTLE_FALLBACK = 0, 1, 2
TASKS = ("multiclass", "multilabel", "segmentation")
# The tensor that carries each task's answer.
ANSWER_OF_TASK = {"multiclass": CLASS, "multilabel": LABELS, "segmentation": MASK}
MULTILABEL_CUT = 0.5  # multi-label answers: the labels with p >= this
ON_BIG_FAILURE = ("fail", "little")
REQUEST_PARAMETERS = ("threshold", "thresholds", "on_big_failure")
# The audit's signal bins: bin k holds the rows whose stage-0 signal is in [k / AUDIT_BINS, (k + 1) / AUDIT_BINS)
# (the last one includes 1); metrics label each bin by its lower edge, bin_label(k).
AUDIT_BINS = 100


def bin_label(k: int) -> str:
    return f"{k / AUDIT_BINS:.2f}"


class ConfigError(ValueError):
    """A config parameter the gate cannot work with: the model does not load."""


class RequestError(ValueError):
    """A problem with one request; only that request fails (INVALID_ARG)."""


def parse_threshold(value, where: str) -> float:
    """T as a float in [0, 1]; numbers and numeric strings are accepted, anything else is refused."""
    if isinstance(value, bool):
        raise RequestError(f"threshold ({where}) must be a number in [0, 1], got {value!r}")
    try:
        threshold = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RequestError(f"threshold ({where}) must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise RequestError(f"threshold ({where}) must be in [0, 1], got {value!r}")
    return threshold


def parse_thresholds(value, count: int, where: str) -> tuple:
    """``count`` thresholds from "T1,T2,..." (or one number when count is 1), each as parse_threshold."""
    parts = value.split(",") if isinstance(value, str) else [value]
    if len(parts) != count:
        raise RequestError(
            f"thresholds ({where}) must be {count} comma-separated numbers in [0, 1] (one per stage but the last), got {value!r}"
        )
    return tuple(parse_threshold(part, where) for part in parts)


def parse_on_big_failure(value, where: str) -> str:
    if value not in ON_BIG_FAILURE:
        raise RequestError(f"on_big_failure ({where}) must be one of {', '.join(map(repr, ON_BIG_FAILURE))}, got {value!r}")
    return value


def stage_roles(count: int) -> tuple:
    """Names of the stages of a cascade of ``count`` in cost order: little, stage1 ... stage{K-2}, big."""
    if count < 2:
        raise ConfigError(f"a cascade needs at least two stages, got {count}")
    return ("little", *(f"stage{k}" for k in range(1, count - 1)), "big")


def parse_ladder(text: str) -> tuple:
    """Gears as the config writes them, JSON [[T, expected drop], ...], as ((T, drop), ...)."""
    try:
        ladder = tuple((float(t), float(d)) for t, d in json.loads(text))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"gears must be JSON [[T, drop], ...], got {text!r} ({err})") from None
    if not ladder:
        raise ConfigError("gears must hold at least one gear, [[T, 0]]")
    return ladder


def ladder_text(ladder) -> str:
    return json.dumps([[t, d] for t, d in ladder])


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The gate's config parameters (config.pbtxt string values, under the same names), checked."""

    stage_models: tuple  # the stages' model names in cost order (little ... big)
    stage_macs: tuple  # multiply-accumulates per row of each stage, for the live cost metric
    thresholds: tuple  # T_0 .. T_{K-2}: stage k answers a row when its signal >= T_k
    task: str = "multiclass"
    signal: str = ""  # the gating signal (signals.py); "": the task's default
    ensemble_weight: float = 1.0  # two stages: an escalated row gets (1 - w) p_little + w p_big (paper Eq. 8)
    on_big_failure: str = "fail"  # or "little": a failing stage's rows get the previous stage's answer
    child_timeout_ms: float = 30_000.0  # bound on each call of a later stage (0: none)
    metrics_interval_ms: float = 100.0  # how often the littlebig_* counters reach /metrics
    children_top1: bool = False  # every stage answers CLASS and CONFIDENCE in its graph
    # Where stage 0 runs: as the ensemble step before the gate (False), or inside the gate's own process
    # with onnxruntime (True): its ONNX file, relative to the model repository, and onnxruntime's threads.
    little_in_gate: bool = False
    little_onnx: str = ""
    little_intra_op_threads: int = 0  # 0: onnxruntime's default
    # Gears (two stages): the ladder ((T, expected drop), ...) from T_0 down, the latency the gate keeps by
    # moving along it, how often it may move, and how long an adaptive row waits for big (0: no bound).
    gears: tuple = ()
    latency_target_ms: float = 0.0
    gear_interval_ms: float = 500.0
    gear_deadline_ms: float = 0.0
    # The audit (two stages, opt-in): each row little answers is also sent to big with probability
    # audit_rate, after its answer left; at most audit_in_flight such calls per gate instance, each dropped
    # from big's queue after audit_timeout_ms (0: the child timeout). audit_promise: the calibrated level the
    # live bound on answers differing from big's is checked against (0: none; calibrate --apply sets it).
    audit_rate: float = 0.0
    audit_in_flight: int = 1
    audit_timeout_ms: float = 1000.0
    audit_promise: float = 0.0
    # For clients, not read by the gate: the wire format (video models: frames per clip), the class count
    # and the class labels (JSON).
    wire_size: int = 0
    crop_pct: float = 0.875
    frames: int = 0
    num_classes: int = 0
    labels: str = ""

    def __post_init__(self):
        if not self.signal:
            object.__setattr__(self, "signal", DEFAULT_SIGNAL.get(self.task, ""))
        self._check_stages()
        self._check_numbers()
        self._check_gears()
        self._check_audit()

    def _check_stages(self) -> None:
        count = len(self.stage_models)
        stage_roles(count)
        if len(self.stage_macs) != count:
            raise ConfigError(f"stage_macs has {len(self.stage_macs)} values for {count} stages")
        if len(self.thresholds) != count - 1:
            raise ConfigError(f"thresholds has {len(self.thresholds)} values for {count} stages: give {count - 1}")
        for value in self.thresholds:
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"thresholds must be in [0, 1], got {value} in {list(self.thresholds)}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.signal not in SIGNALS_OF_TASK[self.task]:
            raise ConfigError(f"signal for {self.task} models must be one of {', '.join(SIGNALS_OF_TASK[self.task])}, "
                              f"got {self.signal!r}")
        if self.little_in_gate != bool(self.little_onnx):
            raise ConfigError("little_onnx (stage 0's ONNX file) goes with little_in_gate, and only with it")

    def _check_numbers(self) -> None:
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise ConfigError(f"ensemble weight must be in [0, 1], got {self.ensemble_weight}")
        if self.ensemble_weight != 1.0 and len(self.stage_models) != 2:
            raise ConfigError("the ensemble weight (paper Eq. 8) needs exactly two stages")
        if self.task == "segmentation" and (self.ensemble_weight != 1.0 or self.gears):
            raise ConfigError("segmentation cascades route whole images on the graph's region confidence: no ensemble "
                              "weight and no gears (both are made for class probabilities)")
        if self.on_big_failure not in ON_BIG_FAILURE:
            raise ConfigError(f"on_big_failure must be one of {', '.join(ON_BIG_FAILURE)}, got {self.on_big_failure!r}")
        for name in ("child_timeout_ms", "latency_target_ms", "gear_deadline_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number of ms >= 0 (0: none), got {value}")
        for name in ("metrics_interval_ms", "gear_interval_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a number of ms > 0, got {getattr(self, name)}")

    def _check_gears(self) -> None:
        if (self.latency_target_ms or self.gear_deadline_ms) and not self.gears:
            raise ConfigError("a latency target or a gear deadline needs gears to move along: pass the calibration "
                              "report's ladder")
        if not self.gears:
            return
        if len(self.stage_models) != 2:
            raise ConfigError(f"gears apply to two-stage cascades; this one has {len(self.stage_models)} stages")
        ladder = [t for t, _ in self.gears]
        if ladder[0] != self.thresholds[0]:
            raise ConfigError(f"the gears must start at the threshold T={self.thresholds[0]}, got {ladder[0]}")
        if any(b >= a for a, b in zip(ladder, ladder[1:])) or not all(0.0 <= t <= 1.0 for t in ladder):
            raise ConfigError(f"gear thresholds must be in [0, 1] and strictly decreasing, got {ladder}")
        if self.child_timeout_ms and self.gear_deadline_ms >= self.child_timeout_ms:
            raise ConfigError(f"the gear deadline ({self.gear_deadline_ms:g} ms) must be below the child timeout "
                              f"({self.child_timeout_ms:g} ms), the longest a call to big may wait")

    def _check_audit(self) -> None:
        for name in ("audit_rate", "audit_promise"):
            if not (math.isfinite(getattr(self, name)) and 0.0 <= getattr(self, name) <= 1.0):
                raise ConfigError(f"{name} must be a share in [0, 1], got {getattr(self, name)}")
        if self.audit_in_flight < 1:
            raise ConfigError(f"audit_in_flight must be >= 1, got {self.audit_in_flight}")
        if not (math.isfinite(self.audit_timeout_ms) and self.audit_timeout_ms >= 0):
            raise ConfigError(f"audit_timeout_ms must be a number of ms >= 0 (0: the child timeout), got {self.audit_timeout_ms}")
        if self.audit_rate and (len(self.stage_models) != 2 or self.task != "multiclass" or self.ensemble_weight != 1.0):
            raise ConfigError("the audit compares little's answers with big's: it needs a two-stage multi-class cascade "
                              "without an ensemble weight")

    @property
    def adaptive(self) -> bool:
        """Gears in force: a ladder and a latency target to keep."""
        return bool(self.gears) and self.latency_target_ms > 0

    def with_thresholds(self, thresholds, gears=None) -> "GateConfig":
        """This config at other thresholds, with ``gears`` when given; without, the ladder is kept only when
        it starts at the new T_0 (its drops were measured from there), else gears, target and deadline go."""
        thresholds = tuple(float(t) for t in thresholds)
        if gears is not None:
            return dataclasses.replace(self, thresholds=thresholds, gears=tuple(gears))
        if self.gears and self.gears[0][0] != thresholds[0]:
            return dataclasses.replace(self, thresholds=thresholds, gears=(), latency_target_ms=0.0, gear_deadline_ms=0.0)
        return dataclasses.replace(self, thresholds=thresholds)

    @classmethod
    def from_parameters(cls, parameters: dict) -> "GateConfig":
        """From config parameters (string values). Unknown lower-case keys are refused (upper-case ones are
        the python backend's own, e.g. EXECUTION_ENV_PATH)."""
        unknown = sorted(key for key in parameters if key not in FIELDS and not key.isupper())
        if unknown:
            raise ConfigError(f"unknown config parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
        missing = [name for name in ("stage_models", "stage_macs", "thresholds") if name not in parameters]
        if missing:
            raise ConfigError(f"config parameter(s) {', '.join(map(repr, missing))} missing: not a littlebig gate config")
        values = {}
        for name, text in parameters.items():
            if name in FIELDS:
                values[name] = _parse(name, text)
        return cls(**values)

    def parameters(self) -> dict:
        """The config.pbtxt parameters (string values) of this config; empty optional ones are left out."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value in ("", ()) or (field.name in ("wire_size", "num_classes", "frames") and not value):
                continue
            out[field.name] = _format(field.name, value)
        return out


FIELDS = tuple(field.name for field in dataclasses.fields(GateConfig))
_TUPLES = {"stage_models": str, "stage_macs": int}


def _parse(name: str, text: str):
    """One parameter's string value as its field's type."""
    try:
        if name in _TUPLES:
            return tuple(_TUPLES[name](part.strip()) for part in text.split(","))
        if name == "thresholds":
            return parse_thresholds(text, len(text.split(",")), "config parameter")
        if name == "gears":
            return parse_ladder(text)
        kind = type(GateConfig.__dataclass_fields__[name].default)
        if kind is bool:
            return {"1": True, "0": False}[text.strip()]
        return kind(text.strip()) if kind is not str else text
    except (ValueError, KeyError) as err:
        raise ConfigError(f"config parameter {name!r} cannot be {text!r} ({err})") from None


def _format(name: str, value) -> str:
    if name in _TUPLES:
        return ",".join(str(v) for v in value)
    if name == "thresholds":
        return ",".join(repr(float(t)) for t in value)
    if name == "gears":
        return ladder_text(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)
