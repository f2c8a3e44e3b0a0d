"""Multi-label example: scikit-learn's 8x8 handwritten digits (1797 real scans, UCI), each image
labelled with binary attributes of its true digit. Input FEATURES float32 [64] (pixel ink 0..16)."""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from littlebig.labels import ClassLabels

from .data import ExampleError, TensorSet, split_rows

INPUT = "FEATURES"
# Attribute -> the digits that have it. "closed_loop": the digit's usual glyph encloses an area.
ATTRIBUTES = {
    "even": (0, 2, 4, 6, 8),
    "prime": (2, 3, 5, 7),
    "at_least_5": (5, 6, 7, 8, 9),
    "closed_loop": (0, 6, 8, 9),
    "multiple_of_3": (0, 3, 6, 9),
    "fibonacci": (0, 1, 2, 3, 5, 8),
}
LABELS = ClassLabels(tuple(ATTRIBUTES))


def attribute_matrix() -> np.ndarray:
    """int64 [10, A]: row d is the multi-hot label of digit d."""
    table = np.zeros((10, len(ATTRIBUTES)), dtype=np.int64)
    for column, digits in enumerate(ATTRIBUTES.values()):
        table[list(digits), column] = 1
    return table


def load_digits_set() -> tuple[TensorSet, np.ndarray]:
    """All 1797 digits as a TensorSet with multi-hot labels, and the true digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ExampleError("the digits example needs scikit-learn (pip install scikit-learn)") from err
    digits = load_digits()
    features = digits.data.astype(np.float32)
    return TensorSet({INPUT: features}, attribute_matrix()[digits.target]), digits.target.astype(np.int64)


def splits(seed: int = 0) -> dict[str, TensorSet]:
    data, _ = load_digits_set()
    train, calib, test = split_rows([f"{i:05d}" for i in range(len(data))], (0.5, 0.25), seed)
    return {"train": data.take(train), "calib": data.take(calib), "test": data.take(test)}


class DigitsMLP(nn.Module):
    """Pixels / 16 -> hidden layers -> one logit per attribute."""

    def __init__(self, hidden: tuple[int, ...], outputs: int = len(ATTRIBUTES)):
        super().__init__()
        layers, width = [], 64
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, outputs))

    def forward(self, features):
        return self.net(features / 16.0)


# little: one narrow hidden layer; big: two wide ones (about 75x the MACs).
SIZES = {"little": (16,), "big": (256, 256)}
EPOCHS = {"little": 150, "big": 60}
