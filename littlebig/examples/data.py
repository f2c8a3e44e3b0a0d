"""A labelled set of named input tensors (what a stage model takes, row by row) saved as one .npz."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from littlebig.errors import UserError

LABELS_KEY = "labels"


class ExampleError(UserError):
    """An example cannot be built (its source data is absent, a file does not fit)."""


@dataclasses.dataclass
class TensorSet:
    """``inputs``: input name -> array [N, ...] in the model's input order; ``labels``: int64 [N]
    class indices (multiclass) or multi-hot int64 [N, C] (multilabel)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    def __post_init__(self) -> None:
        rows = {name: len(array) for name, array in self.inputs.items()}
        if LABELS_KEY in rows:
            raise ExampleError(f"an input may not be called {LABELS_KEY!r}")
        if set(rows.values()) != {len(self.labels)}:
            raise ExampleError(f"inputs {rows} and {len(self.labels)} labels differ in rows")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows) -> "TensorSet":
        return TensorSet({name: array[rows] for name, array in self.inputs.items()}, self.labels[rows])

    def save(self, path: str | Path) -> None:
        # The input order is the order of the npz members (numpy keeps insertion order).
        np.savez_compressed(path, **self.inputs, **{LABELS_KEY: self.labels})

    @classmethod
    def load(cls, path: str | Path) -> "TensorSet":
        path = Path(path)
        if not path.is_file():
            raise ExampleError(f"data file {path} does not exist")
        with np.load(path) as data:
            if LABELS_KEY not in data.files:
                raise ExampleError(f"{path} has no {LABELS_KEY!r} array")
            return cls({name: data[name] for name in data.files if name != LABELS_KEY}, data[LABELS_KEY])


def split_rows(keys: list[str], fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / calibration / test row indices from a seeded permutation of ``keys`` (row order
    independent: rows are sorted by key first)."""
    order = np.argsort(np.asarray(keys), kind="stable")
    order = order[np.random.default_rng(seed).permutation(len(order))]
    n_train, n_calib = int(fractions[0] * len(order)), int(fractions[1] * len(order))
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_calib]), np.sort(order[n_train + n_calib :])
