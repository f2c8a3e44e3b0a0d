"""Gating signals: how sure a stage is of its answer on each row, in [0, 1] (paper Eq. 4 and
Appendix A.1.2). Stage k answers a row when its signal >= T_k; the last stage answers the rest.

The gate (model_repository/littlebig/1/model.py) keeps its own copy of these formulas (it runs
unchanged in the NGC container); tests/test_contract.py checks the two agree numerically.
All return float64 [N] from probabilities [N, C].
"""

from __future__ import annotations

import numpy as np

# Signals for softmax (multi-class) outputs, and for sigmoid (multi-label) outputs.
MULTICLASS_SIGNALS = ("max_softmax", "margin", "entropy")
MULTILABEL_SIGNALS = ("mean_abs_margin",)
SIGNALS = MULTICLASS_SIGNALS + MULTILABEL_SIGNALS
DEFAULT_SIGNAL = {"multiclass": "max_softmax", "multilabel": "mean_abs_margin"}


def max_softmax(probs: np.ndarray) -> np.ndarray:
    """The top-1 probability."""
    return probs.max(axis=1).astype(np.float64)


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability."""
    top2 = np.partition(probs.astype(np.float64), -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs: np.ndarray) -> np.ndarray:
    """1 - H(p) / log C with H = -sum p log p (0 log 0 = 0): 1 for a one-hot row, 0 for uniform."""
    p = probs.astype(np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return 1.0 + plogp.sum(axis=1) / np.log(p.shape[1])


def mean_abs_margin(probs: np.ndarray) -> np.ndarray:
    """Mean over labels of |p - 0.5| (multi-label sigmoid outputs; range [0, 0.5])."""
    return np.abs(probs.astype(np.float64) - 0.5).mean(axis=1)


def signal(name: str, probs: np.ndarray) -> np.ndarray:
    """The signal ``name`` of each row of ``probs``."""
    if name not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {name!r}")
    return {"max_softmax": max_softmax, "margin": margin, "entropy": entropy, "mean_abs_margin": mean_abs_margin}[name](probs)
