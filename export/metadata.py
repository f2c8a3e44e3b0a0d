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


def read_metadata(path: str | Path) -> dict[str, str]:
    """The littlebig.* metadata of an exported file (without the prefix)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(METADATA_PREFIX): p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)
    }
