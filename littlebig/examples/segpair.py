"""`littlebig example segmentation --out DIR`: generate the shapes data (shapes.py), train a little and a
big segmentation net, export both with the segmentation graph (MASK, region CONFIDENCE, ...), and write
the calibration and test sets as DIR/calib and DIR/test (images/ + masks/, the layout `littlebig
calibrate` reads). Also the offline cascade (onnxruntime, no server) the served gate must equal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from littlebig.client.segmentation import (
    IMAGE_FOLDER,
    MASK_FOLDER,
    mean_iou,
    pixel_counts,
    save_mask,
)
from littlebig.contract import CONFIDENCE, IMAGE, MASK, PIXEL_CONFIDENCE
from littlebig.export.onnx_export import ort_session
from littlebig.export.segmentation import export_segmentation
from littlebig.export.specs import LoadedModel, ModelInfo

from . import shapes
from .data import TensorSet
from .train import TrainOptions, train

ROLES = ("little", "big")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ROWS = {"train": 1600, "calib": 400, "test": 400}
EPOCHS = {"little": 12, "big": 12}


def write_split(folder: Path, images: np.ndarray, masks: np.ndarray) -> None:
    """DIR/images/<n>.png and DIR/masks/<n>.png."""
    from PIL import Image

    (folder / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    (folder / MASK_FOLDER).mkdir(parents=True, exist_ok=True)
    for index, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image).save(folder / IMAGE_FOLDER / f"{index:05d}.png")
        save_mask(folder / MASK_FOLDER / f"{index:05d}.png", mask)


def stage_outputs(path: Path, images: np.ndarray, batch_size: int = 64,
                  outputs: tuple[str, ...] = (MASK, CONFIDENCE, PIXEL_CONFIDENCE)) -> dict[str, np.ndarray]:
    """A segmentation graph's outputs (default MASK, CONFIDENCE and PIXEL_CONFIDENCE) on ``images``, with onnxruntime."""
    session, names = ort_session(path), list(outputs)
    chunks = [session.run(names, {IMAGE: images[start : start + batch_size]}) for start in range(0, len(images), batch_size)]
    return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}


@dataclasses.dataclass
class SegCascade:
    mask: np.ndarray  # the answering stage's MASK per image
    confidence: np.ndarray  # its CONFIDENCE
    route: np.ndarray  # 0 little, 1 big


def cascade(little: dict[str, np.ndarray], big: dict[str, np.ndarray], threshold: float) -> SegCascade:
    """Eq. 4 on whole images: little answers where its CONFIDENCE >= T (compared as float64, as the gate)."""
    route = (little[CONFIDENCE][:, 0].astype(np.float64) < threshold).astype(np.int32)
    escalated = route.astype(bool)
    return SegCascade(np.where(escalated[:, None, None], big[MASK], little[MASK]),
                      np.where(escalated, big[CONFIDENCE][:, 0], little[CONFIDENCE][:, 0]), route)


def scores(masks: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    counts = pixel_counts(masks, labels, len(shapes.LABELS))
    return {"miou": float(mean_iou(counts.inter.sum(0), counts.union.sum(0))),
            "pixel_accuracy": float(counts.correct.sum() / counts.labelled.sum())}


def _train_and_export(role: str, data: TensorSet, parity: np.ndarray, out: Path, seed: int, epochs: int, log) -> dict:
    torch.manual_seed(seed)
    net = shapes.SegNet(**shapes.SIZES[role])
    train(shapes.Preprocessed(net, MEAN, STD), data, "multiclass", TrainOptions(epochs, lr=3e-3, batch_size=32, seed=seed), role)
    info = ModelInfo(spec=f"example:shapes-{role}", resolution=shapes.WIRE, mean=MEAN, std=STD, num_classes=len(shapes.LABELS),
                     crop_pct=1.0, weights="trained-here", labels=shapes.LABELS, task="segmentation")
    result = export_segmentation(LoadedModel(net.eval(), info), out / f"{role}.onnx", wire_size=shapes.WIRE, parity_images=parity, log=log)
    return {"macs": result.macs, "epochs": epochs, "seed": seed}


def build_segmentation_pair(out: str | Path, seed: int = 0, epoch_scale: float = 1.0, rows: dict | None = None, log=print) -> dict:
    """Generate, train, export and write the example; returns (and writes) example.json's summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows or ROWS
    images, masks = shapes.make_set(sum(rows.values()), seed)
    splits, start = {}, 0
    for name, count in rows.items():
        splits[name] = (images[start : start + count], masks[start : start + count])
        start += count
    train_set = TensorSet({IMAGE: splits["train"][0]}, splits["train"][1].astype(np.int64))
    summary = {"example": "shapes-segmentation", "task": "segmentation", "labels": list(shapes.LABELS.names), "rows": rows,
               "source": "skimage.draw.random_shapes (the shapes' kinds label the pixels), noisy backgrounds, seeded",
               "models": {}, "metric": "miou"}
    for index, role in enumerate(ROLES):
        epochs = max(1, round(EPOCHS[role] * epoch_scale))
        summary["models"][role] = _train_and_export(role, train_set, splits["calib"][0][:8], out, seed + index, epochs, log)
        answers = stage_outputs(out / f"{role}.onnx", splits["test"][0])
        summary["models"][role] |= {f"test_{k}": v for k, v in scores(answers[MASK], splits["test"][1]).items()}
    for name in ("calib", "test"):
        write_split(out / name, *splits[name])
    (out / "labels.txt").write_text(shapes.LABELS.file_lines())
    (out / "example.json").write_text(json.dumps(summary, indent=2) + "\n")
    little, big = summary["models"]["little"], summary["models"]["big"]
    log(f"shapes: little {little['macs']:,} MACs mIoU {little['test_miou']:.4f}; big {big['macs']:,} MACs mIoU "
        f"{big['test_miou']:.4f} (test images {rows['test']})")
    return summary
