"""Class names for printing predictions."""

from __future__ import annotations

from pathlib import Path


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, from the class info that timm ships."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def load_labels(path: str | Path | None, num_classes: int) -> list[str]:
    """Labels from a file (one per line, in class order), ImageNet names for 1000 classes, else indices."""
    if path is not None:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"label file {path} has {len(names)} labels, the model has {num_classes} classes")
        return names
    if num_classes == 1000:
        return imagenet_names()
    return [str(i) for i in range(num_classes)]
