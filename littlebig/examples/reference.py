"""The cascade computed offline (numpy + onnxruntime, no server) on the examples' models: what the
served gate must answer row by row, and the metrics the results report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from littlebig.contract import PROBS
from littlebig.export.onnx_export import ort_session
from littlebig.gate.signals import signal as gating_signal
from littlebig.errors import UserError

from .data import TensorSet


def stage_probs(paths: list[Path], data: TensorSet, batch_size: int = 256) -> list[np.ndarray]:
    """Each stage's PROBS on every row, with onnxruntime."""
    out = []
    for path in paths:
        session = ort_session(path)
        chunks = [
            session.run([PROBS], {name: array[start : start + batch_size] for name, array in data.inputs.items()})[0]
            for start in range(0, len(data), batch_size)
        ]
        out.append(np.concatenate(chunks))
    return out


@dataclasses.dataclass
class CascadeAnswers:
    probs: np.ndarray  # the answering stage's PROBS per row
    confidence: np.ndarray  # its gating signal (float64)
    route: np.ndarray  # int32 index of the answering stage

    def decisions(self, task: str) -> np.ndarray:
        """Classes int64 [N] (multiclass) or multi-hot LABELS int32 [N, C] at p >= 0.5 (multilabel)."""
        return (self.probs >= 0.5).astype(np.int32) if task == "multilabel" else self.probs.argmax(1)


def cascade(probs: list[np.ndarray], thresholds: list[float], signal: str) -> CascadeAnswers:
    """Stage k answers the rows still open where its signal >= T_k; the last stage answers the rest."""
    if len(thresholds) != len(probs) - 1:
        raise UserError(f"{len(probs)} stages need {len(probs) - 1} thresholds, got {len(thresholds)}")
    rows = len(probs[0])
    route = np.full(rows, len(probs) - 1, dtype=np.int32)
    open_rows = np.ones(rows, dtype=bool)
    for k, threshold in enumerate(thresholds):
        sure = open_rows & (gating_signal(signal, probs[k]) >= threshold)
        route[sure] = k
        open_rows &= ~sure
    answer = np.stack(probs)[route, np.arange(rows)]
    confidence = np.choose(route, [gating_signal(signal, p) for p in probs])
    return CascadeAnswers(answer, confidence, route)


def micro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Micro-averaged F1 of multi-hot predictions against multi-hot labels."""
    tp = float(np.sum((predicted == 1) & (labels == 1)))
    fp = float(np.sum((predicted == 1) & (labels == 0)))
    fn = float(np.sum((predicted == 0) & (labels == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def metric(task: str, decisions: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy (multiclass) or micro-F1 (multilabel)."""
    return micro_f1(decisions, labels) if task == "multilabel" else float(np.mean(decisions == labels))


def expected_macs(route: np.ndarray, macs: list[int]) -> float:
    """Mean MACs per row: a row answered by stage k paid for stages 0..k (paper Eq. 5/7)."""
    paid = np.cumsum(np.asarray(macs, dtype=np.float64))
    return float(paid[route].mean())
