"""Write a Triton model repository for a Little-Big pair: `little`, `big` and the gate `littlebig`.

Every config.pbtxt is built as Triton's own ModelConfig protobuf and printed with text_format, so
field names and types are checked by the schema rather than by string pasting.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.client.labels import ClassLabels
from littlebig.contract import BIG_MODEL, GATE_MODEL, GEAR_INTERVAL_MS, GEARS, LATENCY_TARGET_MS, LITTLE_MODEL, THRESHOLD
from littlebig.export.metadata import output_names, read_metadata

RUNTIMES = ("python", "onnxruntime", "tensorrt")
LITTLE, BIG, GATE = LITTLE_MODEL, BIG_MODEL, GATE_MODEL
LABEL_FILE = "labels.txt"


class RepositoryError(ValueError):
    """The pair or the options cannot make a working repository."""


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the builder needs from an exported ONNX file (read from its littlebig.* metadata)."""

    path: Path
    wire_size: int
    num_classes: int
    macs: int
    crop_pct: float
    labels: ClassLabels | None = None
    top1: bool = False  # the graph also answers CLASS and CONFIDENCE (in-graph top-1)

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelFacts":
        path = Path(path)
        if not path.is_file():
            raise RepositoryError(f"ONNX file {path} does not exist")
        meta = read_metadata(path)
        missing = {"wire_size", "num_classes", "macs"} - meta.keys()
        if missing:
            raise RepositoryError(
                f"{path} lacks littlebig metadata ({', '.join(sorted(missing))}): export it with `littlebig export`"
            )
        labels = ClassLabels.from_json(meta["labels"]) if "labels" in meta else None
        top1 = {"CLASS", "CONFIDENCE"} <= set(output_names(path))
        return cls(
            path, int(meta["wire_size"]), int(meta["num_classes"]), int(meta["macs"]), float(meta.get("crop_pct", 0.875)),
            labels, top1,
        )


@dataclasses.dataclass(frozen=True)
class RepositoryOptions:
    runtime: str = "python"
    max_batch_size: int = 64
    threshold: float = 0.5
    ensemble_weight: float = 1.0
    # Two gate instances: while one waits for little's answer, the other gathers the next batch, so
    # little always has work queued (measured on the 2-core CPU server: gate/little at T=0 0.95 -> 0.98).
    gate_instances: int = 2
    little_instances: int = 1
    big_instances: int = 1
    # Dynamic-batching queue delays: how long a model waits for more requests to fill a batch.
    gate_queue_delay_us: int = 0
    little_queue_delay_us: int = 0
    big_queue_delay_us: int = 0
    # onnxruntime threads per python-runtime instance (0: onnxruntime's default, one per core).
    intra_op_threads: int = 0
    # CPU priority increment (nice) of big's python-runtime instances: on a CPU server the requests
    # little answers go first and escalated rows wait for idle cycles. On the 2-core server at
    # concurrency 32 it cut little-answered p50 minus little alone's from ~+50 ms to ~+14 ms; the
    # escalated requests pay (p50 ~460 vs ~400 ms). Big alone is as fast at 19 as at 0 (nothing
    # competes with it). Ignored by the native runtimes.
    big_nice: int = 19
    # Degraded mode: "little" answers escalated rows with little's answer (ROUTE=2) when big fails.
    on_big_failure: str = "fail"
    # Bound on each call of the gate to little or big (a stalled child fails the call instead of hanging it).
    child_timeout_ms: int = 30_000
    # Gears (client/gears.py): the ladder as the gate's JSON parameter [[T, drop], ...], starting at
    # `threshold`, and the latency the gate keeps by moving along it (0: gears off, T stays fixed).
    gears: str | None = None
    latency_target_ms: float = 0.0
    gear_interval_ms: int = 500  # the gate reconsiders its gear at most this often
    # Triton's queue policy on the gate: beyond max_queue_size waiting requests (0: no bound), or after
    # waiting queue_timeout_ms (0: no bound), a request is refused at once with UNAVAILABLE.
    max_queue_size: int = 0
    queue_timeout_ms: int = 0

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise RepositoryError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.max_batch_size < 1:
            raise RepositoryError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise RepositoryError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise RepositoryError(f"ensemble weight must be in [0, 1], got {self.ensemble_weight}")
        for name in ("gate_instances", "little_instances", "big_instances"):
            if getattr(self, name) < 1:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 1")
        if not 0 <= self.big_nice <= 19:
            raise RepositoryError(f"big nice must be in 0..19, got {self.big_nice}")
        if self.on_big_failure not in ("fail", "little"):
            raise RepositoryError(f"on_big_failure must be 'fail' or 'little', got {self.on_big_failure!r}")
        if self.child_timeout_ms < 0:
            raise RepositoryError(f"child timeout must be >= 0 ms (0: none), got {self.child_timeout_ms}")
        for name in ("latency_target_ms", "max_queue_size", "queue_timeout_ms"):
            if getattr(self, name) < 0:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 0 (0: none), got {getattr(self, name)}")
        if self.gear_interval_ms < 1:
            raise RepositoryError(f"gear interval must be >= 1 ms, got {self.gear_interval_ms}")
        self._validate_gears()

    def _validate_gears(self) -> None:
        if self.latency_target_ms and not self.gears:
            raise RepositoryError("a latency target needs gears to move along: pass the calibration report's ladder")
        if not self.gears:
            return
        try:
            pairs = [(float(t), float(d)) for t, d in json.loads(self.gears)]
        except (ValueError, TypeError) as err:
            raise RepositoryError(f"gears must be JSON [[T, drop], ...], got {self.gears!r} ({err})") from None
        thresholds = [t for t, _ in pairs]
        if not pairs or thresholds[0] != float(self.threshold):
            raise RepositoryError(f"the gears must start at the threshold T={self.threshold}, got {thresholds[:1]}")
        if any(b >= a for a, b in zip(thresholds, thresholds[1:])) or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise RepositoryError(f"gear thresholds must be in [0, 1] and strictly decreasing, got {thresholds}")


def _tensor(cls, name: str, data_type: int, dims: list[int]):
    return cls(name=name, data_type=data_type, dims=dims)


def _parameters(config: mc.ModelConfig, values: dict[str, object]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _probs_output(num_classes: int, labels: ClassLabels | None) -> mc.ModelOutput:
    output = _tensor(mc.ModelOutput, "PROBS", mc.TYPE_FP32, [num_classes])
    if labels is not None:
        output.label_filename = LABEL_FILE  # Triton's classification extension answers score:index:label
    return output


def _top1_outputs() -> list[mc.ModelOutput]:
    return [_tensor(mc.ModelOutput, "CLASS", mc.TYPE_INT64, [1]), _tensor(mc.ModelOutput, "CONFIDENCE", mc.TYPE_FP32, [1])]


def classifier_config(
    name: str, facts: ModelFacts, options: RepositoryOptions, instances: int, queue_delay_us: int, nice: int = 0,
    labels: ClassLabels | None = None,
) -> mc.ModelConfig:
    """Config of `little` or `big`: IMAGE uint8 [S, S, 3] -> PROBS float32 [C], dynamic batch."""
    config = mc.ModelConfig(name=name, max_batch_size=options.max_batch_size)
    config.input.append(_tensor(mc.ModelInput, "IMAGE", mc.TYPE_UINT8, [facts.wire_size, facts.wire_size, 3]))
    config.output.append(_probs_output(facts.num_classes, labels))
    if facts.top1:
        config.output.extend(_top1_outputs())
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    group = config.instance_group.add(count=instances)
    if options.runtime == "python":
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        _parameters(config, {"onnx_file": "model.onnx", "intra_op_threads": options.intra_op_threads, "nice": nice})
    elif options.runtime == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        group.kind = mc.ModelInstanceGroup.KIND_AUTO  # GPU where there is one
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
        group.kind = mc.ModelInstanceGroup.KIND_GPU
    _parameters(config, {"macs": facts.macs})
    return config


def gate_config(little: ModelFacts, big: ModelFacts, options: RepositoryOptions, labels: ClassLabels | None = None) -> mc.ModelConfig:
    config = mc.ModelConfig(name=GATE, backend="python", max_batch_size=options.max_batch_size)
    size = little.wire_size
    config.input.append(_tensor(mc.ModelInput, "IMAGE", mc.TYPE_UINT8, [size, size, 3]))
    config.output.extend(
        _top1_outputs() + [_tensor(mc.ModelOutput, "ROUTE", mc.TYPE_INT32, [1]), _probs_output(little.num_classes, labels)]
        + [_tensor(mc.ModelOutput, THRESHOLD, mc.TYPE_FP64, [1])]  # the T that applied to each row (gears move it)
    )
    config.dynamic_batching.max_queue_delay_microseconds = options.gate_queue_delay_us
    _queue_policy(config, options)
    config.instance_group.add(count=options.gate_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    _parameters(
        config,
        {
            "little_model": LITTLE,
            "big_model": BIG,
            "threshold": repr(float(options.threshold)),
            "ensemble_weight": repr(float(options.ensemble_weight)),
            "macs_little": little.macs,
            "macs_big": big.macs,
            "wire_size": size,
            "crop_pct": repr(little.crop_pct),
            "num_classes": little.num_classes,
            # Both children answer CLASS and CONFIDENCE: the gate asks for PROBS only when it needs them.
            "children_top1": int(little.top1 and big.top1),
            "on_big_failure": options.on_big_failure,
            "child_timeout_ms": options.child_timeout_ms,
        },
    )
    if options.gears:
        _parameters(config, {GEARS: options.gears, LATENCY_TARGET_MS: repr(float(options.latency_target_ms)),
                             GEAR_INTERVAL_MS: options.gear_interval_ms})
    if labels is not None:
        # The client reads the model's own labels from here (calibration maps data labels through them).
        _parameters(config, {"labels": labels.to_json()})
    return config


def _queue_policy(config: mc.ModelConfig, options: RepositoryOptions) -> None:
    """Bounded queue: Triton refuses requests beyond it with UNAVAILABLE before the gate sees them."""
    if not (options.max_queue_size or options.queue_timeout_ms):
        return
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = options.queue_timeout_ms * 1000
    policy.max_queue_size = options.max_queue_size


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def read_config(path: str | Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / "config.pbtxt").write_text(config_text(config))


def _template(name: str) -> Path:
    return Path(resources.files("littlebig.model_repository") / name / "1" / "model.py")


def check_pair(little: ModelFacts, big: ModelFacts) -> None:
    if little.wire_size != big.wire_size:
        raise RepositoryError(
            f"wire sizes differ: little {little.path} takes {little.wire_size}px, big {big.path} takes "
            f"{big.wire_size}px; export both with the same --wire-size"
        )
    if little.num_classes != big.num_classes:
        raise RepositoryError(
            f"class counts differ: little {little.path} has {little.num_classes}, big {big.path} has {big.num_classes}"
        )
    if little.labels is not None and big.labels is not None and little.labels != big.labels:
        pairs = zip(little.labels.ids or little.labels.names, big.labels.ids or big.labels.names)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), 0)
        raise RepositoryError(
            f"class labels differ: class {first} is {little.labels.names[first]!r} in little {little.path} and "
            f"{big.labels.names[first]!r} in big {big.path}; both models must predict the same classes in the same order"
        )


def _write_model(model_dir: Path, config: mc.ModelConfig, labels: ClassLabels | None) -> None:
    shutil.rmtree(model_dir, ignore_errors=True)
    (model_dir / "1").mkdir(parents=True)
    write_config(model_dir, config)
    if labels is not None:
        (model_dir / LABEL_FILE).write_text(labels.file_lines())


def build_repository(
    little_onnx: str | Path,
    big_onnx: str | Path,
    out: str | Path,
    options: RepositoryOptions = RepositoryOptions(),
    *,
    little_plan: str | Path | None = None,
    big_plan: str | Path | None = None,
) -> Path:
    """Write `little`, `big` and `littlebig` under ``out`` (replacing those three folders)."""
    options.validate()
    little, big = ModelFacts.from_onnx(little_onnx), ModelFacts.from_onnx(big_onnx)
    check_pair(little, big)
    labels = little.labels or big.labels
    out = Path(out)
    plans = {LITTLE: little_plan, BIG: big_plan}
    for name, facts, instances, delay, nice in (
        (LITTLE, little, options.little_instances, options.little_queue_delay_us, 0),
        (BIG, big, options.big_instances, options.big_queue_delay_us, options.big_nice),
    ):
        model_dir = out / name
        _write_model(model_dir, classifier_config(name, facts, options, instances, delay, nice, labels), labels)
        if options.runtime == "tensorrt":
            # Plans are built on a GPU with the container's TensorRT (docker/build_plans.sh); the ONNX
            # travels beside the version folder as the plan's source.
            shutil.copyfile(facts.path, model_dir / "model.onnx")
            if plans[name]:
                shutil.copyfile(plans[name], model_dir / "1" / "model.plan")
        else:
            shutil.copyfile(facts.path, model_dir / "1" / "model.onnx")
            if options.runtime == "python":
                shutil.copyfile(_template("python_runtime"), model_dir / "1" / "model.py")

    gate_dir = out / GATE
    _write_model(gate_dir, gate_config(little, big, options, labels), labels)
    shutil.copyfile(_template(GATE), gate_dir / "1" / "model.py")
    return out


def set_threshold(repository: str | Path, threshold: float, gears: str | None = None) -> mc.ModelConfig:
    """Write T (and, when given, its gears) into the gate's config.pbtxt; returns the new config.
    Without gears, a ladder whose top is another T is removed (client.control.set_gears)."""
    from littlebig.client.control import set_gears

    if not 0.0 <= threshold <= 1.0:
        raise RepositoryError(f"threshold must be in [0, 1], got {threshold}")
    path = Path(repository) / GATE / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist: not a littlebig repository")
    config = read_config(path)
    config.parameters["threshold"].string_value = repr(float(threshold))
    parameters = {key: {"string_value": value.string_value} for key, value in config.parameters.items()}
    set_gears(parameters, threshold, gears)
    if GEARS in config.parameters and GEARS not in parameters:
        del config.parameters[GEARS]
    elif GEARS in parameters:
        config.parameters[GEARS].string_value = parameters[GEARS]["string_value"]
    path.write_text(config_text(config))
    return config
