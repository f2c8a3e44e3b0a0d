"""What the builder needs to know of an exported ONNX file, read from its graph and its littlebig
metadata (no torch), and whether two files can be stages of one cascade."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from onnx import TensorProto
from tritonclient.grpc import model_config_pb2 as mc

from littlebig.contract import BIG_MODEL, CLASS, CONFIDENCE, LITTLE_MODEL, MASK, TASKS
from littlebig.errors import UserError
from littlebig.export.metadata import graph_inputs, graph_outputs, output_names, read_metadata
from littlebig.labels import ClassLabels


class RepositoryError(UserError):
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


def read_outputs(path: Path) -> tuple[InputFacts, ...]:
    """The graph outputs of a segmentation file, with their fixed dims (MASK [S, S], PROBS [C, S, S], ...)."""
    outputs = []
    for name, elem_type, dims in graph_outputs(path):
        if elem_type not in ONNX_TO_TRITON or any(d is None for d in dims[1:]):
            raise RepositoryError(f"{path}: output {name!r} ({dims}) is not a fixed-size tensor; export it with "
                                  "`littlebig export`")
        outputs.append(InputFacts(name, ONNX_TO_TRITON[elem_type], tuple(int(d) for d in dims[1:])))
    return tuple(outputs)


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
    task: str = "multiclass"  # or multilabel: PROBS are sigmoid probabilities, no in-graph top-1; or segmentation
    frames: int = 0  # video models: frames per clip of the VIDEO [F, S, S, 3] input; 0: others
    outputs: tuple[InputFacts, ...] = ()  # segmentation: the graph's outputs (MASK, CONFIDENCE, ...) as declared

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
        outputs = ()
        if task == "segmentation":
            outputs = read_outputs(path)
            top1 = {MASK, CONFIDENCE} <= {o.name for o in outputs}
            if not top1:
                raise RepositoryError(f"{path} is a segmentation model without MASK and CONFIDENCE outputs: export it "
                                      "with `littlebig export`")
        return cls(
            path, wire_size, int(meta["num_classes"]), int(meta["macs"]), float(meta.get("crop_pct", 0.875)),
            labels, top1, read_inputs(path), task, int(meta.get("frames", 0)), outputs,
        )

    def output_configs(self) -> list[mc.ModelOutput]:
        return [mc.ModelOutput(name=o.name, data_type=o.data_type, dims=list(o.dims)) for o in self.outputs]

    def input_configs(self) -> list[mc.ModelInput]:
        return [mc.ModelInput(name=i.name, data_type=i.data_type, dims=list(i.dims)) for i in self.inputs]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _takes(facts: ModelFacts) -> str:
    return f"clips of {facts.frames} frames" if facts.frames else "no clips (not a video model)"


def check_pair(little: ModelFacts, big: ModelFacts, roles: tuple[str, str] = (LITTLE_MODEL, BIG_MODEL)) -> None:
    """Two stages of one cascade must take the same inputs and answer the same classes and task;
    ``roles`` names them in the messages."""
    first, second = roles
    if little.frames != big.frames:
        raise RepositoryError(
            f"frames per clip differ: {first} {little.path} takes {_takes(little)}, {second} {big.path} takes "
            f"{_takes(big)}; a cascade's models take the same input: export video models with the same --frames"
        )
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
    if little.task == "segmentation" and little.outputs != big.outputs:
        raise RepositoryError(
            f"outputs differ: {first} {little.path} answers {', '.join(map(str, little.outputs))}; {second} {big.path} "
            f"answers {', '.join(map(str, big.outputs))}; export both at the same --wire-size"
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
