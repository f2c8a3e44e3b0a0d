"""The littlebig.* metadata an exported ONNX file carries (wire size, classes, MACs, labels, ...).
Only onnx is needed to read it: building a repository does not import torch."""

from __future__ import annotations

from pathlib import Path

import onnx

METADATA_PREFIX = "littlebig."


def output_names(path: str | Path) -> list[str]:
    """The graph's output names (files exported before the in-graph top-1 have only PROBS)."""
    model = onnx.load(str(path), load_external_data=False)
    return [output.name for output in model.graph.output]


def graph_inputs(path: str | Path) -> list[tuple[str, int, list[int | None]]]:
    """(name, ONNX element type, dims with None for a symbolic dim) of each graph input that is not
    an initializer."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        found.append((value.name, tensor.elem_type, dims))
    return found


def graph_outputs(path: str | Path) -> list[tuple[str, int, list[int | None]]]:
    """(name, ONNX element type, dims with None for a symbolic dim) of each graph output."""
    model = onnx.load(str(path), load_external_data=False)
    found = []
    for value in model.graph.output:
        tensor = value.type.tensor_type
        found.append((value.name, tensor.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]))
    return found


def read_metadata(path: str | Path) -> dict[str, str]:
    """The littlebig.* metadata of an exported file (without the prefix)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(METADATA_PREFIX): p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)
    }


def torchscript_path(onnx_path: str | Path) -> Path:
    """Where the TorchScript twin of a serving ONNX file lies (`export --torchscript`; the torch runtime)."""
    return Path(onnx_path).with_suffix(".pt")
