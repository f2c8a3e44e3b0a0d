"""Labelled (or unlabelled) image sets for calibration and benchmarks.

Layouts:
  ImageFolder    DIR/<class>/<image>: class index = position of <class> in the sorted subfolders,
                 or in --classes if given (one name per line)
  CSV            DIR plus a CSV of file,label (label: an index, or a name from --classes)
  wnid files     DIR/<wnid>_<anything>.JPEG plus a class list DIR/classes.tsv (index, wnid, name),
                 the layout of ImageNet samples
  unlabelled     DIR with images and none of the above (label-free calibration modes only)
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from .images import IMAGE_SUFFIXES, list_images


@dataclasses.dataclass
class ImageSet:
    paths: list[Path]
    labels: np.ndarray | None  # int64 [N], None when unlabelled
    layout: str

    def __len__(self) -> int:
        return len(self.paths)


def _read_class_list(path: Path) -> list[str]:
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".tsv" and lines and lines[0].split("\t")[0] == "index":
        return [line.split("\t")[1] for line in lines[1:]]  # index, wnid, name
    return [line.strip() for line in lines]


def _label_of(value: str, classes: list[str] | None, where: str) -> int:
    value = value.strip()
    if classes is not None and value in classes:
        return classes.index(value)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"label {value!r} ({where}) is neither an index nor a known class name") from None


def load_image_set(folder: str | Path, *, labels_csv: str | Path | None = None, classes: str | Path | None = None) -> ImageSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    class_names = _read_class_list(Path(classes)) if classes else None

    if labels_csv is not None:
        paths, labels = [], []
        with open(labels_csv, newline="") as handle:
            for row_number, row in enumerate(csv.reader(handle), start=1):
                if not row or (row_number == 1 and row[0].strip().lower() in {"file", "filename", "path"}):
                    continue
                if len(row) < 2:
                    raise ValueError(f"{labels_csv} line {row_number}: expected file,label")
                path = folder / row[0].strip()
                if not path.is_file():
                    raise FileNotFoundError(f"{labels_csv} line {row_number}: {path} does not exist")
                paths.append(path)
                labels.append(_label_of(row[1], class_names, f"{labels_csv} line {row_number}"))
        return ImageSet(paths, np.asarray(labels, dtype=np.int64), "csv")

    class_list = folder / "classes.tsv"
    if class_names is None and class_list.is_file():
        class_names = _read_class_list(class_list)
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    if subfolders:
        names = class_names or [p.name for p in subfolders]
        paths, labels = [], []
        for sub in subfolders:
            if sub.name not in names:
                raise ValueError(f"class folder {sub.name!r} is not in the class list")
            for path in list_images(sub):
                paths.append(path)
                labels.append(names.index(sub.name))
        return ImageSet(paths, np.asarray(labels, dtype=np.int64), "imagefolder")

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images found in {folder}")
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        labels = []
        for path in paths:
            wnid = path.name.split("_")[0]
            if wnid not in index:
                raise ValueError(f"{path.name}: {wnid!r} is not in the class list")
            labels.append(index[wnid])
        return ImageSet(paths, np.asarray(labels, dtype=np.int64), "wnid")
    return ImageSet(paths, None, "unlabelled")
