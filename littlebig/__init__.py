"""littlebig: confidence-gated Little-Big classifier cascades on NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
