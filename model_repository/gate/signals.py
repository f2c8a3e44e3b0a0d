"""Gating signals: how sure a stage is of its answer on each row, in [0, 1] (paper Eq. 4, Appendix A.1.2).

Stage k answers a row when its signal >= T_k; the last stage answers the rest. All take probabilities
[N, C] and return float64 [N]. The gate and the littlebig package use these same functions.
"""

import numpy as np

# Signals for softmax (multi-class) outputs, and for sigmoid (multi-label) outputs.
MULTICLASS_SIGNALS = ("max_softmax", "margin", "entropy")
MULTILABEL_SIGNALS = ("mean_abs_margin",)
SIGNALS = MULTICLASS_SIGNALS + MULTILABEL_SIGNALS
# Segmentation: the stage's graph computes the image-level confidence (CONFIDENCE) from the pixels' max
# softmax over regions (export/segmentation.py); the gate reads it as it is.
SEGMENTATION_SIGNALS = ("region_confidence",)
SIGNALS_OF_TASK = {"multiclass": MULTICLASS_SIGNALS, "multilabel": MULTILABEL_SIGNALS, "segmentation": SEGMENTATION_SIGNALS}
DEFAULT_SIGNAL = {"multiclass": "max_softmax", "multilabel": "mean_abs_margin", "segmentation": "region_confidence"}


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


FORMULAS = {"max_softmax": max_softmax, "margin": margin, "entropy": entropy, "mean_abs_margin": mean_abs_margin}


def signal(name: str, probs: np.ndarray) -> np.ndarray:
    """The signal ``name`` of each row of ``probs``."""
    if name not in FORMULAS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {name!r}")
    return FORMULAS[name](probs)
