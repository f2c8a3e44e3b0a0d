"""An example pair through the real server: its repository, its rows sent to the gate or to each stage
model, and the row-by-row comparison with the offline cascade (reference.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from littlebig.contract import BIG_MODEL, CLASS, CONFIDENCE, GATE_MODEL, LABELS, LITTLE_MODEL, PROBS, ROUTE

from .data import TensorSet
from .reference import CascadeAnswers

TRITON_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8"}


def build_example_repository(folder: str | Path, out: str | Path, threshold: float, signal: str | None = None, **options) -> Path:
    """A repository serving ``folder``'s little.onnx and big.onnx behind the gate at ``threshold``."""
    import dataclasses

    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.options import RepositoryOptions

    folder = Path(folder)
    settings = dataclasses.replace(RepositoryOptions(), threshold=threshold, signal=signal, **options)
    return build_repository(folder / "little.onnx", folder / "big.onnx", out, settings)


def _infer_rows(url: str, data: TensorSet, model: str, outputs: list[str], batch_size: int,
                parameters: dict | None = None) -> dict[str, np.ndarray]:
    """Every row of ``data`` through the served ``model`` over gRPC, in batches; the outputs concatenated."""
    import tritonclient.grpc as grpcclient

    answers = {name: [] for name in outputs}
    with grpcclient.InferenceServerClient(url) as client:
        for start in range(0, len(data), batch_size):
            tensors = []
            for name, array in data.inputs.items():
                chunk = np.ascontiguousarray(array[start : start + batch_size])
                tensor = grpcclient.InferInput(name, list(chunk.shape), TRITON_TYPES[chunk.dtype])
                tensor.set_data_from_numpy(chunk)
                tensors.append(tensor)
            result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                                  parameters=parameters)
            for name in outputs:
                answers[name].append(result.as_numpy(name))
    return {name: np.concatenate(parts) for name, parts in answers.items()}


def served_answers(url: str, data: TensorSet, task: str, *, gate: str = GATE_MODEL, batch_size: int = 64,
                   parameters: dict | None = None) -> dict[str, np.ndarray]:
    """Every row of ``data`` through the gate; its LABELS or CLASS, CONFIDENCE, ROUTE and PROBS."""
    outputs = [LABELS if task == "multilabel" else CLASS, CONFIDENCE, ROUTE, PROBS]
    return _infer_rows(url, data, gate, outputs, batch_size, parameters)


def served_stage_probs(url: str, data: TensorSet, models: tuple[str, ...] = (LITTLE_MODEL, BIG_MODEL), *,
                       batch_size: int = 64) -> list[np.ndarray]:
    """Each served stage model's PROBS on every row, asking the models directly (not the gate: calibration
    needs every stage's answer on every row, as client/collect.py does for images)."""
    return [_infer_rows(url, data, model, [PROBS], batch_size)[PROBS] for model in models]


def compare(served: dict[str, np.ndarray], expected: CascadeAnswers, task: str) -> dict:
    """Rows where the server and the offline cascade differ (routes, classes or labels), and the
    largest differences of CONFIDENCE and PROBS."""
    decisions = expected.decisions(task)
    got = served[LABELS] if task == "multilabel" else served[CLASS][:, 0]
    answer_differs = np.any(got != decisions, axis=1) if task == "multilabel" else got != decisions
    return {
        "rows": int(len(decisions)),
        "route_mismatches": int(np.sum(served[ROUTE][:, 0] != expected.route)),
        "answer_mismatches": int(np.sum(answer_differs)),
        "max_abs_confidence_diff": float(np.abs(served[CONFIDENCE][:, 0] - expected.confidence).max()),
        "max_abs_probs_diff": float(np.abs(served[PROBS] - expected.probs).max()),
        "routes": {int(k): int(v) for k, v in zip(*np.unique(served[ROUTE][:, 0], return_counts=True))},
    }
