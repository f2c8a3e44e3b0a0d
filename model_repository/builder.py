"""Write a Triton model repository for a Little-Big cascade: its stages (`little`, `stage1`, ...,
`big`; two stages: `little`, `big`) and the gate `littlebig`.

Every config.pbtxt is built as Triton's own ModelConfig protobuf and printed with text_format, so
field names and types are checked by the schema rather than by string pasting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from onnx import TensorProto
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.client.labels import ClassLabels
from littlebig.contract import (
    BIG_MODEL, CLASS, CONFIDENCE, GATE_MODEL, GEAR_DEADLINE_MS, GEAR_INTERVAL_MS, GEARS, LABELS, LATENCY_TARGET_MS, LITTLE_MODEL,
    ON_BIG_FAILURE, PROBS, ROUTE, STAGE_MACS, STAGE_SHA256, TASKS, THRESHOLD, served_stages, stage_models,
)
from littlebig.export.metadata import graph_inputs, output_names, read_metadata
from littlebig.signals import DEFAULT_SIGNAL, MULTICLASS_SIGNALS, MULTILABEL_SIGNALS

RUNTIMES = ("python", "onnxruntime", "tensorrt")
LITTLE, BIG, GATE = LITTLE_MODEL, BIG_MODEL, GATE_MODEL
LABEL_FILE = "labels.txt"


class RepositoryError(ValueError):
    """The models or the options cannot make a working repository."""


# ONNX element types the stages may take, as Triton data types.
ONNX_TO_TRITON = {
    TensorProto.UINT8: mc.TYPE_UINT8, TensorProto.INT8: mc.TYPE_INT8, TensorProto.INT32: mc.TYPE_INT32,
    TensorProto.INT64: mc.TYPE_INT64, TensorProto.FLOAT: mc.TYPE_FP32, TensorProto.FLOAT16: mc.TYPE_FP16,
    TensorProto.DOUBLE: mc.TYPE_FP64, TensorProto.BOOL: mc.TYPE_BOOL,
}
SIGNALS_OF_TASK = {"multiclass": MULTICLASS_SIGNALS, "multilabel": MULTILABEL_SIGNALS}


@dataclasses.dataclass(frozen=True)
class InputFacts:
    """One graph input of an exported model: name, Triton data type, dims without the batch dim."""

    name: str
    data_type: int
    dims: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} {mc.DataType.Name(self.data_type).removeprefix('TYPE_')} {list(self.dims)}"


def read_inputs(path: Path) -> tuple[InputFacts, ...]:
    """The graph inputs of ``path``; every dim but the batch dim must be fixed (the gate concatenates
    the rows of several requests)."""
    inputs = []
    for name, elem_type, dims in graph_inputs(path):
        if elem_type not in ONNX_TO_TRITON:
            raise RepositoryError(f"{path}: input {name!r} has ONNX element type {TensorProto.DataType.Name(elem_type)}, "
                                  "which the gate does not forward")
        if any(d is None for d in dims[1:]):
            raise RepositoryError(f"{path}: input {name!r} has a dynamic dimension besides the batch ({dims}); "
                                  "export it with fixed sizes (e.g. a fixed sequence length)")
        inputs.append(InputFacts(name, ONNX_TO_TRITON[elem_type], tuple(int(d) for d in dims[1:])))
    if not inputs:
        raise RepositoryError(f"{path} has no graph inputs")
    return tuple(inputs)


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the builder needs from an exported ONNX file (read from its littlebig.* metadata)."""

    path: Path
    wire_size: int | None  # image models: side of the uint8 [S, S, 3] IMAGE input; None for other inputs
    num_classes: int
    macs: int
    crop_pct: float
    labels: ClassLabels | None = None
    top1: bool = False  # the graph also answers CLASS and CONFIDENCE (in-graph top-1)
    inputs: tuple[InputFacts, ...] = ()  # the graph inputs, declared on the stage and on the gate
    task: str = "multiclass"  # or multilabel: PROBS are sigmoid probabilities, no in-graph top-1

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelFacts":
        path = Path(path)
        if not path.is_file():
            raise RepositoryError(f"ONNX file {path} does not exist")
        meta = read_metadata(path)
        missing = {"num_classes", "macs"} - meta.keys()
        if missing:
            raise RepositoryError(
                f"{path} lacks littlebig metadata ({', '.join(sorted(missing))}): export it with `littlebig export`"
            )
        task = meta.get("task", "multiclass")
        if task not in TASKS:
            raise RepositoryError(f"{path}: metadata task must be one of {', '.join(TASKS)}, got {task!r}")
        labels = ClassLabels.from_json(meta["labels"]) if "labels" in meta else None
        top1 = {CLASS, CONFIDENCE} <= set(output_names(path))
        wire_size = int(meta["wire_size"]) if "wire_size" in meta else None
        return cls(
            path, wire_size, int(meta["num_classes"]), int(meta["macs"]), float(meta.get("crop_pct", 0.875)),
            labels, top1, read_inputs(path), task,
        )

    def input_configs(self) -> list[mc.ModelInput]:
        return [_tensor(mc.ModelInput, i.name, i.data_type, list(i.dims)) for i in self.inputs]


@dataclasses.dataclass(frozen=True)
class RepositoryOptions:
    runtime: str = "python"
    max_batch_size: int = 64
    threshold: float = 0.5
    # K stages: T_0 .. T_{K-2} (stage k answers a row when its signal >= T_k); None: (threshold,) for two.
    thresholds: tuple[float, ...] | None = None
    # Gating signal (littlebig.signals); None: max_softmax, or mean_abs_margin for multi-label models.
    signal: str | None = None
    ensemble_weight: float = 1.0
    # Two gate instances: while one waits for little's answer, the other gathers the next batch, so
    # little always has work queued (measured on the 2-core CPU server: gate/little at T=0 0.95 -> 0.98).
    gate_instances: int = 2
    little_instances: int = 1
    big_instances: int = 1  # and every later stage's (stage1 ...), as the delay and nice below
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
    # An adaptive row still waiting for big this long is answered by little at the highest gear T its
    # signal clears (None: 0.9 x the target, leaving room to send the answer; 0: rows wait for big).
    gear_deadline_ms: float | None = None
    # Triton's queue policy on the gate: beyond max_queue_size waiting requests (0: no bound), or after
    # waiting queue_timeout_ms (0: no bound), a request is refused at once with UNAVAILABLE.
    max_queue_size: int = 0
    queue_timeout_ms: int = 0
    # Run little inside the gate's process (python runtime only): no BLS hop for stage 0. The
    # `little` model is still served (calibration, peers, the supervisor's canary ask it directly).
    little_in_gate: bool = False

    def deadline_ms(self) -> float:
        """The gate's gear_deadline_ms: the one given, else 0.9 x the latency target."""
        return float(self.gear_deadline_ms if self.gear_deadline_ms is not None else 0.9 * self.latency_target_ms)

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise RepositoryError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.max_batch_size < 1:
            raise RepositoryError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise RepositoryError(f"threshold must be in [0, 1], got {self.threshold}")
        for value in self.thresholds or ():
            if not 0.0 <= value <= 1.0:
                raise RepositoryError(f"thresholds must be in [0, 1], got {value} in {list(self.thresholds)}")
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise RepositoryError(f"ensemble weight must be in [0, 1], got {self.ensemble_weight}")
        for name in ("gate_instances", "little_instances", "big_instances"):
            if getattr(self, name) < 1:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 1")
        if not 0 <= self.big_nice <= 19:
            raise RepositoryError(f"big nice must be in 0..19, got {self.big_nice}")
        if self.on_big_failure not in ON_BIG_FAILURE:
            raise RepositoryError(f"on_big_failure must be one of {', '.join(ON_BIG_FAILURE)}, got {self.on_big_failure!r}")
        if self.little_in_gate and self.runtime != "python":
            raise RepositoryError(
                f"--little-in-gate runs little with onnxruntime inside the gate and needs --runtime python; with "
                f"--runtime {self.runtime} little is a native Triton model the gate calls"
            )
        if self.child_timeout_ms < 0:
            raise RepositoryError(f"child timeout must be >= 0 ms (0: none), got {self.child_timeout_ms}")
        for name in ("gate_queue_delay_us", "little_queue_delay_us", "big_queue_delay_us"):
            if getattr(self, name) < 0:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 0 (0: no wait), got {getattr(self, name)}")
        for name in ("latency_target_ms", "max_queue_size", "queue_timeout_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise RepositoryError(f"{name.replace('_', ' ')} must be a finite number >= 0 (0: none), got {getattr(self, name)}")
        if self.gear_interval_ms < 1:
            raise RepositoryError(f"gear interval must be >= 1 ms, got {self.gear_interval_ms}")
        if self.gear_deadline_ms is not None and not (math.isfinite(self.gear_deadline_ms) and self.gear_deadline_ms >= 0):
            raise RepositoryError(f"gear deadline must be a number of ms >= 0 (0: none), got {self.gear_deadline_ms}")
        self._validate_gears()

    def _validate_gears(self) -> None:
        if self.latency_target_ms and not self.gears:
            raise RepositoryError("a latency target needs gears to move along: pass the calibration report's ladder")
        if self.gear_deadline_ms and not self.gears:
            raise RepositoryError("a gear deadline answers rows at the gears' thresholds: pass the calibration report's ladder")
        if self.gears and self.child_timeout_ms and self.deadline_ms() >= self.child_timeout_ms:
            raise RepositoryError(f"the gear deadline ({self.deadline_ms():g} ms) must be below the child timeout "
                                  f"({self.child_timeout_ms} ms), the longest a call to big may wait")
        if not self.gears:
            return
        try:
            pairs = [(float(t), float(d)) for t, d in json.loads(self.gears)]
        except (ValueError, TypeError) as err:
            raise RepositoryError(f"gears must be JSON [[T, drop], ...], got {self.gears!r} ({err})") from None
        thresholds = [t for t, _ in pairs]
        if not pairs:
            raise RepositoryError("gears must hold at least one gear, [[T, 0]]")
        if any(b >= a for a, b in zip(thresholds, thresholds[1:])) or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise RepositoryError(f"gear thresholds must be in [0, 1] and strictly decreasing, got {thresholds}")


def _tensor(cls, name: str, data_type: int, dims: list[int]):
    return cls(name=name, data_type=data_type, dims=dims)


def _parameters(config: mc.ModelConfig, values: dict[str, object]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _probs_output(num_classes: int, labels: ClassLabels | None) -> mc.ModelOutput:
    output = _tensor(mc.ModelOutput, PROBS, mc.TYPE_FP32, [num_classes])
    if labels is not None:
        output.label_filename = LABEL_FILE  # Triton's classification extension answers score:index:label
    return output


def _top1_outputs() -> list[mc.ModelOutput]:
    return [_tensor(mc.ModelOutput, CLASS, mc.TYPE_INT64, [1]), _tensor(mc.ModelOutput, CONFIDENCE, mc.TYPE_FP32, [1])]


def classifier_config(
    name: str, facts: ModelFacts, options: RepositoryOptions, instances: int, queue_delay_us: int, nice: int = 0,
    labels: ClassLabels | None = None,
) -> mc.ModelConfig:
    """Config of a stage: its graph inputs (IMAGE uint8 [S, S, 3], ...) -> PROBS float32 [C], dynamic batch."""
    config = mc.ModelConfig(name=name, max_batch_size=options.max_batch_size)
    config.input.extend(facts.input_configs())
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
    _parameters(config, {STAGE_MACS: facts.macs, STAGE_SHA256: file_sha256(facts.path)})
    return config


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stage_thresholds(options: RepositoryOptions, count: int) -> tuple[float, ...]:
    """The K-1 thresholds of a cascade of ``count`` stages."""
    if options.thresholds is None:
        if count != 2:
            raise RepositoryError(f"a cascade of {count} stages needs {count - 1} thresholds (--thresholds T1,T2,...)")
        return (options.threshold,)
    if len(options.thresholds) != count - 1:
        raise RepositoryError(
            f"a cascade of {count} stages needs {count - 1} thresholds (one per stage but the last), "
            f"got {len(options.thresholds)}: {list(options.thresholds)}"
        )
    return tuple(options.thresholds)


def gate_signal(options: RepositoryOptions, task: str) -> str:
    signal = options.signal or DEFAULT_SIGNAL[task]
    if signal not in SIGNALS_OF_TASK[task]:
        raise RepositoryError(f"signal {signal!r} does not suit {task} models; choose one of {', '.join(SIGNALS_OF_TASK[task])}")
    return signal


def _gate_outputs(first: ModelFacts, labels: ClassLabels | None) -> list[mc.ModelOutput]:
    if first.task == "multilabel":
        answer = [_tensor(mc.ModelOutput, LABELS, mc.TYPE_INT32, [first.num_classes]), _top1_outputs()[1]]
    else:
        answer = _top1_outputs()
    return answer + [_tensor(mc.ModelOutput, ROUTE, mc.TYPE_INT32, [1]), _probs_output(first.num_classes, labels)]


def gate_config(*stages: ModelFacts, options: RepositoryOptions, labels: ClassLabels | None = None) -> mc.ModelConfig:
    """The gate over ``stages`` (cost order): their inputs in, CLASS (or LABELS), CONFIDENCE, ROUTE, PROBS out."""
    first, last = stages[0], stages[-1]
    names = stage_models(len(stages))
    thresholds = stage_thresholds(options, len(stages))
    if options.ensemble_weight != 1.0 and len(stages) != 2:
        raise RepositoryError("the Little-Big ensemble (--ensemble-weight, paper Eq. 8) needs exactly two stages")
    config = mc.ModelConfig(name=GATE, backend="python", max_batch_size=options.max_batch_size)
    config.input.extend(first.input_configs())
    config.output.extend(_gate_outputs(first, labels))
    # The thresholds that applied to each row (the gears move T_0 under overload).
    config.output.append(_tensor(mc.ModelOutput, THRESHOLD, mc.TYPE_FP64, [len(stages) - 1]))
    config.dynamic_batching.max_queue_delay_microseconds = options.gate_queue_delay_us
    _queue_policy(config, options)
    config.instance_group.add(count=options.gate_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    # Two stages keep the two-stage keys (threshold); longer cascades write thresholds.
    threshold_keys = {"threshold": repr(float(thresholds[0]))} if len(stages) == 2 else {"thresholds": ",".join(map(repr, map(float, thresholds)))}
    _parameters(
        config,
        {
            "little_model": names[0],
            "big_model": names[-1],
            "stage_models": ",".join(names),
            **threshold_keys,
            "signal": gate_signal(options, first.task),
            "task": first.task,
            "ensemble_weight": repr(float(options.ensemble_weight)),
            "macs_little": first.macs,
            "macs_big": last.macs,
            "stage_macs": ",".join(str(stage.macs) for stage in stages),
            **({"wire_size": first.wire_size} if first.wire_size is not None else {}),
            "crop_pct": repr(first.crop_pct),
            "num_classes": first.num_classes,
            # Every stage answers CLASS and CONFIDENCE: the gate asks for PROBS only when it needs them.
            "children_top1": int(all(stage.top1 for stage in stages)),
            "on_big_failure": options.on_big_failure,
            "child_timeout_ms": options.child_timeout_ms,
        },
    )
    if options.little_in_gate:
        # Relative to the repository, where _write_stage puts little's ONNX file.
        _parameters(config, {"little_onnx": f"{names[0]}/1/model.onnx", "little_intra_op_threads": options.intra_op_threads})
    if options.gears:
        _check_gears_fit(options.gears, thresholds)
        _parameters(config, {GEARS: options.gears, LATENCY_TARGET_MS: repr(float(options.latency_target_ms)),
                             GEAR_INTERVAL_MS: options.gear_interval_ms, GEAR_DEADLINE_MS: repr(options.deadline_ms())})
    if labels is not None:
        # The client reads the model's own labels from here (calibration maps data labels through them).
        _parameters(config, {"labels": labels.to_json()})
    return config


def _check_gears_fit(gears: str, thresholds: tuple[float, ...]) -> None:
    if len(thresholds) != 1:
        raise RepositoryError(f"gears apply to two-stage cascades; this one has {len(thresholds) + 1} stages")
    top = float(json.loads(gears)[0][0])
    if top != float(thresholds[0]):
        raise RepositoryError(f"the gears must start at the threshold T={thresholds[0]}, got {top}")


def _queue_policy(config: mc.ModelConfig, options: RepositoryOptions) -> None:
    """Bounded queue: Triton refuses requests beyond it with UNAVAILABLE before the gate sees them."""
    if not (options.max_queue_size or options.queue_timeout_ms):
        return
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = options.queue_timeout_ms * 1000
    policy.max_queue_size = options.max_queue_size


def _droppable_queue(config: mc.ModelConfig, options: RepositoryOptions) -> None:
    """Big's queue honours each call's own timeout: the gate gives a call whose rows its deadline would
    answer anyway that deadline, and Triton drops it from the queue instead of big computing it. A call's
    own timeout applies only below a nonzero default (2.51), so the default is the gate's child timeout,
    the longest the gate waits for any call (or a day when that is unbounded)."""
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = True
    policy.default_timeout_microseconds = (options.child_timeout_ms or 86_400_000) * 1000


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def read_config(path: str | Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / "config.pbtxt").write_text(config_text(config))


def _template(name: str) -> Path:
    return Path(resources.files("littlebig.model_repository") / name / "1" / "model.py")


def check_pair(little: ModelFacts, big: ModelFacts, roles: tuple[str, str] = (LITTLE, BIG)) -> None:
    """Two stages of one cascade must take the same inputs and answer the same classes and task;
    ``roles`` names them in the messages."""
    first, second = roles
    if little.wire_size is not None and big.wire_size is not None and little.wire_size != big.wire_size:
        raise RepositoryError(
            f"wire sizes differ: {first} {little.path} takes {little.wire_size}px, {second} {big.path} takes "
            f"{big.wire_size}px; export both with the same --wire-size"
        )
    if little.inputs != big.inputs:
        raise RepositoryError(
            f"inputs differ: {first} {little.path} takes {', '.join(map(str, little.inputs))}; {second} {big.path} "
            f"takes {', '.join(map(str, big.inputs))}; every stage must take the same inputs"
        )
    if little.task != big.task:
        raise RepositoryError(f"tasks differ: {first} {little.path} is {little.task}, {second} {big.path} is {big.task}")
    if little.num_classes != big.num_classes:
        raise RepositoryError(
            f"class counts differ: {first} {little.path} has {little.num_classes}, {second} {big.path} has {big.num_classes}"
        )
    if little.labels is not None and big.labels is not None:
        _check_same_labels(little, big, first, second)


def _check_same_labels(little: ModelFacts, big: ModelFacts, first: str, second: str) -> None:
    """Same class names in the same order, and the same ids where both models state ids."""
    a, b = little.labels, big.labels
    both_ids = a.ids is not None and b.ids is not None

    def same(i):
        return i < min(len(a.names), len(b.names)) and a.names[i] == b.names[i] and not (both_ids and a.ids[i] != b.ids[i])

    index = next((i for i in range(max(len(a.names), len(b.names))) if not same(i)), None)
    if index is not None:
        raise RepositoryError(
            f"class labels differ: class {index} is {_label(little.labels, index)} in {first} {little.path} and "
            f"{_label(big.labels, index)} in {second} {big.path}; both models must predict the same classes in the same order"
        )


def _label(labels: ClassLabels, index: int) -> str:
    if index >= len(labels.names):
        return "missing"
    return repr(labels.names[index]) + (f" ({labels.ids[index]})" if labels.ids is not None else "")


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
    """Write `little`, `big` and `littlebig` under ``out`` (replacing those folders)."""
    return build_cascade([little_onnx, big_onnx], out, options, plans=[little_plan, big_plan])


def _write_stage(model_dir: Path, config: mc.ModelConfig, facts: ModelFacts, options: RepositoryOptions,
                 labels: ClassLabels | None, plan: str | Path | None) -> None:
    _write_model(model_dir, config, labels)
    if options.runtime == "tensorrt":
        # Plans are built on a GPU with the container's TensorRT (docker/build_plans.sh); the ONNX
        # travels beside the version folder as the plan's source.
        shutil.copyfile(facts.path, model_dir / "model.onnx")
        if plan:
            shutil.copyfile(plan, model_dir / "1" / "model.plan")
    else:
        shutil.copyfile(facts.path, model_dir / "1" / "model.onnx")
        if options.runtime == "python":
            shutil.copyfile(_template("python_runtime"), model_dir / "1" / "model.py")


def _check_plans(plans: list[str | Path | None] | None, runtime: str) -> None:
    """Before anything is written: plans go with the tensorrt runtime only, and must exist."""
    given = [Path(plan) for plan in plans or () if plan]
    if given and runtime != "tensorrt":
        raise RepositoryError(f"TensorRT plans ({given[0]}) are served only with --runtime tensorrt, not {runtime}")
    for plan in given:
        if not plan.is_file():
            raise RepositoryError(f"TensorRT plan {plan} does not exist")


def _remove_stale_stages(out: Path, names: tuple[str, ...]) -> None:
    """A repository rebuilt with fewer stages must not keep serving the old middle stages."""
    for path in out.glob("stage*"):
        if re.fullmatch(r"stage\d+", path.name) and path.name not in names and (path / "config.pbtxt").is_file():
            shutil.rmtree(path)


def build_cascade(
    onnx_files: list[str | Path],
    out: str | Path,
    options: RepositoryOptions = RepositoryOptions(),
    *,
    plans: list[str | Path | None] | None = None,
) -> Path:
    """Write the K stages (`little`, `stage1`, ..., `big`, models in cost order) and `littlebig` under
    ``out`` (replacing those folders)."""
    options.validate()
    if len(onnx_files) < 2:
        raise RepositoryError(f"a cascade needs at least two models, got {len(onnx_files)}")
    _check_plans(plans, options.runtime)
    stages = [ModelFacts.from_onnx(path) for path in onnx_files]
    names = stage_models(len(stages))
    for k in range(len(stages) - 1):
        check_pair(stages[k], stages[k + 1], (names[k], names[k + 1]))
    # The stages agree on names (check_pair); the gate serves the labels that also state ids, if any do.
    stated = [stage.labels for stage in stages if stage.labels is not None]
    labels = next((s for s in stated if s.ids is not None), stated[0] if stated else None)
    gate = gate_config(*stages, options=options, labels=labels)  # checks thresholds and signal first
    out = Path(out)
    plans = plans or [None] * len(stages)
    for k, (name, facts) in enumerate(zip(names, stages)):
        first = k == 0
        config = classifier_config(
            name, facts, options,
            options.little_instances if first else options.big_instances,
            options.little_queue_delay_us if first else options.big_queue_delay_us,
            0 if first else options.big_nice, labels,
        )
        if k == len(stages) - 1 and options.gears and options.deadline_ms():
            _droppable_queue(config, options)
        _write_stage(out / name, config, facts, options, labels, plans[k])
    _remove_stale_stages(out, names)
    gate_dir = out / GATE
    _write_model(gate_dir, gate, labels)
    shutil.copyfile(_template(GATE), gate_dir / "1" / "model.py")
    return out


def _gate_config_path(repository: str | Path) -> Path:
    path = Path(repository) / GATE / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist: not a littlebig repository")
    return path


def set_threshold(repository: str | Path, threshold: float, gears: str | None = None) -> mc.ModelConfig:
    """Write T (and, when given, its gears) into a two-stage gate's config.pbtxt; returns the new config.
    Without gears, a ladder whose top is another T is removed (client.control.set_gears)."""
    config = set_thresholds(repository, (threshold,))
    from littlebig.client.control import set_gears

    parameters = {key: {"string_value": value.string_value} for key, value in config.parameters.items()}
    set_gears(parameters, threshold, gears)
    if GEARS in config.parameters and GEARS not in parameters:
        del config.parameters[GEARS]
    elif GEARS in parameters:
        config.parameters[GEARS].string_value = parameters[GEARS]["string_value"]
    _gate_config_path(repository).write_text(config_text(config))
    return config


def set_thresholds(repository: str | Path, thresholds: tuple[float, ...]) -> mc.ModelConfig:
    """Write T_0 .. T_{K-2} into the gate's config.pbtxt (two stages: `threshold`); returns the new config."""
    for value in thresholds:
        if not 0.0 <= value <= 1.0:
            raise RepositoryError(f"threshold must be in [0, 1], got {value}")
    path = _gate_config_path(repository)
    config = read_config(path)
    try:
        stages = served_stages({key: value.string_value for key, value in config.parameters.items()})
    except KeyError as missing:
        raise RepositoryError(f"{path} names no stages ({missing} missing): not a littlebig gate config") from None
    if len(thresholds) != len(stages) - 1:
        raise RepositoryError(
            f"{path} serves {len(stages)} stages ({', '.join(stages)}): give {len(stages) - 1} thresholds, got {len(thresholds)}"
        )
    if len(stages) == 2:
        config.parameters["threshold"].string_value = repr(float(thresholds[0]))
    else:
        config.parameters["thresholds"].string_value = ",".join(repr(float(t)) for t in thresholds)
    path.write_text(config_text(config))
    return config


def build_classifiers(models: dict[str, str | Path], out: str | Path, options: RepositoryOptions = RepositoryOptions()) -> Path:
    """A repository of classifiers only, one per ``name: onnx file`` (no gate): several candidates served
    side by side so each can be asked directly (`littlebig pairs`). All must answer the same classes
    at the same wire size."""
    options.validate()
    if options.runtime == "tensorrt":
        raise RepositoryError("build_classifiers serves ONNX files (runtime python or onnxruntime), not TensorRT plans")
    facts = {name: ModelFacts.from_onnx(path) for name, path in models.items()}
    (first_name, first), *rest = facts.items()
    for name, other in rest:
        check_pair(first, other, (first_name, name))
    labels = next((f.labels for f in facts.values() if f.labels is not None), None)
    out = Path(out)
    for name, model in facts.items():
        _write_stage(out / name, classifier_config(name, model, options, 1, 0, 0, labels), model, options, labels, None)
    return out
