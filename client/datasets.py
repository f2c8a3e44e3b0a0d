"""Labelled (or unlabelled) image sets for calibration and benchmarks.

Layouts:
  ImageFolder    DIR/<class>/<image>
  CSV            DIR plus a CSV of file,label
  wnid files     DIR/<wnid>_<anything>.JPEG (the layout of ImageNet samples)
  unlabelled     DIR with images and none of the above (label-free calibration modes only)
Sets of video clips (``clips=True``; a clip is a .npy file or a folder of frames, client/clips.py) take
the same layouts with clips in place of images: DIR/<class>/<clip>, a CSV naming clips, DIR/<clip>.

Label strings (folder names, CSV labels, wnid prefixes) are mapped to class indices through a class
list: --classes if given, else the served model's own labels, else a classes.tsv beside the images.
Each label may be a class id (an ImageNet wnid), a class name or an index; one that names no class is
an error. Only with no class list at all do ImageFolder classes fall back to their sorted position
(torchvision's convention) and CSV labels have to be indices.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from littlebig.errors import UserError
from littlebig.labels import ClassLabels, LabelError

from .clips import CLIP_SUFFIX, is_frame_folder, list_clips
from .images import IMAGE_SUFFIXES, list_images


@dataclasses.dataclass
class ImageSet:
    paths: list[Path]  # images, or clips (.npy files, frame folders)
    labels: np.ndarray | None  # int64 [N], None when unlabelled
    layout: str
    mapping: str = ""  # how label strings became class indices, for messages
    clips: bool = False

    def __len__(self) -> int:
        return len(self.paths)


def _class_list(folder: Path, classes: str | Path | None, model_labels: ClassLabels | None) -> tuple[ClassLabels | None, str]:
    if classes is not None:
        return ClassLabels.from_file(classes), f"through --classes {classes}"
    if model_labels is not None:
        return model_labels, "through the model's own class labels"
    if (folder / "classes.tsv").is_file():
        return ClassLabels.from_file(folder / "classes.tsv"), f"through {folder / 'classes.tsv'}"
    return None, ""


def _from_csv(folder: Path, labels_csv: str | Path, class_list: ClassLabels | None, mapping: str, clips: bool) -> ImageSet:
    paths, labels = [], []
    with open(labels_csv, newline="") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
            if not row or (row_number == 1 and row[0].strip().lower() in {"file", "filename", "path"}):
                continue
            where = f"{labels_csv} line {row_number}"
            if len(row) < 2:
                raise UserError(f"{where}: expected file,label")
            path = folder / row[0].strip()
            if not (path.exists() if clips else path.is_file()):
                raise FileNotFoundError(f"{where}: {path} does not exist")
            paths.append(path)
            value = row[1].strip()
            if class_list is not None:
                labels.append(class_list.index_of(value, where))
            elif value.isdigit():
                labels.append(int(value))
            else:
                raise LabelError(f"label {value!r} ({where}) is not an index, and there is no class list to look it up: pass --classes")
    return ImageSet(paths, np.asarray(labels, dtype=np.int64), "csv", mapping or "as indices", clips)


def _from_subfolders(subfolders: list[Path], class_list: ClassLabels | None, mapping: str, clips: bool) -> ImageSet:
    paths, labels = [], []
    for position, sub in enumerate(subfolders):
        index = position if class_list is None else class_list.index_of(sub.name, f"folder {sub}")
        for path in list_clips(sub) if clips else list_images(sub):
            paths.append(path)
            labels.append(index)
    return ImageSet(paths, np.asarray(labels, dtype=np.int64), "imagefolder", mapping or "by sorted folder position (no class list)",
                    clips)


def _direct_items(folder: Path, clips: bool) -> tuple[list[Path], list[Path]]:
    """The class folders and the items (images, or clips) directly inside ``folder``."""
    if clips:
        items = sorted(p for p in folder.iterdir() if (p.is_file() and p.suffix.lower() == CLIP_SUFFIX) or is_frame_folder(p))
    else:
        items = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in folder.iterdir() if p.is_dir() and p not in items), items


def load_image_set(
    folder: str | Path,
    *,
    labels_csv: str | Path | None = None,
    classes: str | Path | None = None,
    model_labels: ClassLabels | None = None,
    clips: bool = False,
) -> ImageSet:
    """The labelled (or unlabelled) images under ``folder``, or its clips with ``clips``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    class_list, mapping = _class_list(folder, classes, model_labels)
    if labels_csv is not None:
        return _from_csv(folder, labels_csv, class_list, mapping, clips)
    subfolders, paths = _direct_items(folder, clips)
    items = "clips" if clips else "images"
    if subfolders and paths:
        raise UserError(f"{folder} has both class folders ({subfolders[0].name}, ...) and {len(paths)} {items} directly "
                         f"inside it ({paths[0].name}, ...), which belong to no class: move them into a class folder or away")
    if subfolders:
        return _from_subfolders(subfolders, class_list, mapping, clips)
    if not paths:
        raise UserError(f"no {items} found in {folder}" + (" (a clip is a .npy file or a folder of frames)" if clips else ""))
    prefixes = [path.name.split("_")[0] for path in paths]
    if classes is None and class_list is model_labels and class_list is not None:
        # Flat folders only count as labelled by the model's own ids when the names use them (any
        # file does); photos named freely stay unlabelled for the label-free modes.
        if class_list.ids is None or not set(prefixes) & set(class_list.ids):
            class_list = None
    if class_list is None:
        return ImageSet(paths, None, "unlabelled", clips=clips)
    labels = [class_list.index_of(prefix, f"file name prefix of {path.name}") for prefix, path in zip(prefixes, paths)]
    return ImageSet(paths, np.asarray(labels, dtype=np.int64), "wnid", mapping, clips)
