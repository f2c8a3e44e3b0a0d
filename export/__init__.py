"""Export torch classifiers to serving ONNX graphs (preprocessing and softmax inside, dynamic batch).

Names are imported on first use, so reading an exported file's metadata (the repository builder)
does not import torch.
"""

import importlib

_WHERE = {
    "count_macs": ".macs",
    "INPUT_NAME": ".onnx_export",
    "OUTPUT_NAME": ".onnx_export",
    "ExportResult": ".onnx_export",
    "ServingWrapper": ".onnx_export",
    "export_onnx": ".onnx_export",
    "ort_session": ".onnx_export",
    "read_metadata": ".metadata",
    "export_segmentation": ".segmentation",
    "ExportError": ".specs",
    "LoadedModel": ".specs",
    "ModelInfo": ".specs",
    "load_model": ".specs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
