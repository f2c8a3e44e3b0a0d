"""Export torch classifiers to serving ONNX graphs (preprocessing and softmax inside, dynamic batch)."""

from .macs import count_macs
from .onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportResult,
    ServingWrapper,
    export_onnx,
    ort_session,
    read_metadata,
)
from .specs import ExportError, LoadedModel, ModelInfo, load_model

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "ExportResult",
    "LoadedModel",
    "ModelInfo",
    "ServingWrapper",
    "count_macs",
    "export_onnx",
    "load_model",
    "ort_session",
    "read_metadata",
]
