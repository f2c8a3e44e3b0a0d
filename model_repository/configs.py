"""The config.pbtxt of every model of a cascade, built as Triton's own ModelConfig protobuf and printed
with text_format, so field names and types are checked by the schema rather than by string pasting:
the stages, the gate model `gate` and the ensemble `littlebig` clients call."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.contract import (
    CLASS, CONFIDENCE, FIRST_PREFIX, GATE_MODEL, GATE_STEP_MODEL, LABELS, MASK, PROBS, ROUTE, STAGE_MACS, STAGE_SHA256,
    THRESHOLD, stage_models,
)
from littlebig.gate.config import ConfigError, GateConfig, parse_ladder
from littlebig.gate.signals import DEFAULT_SIGNAL, SIGNALS_OF_TASK
from littlebig.labels import ClassLabels

from .facts import ModelFacts, RepositoryError, file_sha256
from .options import RepositoryOptions

LABEL_FILE = "labels.txt"


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


def _stage_outputs(facts: ModelFacts, labels: ClassLabels | None) -> list[mc.ModelOutput]:
    """A stage's outputs: PROBS [C] (and CLASS, CONFIDENCE with the in-graph top-1); a segmentation stage's
    are its graph's (MASK [S, S], CONFIDENCE [1], PIXEL_CONFIDENCE [S, S], PROBS [C, S, S]), without labels:
    Triton's classification extension reads one score per class."""
    if facts.task == "segmentation":
        return facts.output_configs()
    return [_probs_output(facts.num_classes, labels)] + (_top1_outputs() if facts.top1 else [])


def classifier_config(
    name: str, facts: ModelFacts, options: RepositoryOptions, instances: int, queue_delay_us: int, nice: int = 0,
    labels: ClassLabels | None = None,
) -> mc.ModelConfig:
    """Config of a stage: its graph inputs (IMAGE uint8 [S, S, 3], ...) -> PROBS float32 [C], dynamic batch."""
    config = mc.ModelConfig(name=name, max_batch_size=options.max_batch_size)
    config.input.extend(facts.input_configs())
    config.output.extend(_stage_outputs(facts, labels))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    group = config.instance_group.add(count=instances)
    if options.runtime == "python":
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        _parameters(config, {"onnx_file": "model.onnx", "intra_op_threads": options.intra_op_threads, "nice": nice})
    elif options.runtime == "torch":
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_GPU if options.gpu else mc.ModelInstanceGroup.KIND_CPU
        _parameters(config, {"torchscript_file": "model.pt", "intra_op_threads": options.intra_op_threads})
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
    """CLASS (multi-label: LABELS; segmentation: MASK), CONFIDENCE, ROUTE, PROBS and THRESHOLD (the thresholds
    that applied to each row: the gears move T_0 under overload)."""
    if first.task == "segmentation":  # the stages' own MASK [S, S] and PROBS [C, S, S]
        own = {output.name: output for output in first.output_configs()}
        return [own[MASK], _top1_outputs()[1], _tensor(mc.ModelOutput, ROUTE, mc.TYPE_INT32, [1]), own[PROBS],
                _tensor(mc.ModelOutput, THRESHOLD, mc.TYPE_FP64, [count - 1])]
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
            audit_rate=float(options.audit_rate), audit_in_flight=int(options.audit_in_flight),
            audit_timeout_ms=float(options.audit_timeout_ms), audit_promise=float(options.audit_promise),
            wire_size=first.wire_size or 0,
            crop_pct=first.crop_pct,
            frames=first.frames,
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
    gate = mc.ModelConfig(name=GATE_STEP_MODEL, backend="python", max_batch_size=options.max_batch_size)
    gate.input.extend(first.input_configs())
    gate.output.extend(outputs)
    for output in gate.output:
        output.ClearField("label_filename")  # clients ask the ensemble, which carries the labels
    gate.dynamic_batching.max_queue_delay_microseconds = options.gate_queue_delay_us
    gate.instance_group.add(count=options.gate_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    _parameters(gate, settings.parameters())
    ensemble = mc.ModelConfig(name=GATE_MODEL, platform="ensemble", max_batch_size=options.max_batch_size)
    ensemble.input.extend(first.input_configs())
    ensemble.output.extend(outputs)
    top1 = [MASK if first.task == "segmentation" else CLASS, CONFIDENCE] if first.top1 else []
    handed = [] if settings.little_in_gate else top1 + [PROBS]  # stage 0's answer
    little = None if settings.little_in_gate else ensemble.ensemble_scheduling.step.add(model_name=settings.stage_models[0], model_version=-1)
    step = ensemble.ensemble_scheduling.step.add(model_name=GATE_STEP_MODEL, model_version=-1)
    for name in (i.name for i in first.inputs):
        step.input_map[name] = name
        if little is not None:
            little.input_map[name] = name
    for name in handed:
        output = next(o for o in _stage_outputs(first, None) if o.name == name)
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
