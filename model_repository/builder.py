"""Write a Triton model repository for a Little-Big cascade: its stages (`little`, `stage1`, ...,
`big`; two stages: `little`, `big`) and the gate `littlebig`.

Every config.pbtxt is built as Triton's own ModelConfig protobuf and printed with text_format, so
field names and types are checked by the schema rather than by string pasting.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    BIG_MODEL, CLASS, CONFIDENCE, FIRST_PREFIX, GATE_MODEL, GATE_STEP_MODEL, LABELS, LITTLE_MODEL, PROBS, ROUTE, STAGE_MACS,
    STAGE_SHA256, TASKS, THRESHOLD, stage_models,
)
from littlebig.export.metadata import graph_inputs, output_names, read_metadata
from littlebig.model_repository.gate.config import ConfigError, GateConfig, parse_ladder
from littlebig.model_repository.gate.signals import DEFAULT_SIGNAL, SIGNALS_OF_TASK

RUNTIMES = ("python", "onnxruntime", "tensorrt")
LITTLE, BIG, GATE, GATE_STEP = LITTLE_MODEL, BIG_MODEL, GATE_MODEL, GATE_STEP_MODEL
LABEL_FILE = "labels.txt"


class RepositoryError(ValueError):
    """The models or the options cannot make a working repository."""


# ONNX element types the stages may take, as Triton data types.
ONNX_TO_TRITON = {
    TensorProto.UINT8: mc.TYPE_UINT8, TensorProto.INT8: mc.TYPE_INT8, TensorProto.INT32: mc.TYPE_INT32,
    TensorProto.INT64: mc.TYPE_INT64, TensorProto.FLOAT: mc.TYPE_FP32, TensorProto.FLOAT16: mc.TYPE_FP16,
    TensorProto.DOUBLE: mc.TYPE_FP64, TensorProto.BOOL: mc.TYPE_BOOL,
}


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
    # Gating signal (model_repository/gate/signals.py); None: max_softmax, or mean_abs_margin for multi-label models.
    signal: str | None = None
    ensemble_weight: float = GateConfig.ensemble_weight
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
    on_big_failure: str = GateConfig.on_big_failure
    # Bound on each call of the gate to little or big (a stalled child fails the call instead of hanging it).
    child_timeout_ms: int = int(GateConfig.child_timeout_ms)
    # Gears (client/gears.py): the ladder as the gate's JSON parameter [[T, drop], ...], starting at
    # `threshold`, and the latency the gate keeps by moving along it (0: gears off, T stays fixed).
    gears: str | None = None
    latency_target_ms: float = 0.0
    gear_interval_ms: int = int(GateConfig.gear_interval_ms)  # the gate reconsiders its gear at most this often
    # An adaptive row still waiting for big this long is answered by little at the highest gear T its
    # signal clears (None: 0.9 x the target, leaving room to send the answer; 0: rows wait for big).
    gear_deadline_ms: float | None = None
    # Triton's queue policy on the gate: beyond max_queue_size waiting requests (0: no bound), or after
    # waiting queue_timeout_ms (0: no bound), a request is refused at once with UNAVAILABLE.
    max_queue_size: int = 0
    queue_timeout_ms: int = 0
    # Where little runs: inside the gate's process (python runtime only), or as the ensemble's step before
    # the gate. None: inside the gate with the python runtime, where every stage is a Python model and a
    # step would add a second Python hop per request; a step with the native runtimes. The `little`
    # model is served either way (calibration, the supervisor's canary, clients ask it directly).
    little_in_gate: bool | None = None

    @property
    def in_gate(self) -> bool:
        return self.runtime == "python" if self.little_in_gate is None else self.little_in_gate

    def deadline_ms(self) -> float:
        """The gate's gear_deadline_ms: the one given, else 0.9 x the latency target."""
        return float(self.gear_deadline_ms if self.gear_deadline_ms is not None else 0.9 * self.latency_target_ms)

    def validate(self) -> None:
        """The builder's own options; what the gate takes (thresholds, gears, timeouts, ...) GateConfig checks."""
        if self.runtime not in RUNTIMES:
            raise RepositoryError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.max_batch_size < 1:
            raise RepositoryError(f"max batch size must be >= 1, got {self.max_batch_size}")
        for name in ("gate_instances", "little_instances", "big_instances"):
            if getattr(self, name) < 1:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 1")
        if not 0 <= self.big_nice <= 19:
            raise RepositoryError(f"big nice must be in 0..19, got {self.big_nice}")
        if self.little_in_gate and self.runtime != "python":
            raise RepositoryError(
                f"--little-in-gate runs little with onnxruntime inside the gate and needs --runtime python; with "
                f"--runtime {self.runtime} little is a native Triton model the ensemble runs"
            )
        for name in ("gate_queue_delay_us", "little_queue_delay_us", "big_queue_delay_us"):
            if getattr(self, name) < 0:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 0 (0: no wait), got {getattr(self, name)}")
        for name in ("max_queue_size", "queue_timeout_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise RepositoryError(f"{name.replace('_', ' ')} must be a finite number >= 0 (0: none), got {getattr(self, name)}")


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


def _gate_outputs(first: ModelFacts, count: int, labels: ClassLabels | None) -> list[mc.ModelOutput]:
    """CLASS (multi-label: LABELS), CONFIDENCE, ROUTE, PROBS and THRESHOLD (the thresholds that applied to
    each row: the gears move T_0 under overload)."""
    if first.task == "multilabel":
        answer = [_tensor(mc.ModelOutput, LABELS, mc.TYPE_INT32, [first.num_classes]), _top1_outputs()[1]]
    else:
        answer = _top1_outputs()
    return answer + [_tensor(mc.ModelOutput, ROUTE, mc.TYPE_INT32, [1]), _probs_output(first.num_classes, labels),
                     _tensor(mc.ModelOutput, THRESHOLD, mc.TYPE_FP64, [count - 1])]


def gate_settings(*stages: ModelFacts, options: RepositoryOptions, labels: ClassLabels | None = None) -> GateConfig:
    """The gate's parameters for ``stages`` (cost order) and ``options``."""
    first = stages[0]
    names = stage_models(len(stages))
    try:
        gears = {"gears": parse_ladder(options.gears) if options.gears else (), "latency_target_ms": float(options.latency_target_ms),
                 "gear_interval_ms": float(options.gear_interval_ms), "gear_deadline_ms": options.deadline_ms()}
        return GateConfig(
            stage_models=names,
            stage_macs=tuple(stage.macs for stage in stages),
            thresholds=stage_thresholds(options, len(stages)),
            task=first.task,
            signal=gate_signal(options, first.task),
            ensemble_weight=float(options.ensemble_weight),
            on_big_failure=options.on_big_failure,
            child_timeout_ms=float(options.child_timeout_ms),
            # Every stage answers CLASS and CONFIDENCE: the gate asks for PROBS only when it needs them.
            children_top1=all(stage.top1 for stage in stages),
            # Relative to the repository, where _write_stage puts little's ONNX file.
            **({"little_in_gate": True, "little_onnx": f"{names[0]}/1/model.onnx", "little_intra_op_threads": options.intra_op_threads}
               if options.in_gate else {}),
            **gears,
            wire_size=first.wire_size or 0,
            crop_pct=first.crop_pct,
            num_classes=first.num_classes,
            # The client reads the model's own labels from here (calibration maps data labels through them).
            labels=labels.to_json() if labels is not None else "",
        )
    except ConfigError as err:
        raise RepositoryError(str(err)) from None


def gate_configs(*stages: ModelFacts, options: RepositoryOptions, labels: ClassLabels | None = None) -> list[mc.ModelConfig]:
    """The ensemble `littlebig` clients call and the gate model `gate`, its last step: little is the step
    before the gate, or runs inside it."""
    settings = gate_settings(*stages, options=options, labels=labels)
    first = stages[0]
    outputs = _gate_outputs(first, len(stages), labels)
    gate = mc.ModelConfig(name=GATE_STEP, backend="python", max_batch_size=options.max_batch_size)
    gate.input.extend(first.input_configs())
    gate.output.extend(outputs)
    for output in gate.output:
        output.ClearField("label_filename")  # clients ask the ensemble, which carries the labels
    gate.dynamic_batching.max_queue_delay_microseconds = options.gate_queue_delay_us
    gate.instance_group.add(count=options.gate_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    _parameters(gate, settings.parameters())
    ensemble = mc.ModelConfig(name=GATE, platform="ensemble", max_batch_size=options.max_batch_size)
    ensemble.input.extend(first.input_configs())
    ensemble.output.extend(outputs)
    handed = [] if settings.little_in_gate else ([CLASS, CONFIDENCE] if first.top1 else []) + [PROBS]  # stage 0's answer
    little = None if settings.little_in_gate else ensemble.ensemble_scheduling.step.add(model_name=settings.stage_models[0], model_version=-1)
    step = ensemble.ensemble_scheduling.step.add(model_name=GATE_STEP, model_version=-1)
    for name in (i.name for i in first.inputs):
        step.input_map[name] = name
        if little is not None:
            little.input_map[name] = name
    for name in handed:
        output = next(o for o in [*_top1_outputs(), _probs_output(first.num_classes, None)] if o.name == name)
        gate.input.append(_tensor(mc.ModelInput, FIRST_PREFIX + name, output.data_type, list(output.dims)))
        little.output_map[name] = f"little_{name}"
        step.input_map[FIRST_PREFIX + name] = f"little_{name}"
    for output in outputs:
        step.output_map[output.name] = output.name
    return [ensemble, gate]


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


def _copy_gate_package(version_dir: Path) -> None:
    """The gate's modules (model.py and its relative imports), as Triton loads them from a version folder."""
    for module in Path(resources.files("littlebig.model_repository") / "gate").glob("*.py"):
        shutil.copyfile(module, version_dir / module.name)


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
    gates = gate_configs(*stages, options=options, labels=labels)  # checks thresholds and signal first
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
        if first and not options.in_gate:  # requests queue at little, the ensemble's first step
            _queue_policy(config, options)
        if k == len(stages) - 1 and options.gears and options.deadline_ms():
            _droppable_queue(config, options)
        _write_stage(out / name, config, facts, options, labels, plans[k])
    _remove_stale_stages(out, names)
    if options.in_gate:  # requests queue at the gate, the ensemble's only step
        _queue_policy(gates[1], options)
    for config in gates:
        _write_model(out / config.name, config, labels if config.name == GATE else None)
        if config.backend == "python":
            _copy_gate_package(out / config.name / "1")
    return out


def gate_config_path(repository: str | Path) -> Path:
    """The config.pbtxt that holds a repository's gate parameters: the last step of the ensemble `littlebig`."""
    path = Path(repository) / GATE / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist: not a littlebig repository")
    config = read_config(path)
    if config.platform == "ensemble":
        path = Path(repository) / config.ensemble_scheduling.step[-1].model_name / "config.pbtxt"
        if not path.is_file():
            raise RepositoryError(f"{path} does not exist: the ensemble {GATE} names a gate step the repository lacks")
    return path


def read_gate(repository: str | Path) -> tuple[Path, mc.ModelConfig, GateConfig]:
    """The gate's config file, its config and its parameters."""
    path = gate_config_path(repository)
    config = read_config(path)
    try:
        return path, config, GateConfig.from_parameters({key: value.string_value for key, value in config.parameters.items()})
    except ConfigError as err:
        raise RepositoryError(f"{path}: {err}") from None


def set_thresholds(repository: str | Path, thresholds: tuple[float, ...], gears: str | None = None) -> mc.ModelConfig:
    """Write T_0 .. T_{K-2} (and, when given, the gears from T_0 down) into the gate's config.pbtxt; without
    gears, a ladder that starts at another T is removed (GateConfig.with_thresholds). Returns the new config."""
    path, config, settings = read_gate(repository)
    if len(thresholds) != len(settings.stage_models) - 1:
        count = len(settings.stage_models)
        raise RepositoryError(f"{path} serves {count} stages ({', '.join(settings.stage_models)}): give {count - 1} "
                              f"thresholds, got {len(thresholds)}")
    try:
        settings = settings.with_thresholds(thresholds, parse_ladder(gears) if gears else None)
    except ConfigError as err:
        raise RepositoryError(str(err)) from None
    config.ClearField("parameters")
    _parameters(config, settings.parameters())
    path.write_text(config_text(config))
    return config


def set_threshold(repository: str | Path, threshold: float, gears: str | None = None) -> mc.ModelConfig:
    """A two-stage gate's T (set_thresholds)."""
    return set_thresholds(repository, (threshold,), gears)


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
