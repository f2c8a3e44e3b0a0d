"""Segmentation on the client side: label masks (PNG files of class indices), data sets of images with
their masks, the per-image counts mIoU and pixel accuracy are made of, and the image-level confidences
over regions (the graph's grid, SLIC superpixels) that calibration compares.

Layout of a labelled set: DIR/images/<name>.<ext> and DIR/masks/<name>.png (single-channel class
indices, 255 = ignore, as Pascal VOC); a folder of images alone is an unlabelled set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from littlebig.errors import UserError

from .images import IMAGE_SUFFIXES, list_images, wire_geometry

IGNORE = 255  # label pixels with this value count nowhere (Pascal VOC's boundary convention)
IMAGE_FOLDER, MASK_FOLDER = "images", "masks"
AGGREGATES = ("mean", "min")  # over regions, as export/segmentation.py
SLIC_SEGMENTS = 100  # skimage.segmentation.slic's default number of superpixels


def palette() -> list[int]:
    """Pascal VOC's colour map (class i -> RGB from the bits of i), so a mask PNG is viewable as it is."""
    colours = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours += [r, g, b]
    return colours


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """A class-index mask as a palette PNG (16-bit greyscale beyond 256 classes)."""
    if mask.ndim != 2 or mask.min() < 0:
        raise UserError(f"a mask is a 2-D array of class indices >= 0, got shape {mask.shape}")
    if mask.max() < 256:
        image = Image.fromarray(mask.astype(np.uint8), mode="P")
        image.putpalette(palette())
    else:
        image = Image.fromarray(mask.astype(np.uint16))
    image.save(path)


def read_mask(path: str | Path) -> np.ndarray:
    """A label mask PNG as a 2-D integer array of class indices."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise UserError(f"mask {path} is a {image.mode} image; a mask holds one class index per pixel "
                                "(palette or greyscale PNG)")
            return np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read mask {path}: {err}") from None


def mask_to_wire(mask: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """A mask through the geometry its image takes to the wire (nearest neighbour: classes stay classes)."""
    image = Image.fromarray(mask.astype(np.int32), mode="I")
    return np.asarray(wire_geometry(image, size, crop_pct, Image.NEAREST)).astype(np.int64)


@dataclasses.dataclass
class SegmentationSet:
    paths: list[Path]
    masks: list[Path] | None  # None: unlabelled
    layout: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return self.masks is not None


def load_segmentation_set(folder: str | Path) -> SegmentationSet:
    """DIR/images with DIR/masks (one <name>.png per image), or a folder of images without masks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    images, masks = folder / IMAGE_FOLDER, folder / MASK_FOLDER
    if not images.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"no images in {folder}: a segmentation set is {folder}/{IMAGE_FOLDER}/ with "
                            f"{folder}/{MASK_FOLDER}/<name>.png label masks (or a folder of images, unlabelled)")
        return SegmentationSet(paths, None, "images, unlabelled")
    paths = list_images(images)
    if not paths:
        raise UserError(f"no images under {images}")
    if not masks.is_dir():
        return SegmentationSet(paths, None, f"{IMAGE_FOLDER}/, unlabelled (no {MASK_FOLDER}/)")
    mask_paths = [masks / f"{p.relative_to(images).with_suffix('')}.png" for p in paths]
    missing = [str(m) for m in mask_paths if not m.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) have no label mask, e.g. {missing[0]}: every image of {images} needs "
                        f"{masks}/<name>.png")
    return SegmentationSet(paths, mask_paths, f"{IMAGE_FOLDER}/ + {MASK_FOLDER}/")


def wire_labels(paths: list[Path], size: int, crop_pct: float, classes: int) -> np.ndarray:
    """The masks of ``paths`` at the wire size, checked against the model's ``classes``."""
    labels = np.stack([mask_to_wire(read_mask(p), size, crop_pct) for p in paths])
    bad = (labels >= classes) & (labels != IGNORE)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=(1, 2)))[0])
        raise UserError(f"mask {paths[row]} holds class {int(labels[row][bad[row]][0])}, the model has {classes} classes "
                        f"(0..{classes - 1}; {IGNORE} = ignore)")
    return labels


@dataclasses.dataclass
class PixelCounts:
    """Per image: each class's intersection and union of prediction and label (mIoU is made of their sums
    over images), the correctly labelled pixels and the labelled ones (pixel accuracy)."""

    inter: np.ndarray  # int64 [N, C]
    union: np.ndarray  # int64 [N, C]
    correct: np.ndarray  # int64 [N]
    labelled: np.ndarray  # int64 [N]


def pixel_counts(predicted: np.ndarray, labels: np.ndarray, classes: int) -> PixelCounts:
    """Counts of masks ``predicted`` [N, H, W] against ``labels`` [N, H, W] (IGNORE pixels left out)."""
    n = len(predicted)
    inter, union = np.zeros((n, classes), np.int64), np.zeros((n, classes), np.int64)
    correct, labelled = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i in range(n):
        valid = labels[i] != IGNORE
        truth, guess = labels[i][valid].astype(np.int64), predicted[i][valid].astype(np.int64)
        confusion = np.bincount(truth * classes + guess, minlength=classes * classes).reshape(classes, classes)
        inter[i] = np.diag(confusion)
        union[i] = confusion.sum(0) + confusion.sum(1) - inter[i]
        correct[i], labelled[i] = inter[i].sum(), valid.sum()
    return PixelCounts(inter, union, correct, labelled)


def mean_iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Mean over the classes present (union > 0) of intersection / union; the last axis is the classes."""
    present = union > 0
    ratio = np.divide(inter, union, out=np.zeros(np.shape(inter), dtype=np.float64), where=present)
    return ratio.sum(-1) / np.maximum(present.sum(-1), 1)


def grid_side(size: int, regions: int = 8) -> int:
    """The largest grid side <= ``regions`` that divides the wire size (cells of equal size)."""
    return max(g for g in range(1, regions + 1) if size % g == 0)


def grid_confidence(pixel: np.ndarray, regions: int, aggregate: str) -> np.ndarray:
    """[N, S, S] max-softmax -> [N]: each of G x G equal cells' mean, then their mean or min (the graph's rule)."""
    n, side = pixel.shape[0], pixel.shape[-1]
    cell = side // regions
    means = pixel.astype(np.float32).reshape(n, regions, cell, regions, cell).mean(axis=(2, 4)).reshape(n, -1)
    return (means.mean(1) if aggregate == "mean" else means.min(1)).astype(np.float64)


def slic_confidence(images: np.ndarray, pixel: np.ndarray, segments: int = SLIC_SEGMENTS) -> dict[str, np.ndarray]:
    """The paper's confidence: SLIC superpixels of each wire image [N, S, S, 3], each superpixel's mean
    max-softmax over its pixels, then their mean (and, beside it, their min) over the superpixels."""
    from skimage.segmentation import slic

    out = {aggregate: np.empty(len(images)) for aggregate in AGGREGATES}
    for i, (image, values) in enumerate(zip(images, pixel)):
        regions = slic(image, n_segments=segments, compactness=10.0, start_label=0).ravel()
        sizes = np.bincount(regions)
        means = np.bincount(regions, weights=values.ravel().astype(np.float64))[sizes > 0] / sizes[sizes > 0]
        out["mean"][i], out["min"][i] = means.mean(), means.min()
    return out


def region_signals(images: np.ndarray, pixel: np.ndarray) -> dict[str, np.ndarray]:
    """Every image-level confidence calibration compares, from little's per-pixel max softmax."""
    side = grid_side(pixel.shape[-1])
    signals = {f"grid{side}_{a}": grid_confidence(pixel, side, a) for a in AGGREGATES}
    return signals | {f"slic_{a}": values for a, values in slic_confidence(images, pixel).items()}
