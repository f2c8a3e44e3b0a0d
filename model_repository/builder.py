"""Write a Triton model repository for a Little-Big cascade: its stages (`little`, `stage1`, ...,
`big`; two stages: `little`, `big`), the gate model `gate` with the gate package in its version
folder, and the ensemble `littlebig` clients call; and edit a written repository's thresholds.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from importlib import resources
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from littlebig.contract import GATE_MODEL, stage_models
from littlebig.export.metadata import torchscript_path
from littlebig.gate.config import ConfigError, GateConfig, parse_ladder
from littlebig.labels import ClassLabels

from .configs import (
    LABEL_FILE,
    _droppable_queue,
    _parameters,
    _queue_policy,
    classifier_config,
    config_text,
    gate_configs,
    read_config,
    write_config,
)
from .facts import ModelFacts, RepositoryError, check_pair
from .options import RepositoryOptions


def _template(name: str) -> Path:
    return Path(resources.files("littlebig.model_repository") / name / "1" / "model.py")


def _copy_gate_package(version_dir: Path) -> None:
    """The gate's modules (model.py and its relative imports), as Triton loads them from a version folder."""
    for module in Path(resources.files("littlebig.gate")).glob("*.py"):
        shutil.copyfile(module, version_dir / module.name)


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
    elif options.runtime == "torch":
        # The TorchScript twin written beside the ONNX file (export --torchscript); the ONNX file stays
        # beside the version folder as the source of the stage's facts.
        shutil.copyfile(torchscript_path(facts.path), model_dir / "1" / "model.pt")
        shutil.copyfile(facts.path, model_dir / "model.onnx")
        shutil.copyfile(_template("torch_runtime"), model_dir / "1" / "model.py")
    else:
        shutil.copyfile(facts.path, model_dir / "1" / "model.onnx")
        if options.runtime == "python":
            shutil.copyfile(_template("python_runtime"), model_dir / "1" / "model.py")


def _check_torchscript(onnx_files: list[str | Path], runtime: str) -> None:
    """Before anything is written: the torch runtime serves the TorchScript twin of every file."""
    missing = [str(torchscript_path(f)) for f in onnx_files if runtime == "torch" and not torchscript_path(f).is_file()]
    if missing:
        raise RepositoryError(f"--runtime torch serves the TorchScript beside each ONNX file; missing: {', '.join(missing)} "
                              "(export with --torchscript)")


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
    _check_torchscript(onnx_files, options.runtime)
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
        # Big's queue drops a call past its own timeout: the gears' deadline, the audit's audit_timeout_ms.
        if k == len(stages) - 1 and ((options.gears and options.deadline_ms()) or options.audit_rate):
            _droppable_queue(config, options)
        _write_stage(out / name, config, facts, options, labels, plans[k])
    _remove_stale_stages(out, names)
    if options.in_gate:  # requests queue at the gate, the ensemble's only step
        _queue_policy(gates[1], options)
    for config in gates:
        _write_model(out / config.name, config, labels if config.name == GATE_MODEL else None)
        if config.backend == "python":
            _copy_gate_package(out / config.name / "1")
    return out


def gate_config_path(repository: str | Path) -> Path:
    """The config.pbtxt that holds a repository's gate parameters: the last step of the ensemble `littlebig`."""
    path = Path(repository) / GATE_MODEL / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist: not a littlebig repository")
    config = read_config(path)
    if config.platform == "ensemble":
        path = Path(repository) / config.ensemble_scheduling.step[-1].model_name / "config.pbtxt"
        if not path.is_file():
            raise RepositoryError(f"{path} does not exist: the ensemble {GATE_MODEL} names a gate step the repository lacks")
    return path


def read_gate(repository: str | Path) -> tuple[Path, mc.ModelConfig, GateConfig]:
    """The gate's config file, its config and its parameters."""
    path = gate_config_path(repository)
    config = read_config(path)
    try:
        return path, config, GateConfig.from_parameters({key: value.string_value for key, value in config.parameters.items()})
    except ConfigError as err:
        raise RepositoryError(f"{path}: {err}") from None


def set_thresholds(repository: str | Path, thresholds: tuple[float, ...], gears: str | None = None,
                   audit_promise: float | None = None) -> mc.ModelConfig:
    """Write T_0 .. T_{K-2} (and, when given, the gears from T_0 down and the drop the audit checks) into the
    gate's config.pbtxt; without gears, a ladder that starts at another T is removed
    (GateConfig.with_thresholds). Returns the new config."""
    path, config, settings = read_gate(repository)
    if len(thresholds) != len(settings.stage_models) - 1:
        count = len(settings.stage_models)
        raise RepositoryError(f"{path} serves {count} stages ({', '.join(settings.stage_models)}): give {count - 1} "
                              f"thresholds, got {len(thresholds)}")
    try:
        settings = settings.with_thresholds(thresholds, parse_ladder(gears) if gears else None)
        if audit_promise is not None:
            settings = dataclasses.replace(settings, audit_promise=float(audit_promise))
    except ConfigError as err:
        raise RepositoryError(str(err)) from None
    config.ClearField("parameters")
    _parameters(config, settings.parameters())
    path.write_text(config_text(config))
    return config


def set_threshold(repository: str | Path, threshold: float, gears: str | None = None) -> mc.ModelConfig:
    """A two-stage gate's T (set_thresholds)."""
    return set_thresholds(repository, (threshold,), gears)


def write_thresholds(repository: str | Path, thresholds: tuple[float, ...], gears: str | None = None,
                     audit_promise: float | None = None) -> Path:
    """set_thresholds, returning the file written (what `calibrate --apply --repo` and `threshold --repo` need)."""
    set_thresholds(repository, thresholds, gears, audit_promise)
    return gate_config_path(repository)


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
