"""Class labels that travel with a model: written into the ONNX file by `littlebig export`, into the
repository (Triton label files, the gate's `labels` parameter) by `littlebig repo`, and read back by
the client from the served gate. Calibration maps a data set's label strings through them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from littlebig.errors import UserError


class LabelError(UserError):
    """A label that does not name one of the model's classes, or a label file that does not fit."""


def _normal(text: str) -> str:
    return " ".join(text.replace("_", " ").lower().split())


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """One name per class in index order, and optionally a short id per class (ImageNet wnids)."""

    names: tuple[str, ...]
    ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.ids is not None and len(self.ids) != len(self.names):
            raise LabelError(f"{len(self.ids)} class ids for {len(self.names)} class names")

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "ids": None if self.ids is None else list(self.ids)})

    @classmethod
    def from_json(cls, text: str) -> "ClassLabels":
        data = json.loads(text)
        return cls(tuple(data["names"]), None if data.get("ids") is None else tuple(data["ids"]))

    @classmethod
    def from_file(cls, path: str | Path) -> "ClassLabels":
        """One class per line in index order: ``name``, or ``id<TAB>name``; a classes.tsv with an
        ``index<TAB>id<TAB>name`` header is read too."""
        path = Path(path)
        if not path.is_file():
            raise LabelError(f"label file {path} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise LabelError(f"label file {path} is empty")
        rows = [line.split("\t") for line in lines]
        if rows[0][0].strip().lower() == "index" and len(rows[0]) >= 3:
            short = [number for number, r in enumerate(rows[1:], start=2) if len(r) < 3]
            if short:
                raise LabelError(f"label file {path} line {short[0]}: expected index<TAB>id<TAB>name, like its header")
            return cls(tuple(r[2].strip() for r in rows[1:]), tuple(r[1].strip() for r in rows[1:]))
        if all(len(r) == 2 for r in rows):
            return cls(tuple(r[1].strip() for r in rows), tuple(r[0].strip() for r in rows))
        return cls(tuple(line.strip() for line in lines))

    def file_lines(self) -> str:
        """A Triton label file: one label per line, in class order (`class_count` answers score:index:label)."""
        return "".join(name.replace("\n", " ") + "\n" for name in self.names)

    def _matches(self, value: str) -> list[int]:
        if self.ids is not None and value in self.ids:
            return [i for i, x in enumerate(self.ids) if x == value]
        wanted = _normal(value)
        found = []
        for i, name in enumerate(self.names):
            # ImageNet descriptions list synonyms: "tench, Tinca tinca" is matched by "tench" too.
            if wanted == _normal(name) or wanted in (_normal(part) for part in name.split(",")):
                found.append(i)
        return found

    def index_of(self, value: str, where: str) -> int:
        """The class index a data set's label names: an id, a name (case, spaces and underscores
        ignored), or an index. Anything else is an error that names it."""
        value = value.strip()
        found = self._matches(value)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise LabelError(
                f"label {value!r} ({where}) names several of the model's classes ({', '.join(map(str, found))}); "
                "use the class id or index instead"
            )
        if value.isdigit() and int(value) < len(self):
            return int(value)
        examples = ", ".join(repr(x) for x in (self.ids or self.names)[:3])
        raise LabelError(
            f"label {value!r} ({where}) is not one of the model's {len(self)} classes (they look like {examples}, ...); "
            "rename it, or map it with --classes / --labels-csv"
        )


def imagenet_labels() -> ClassLabels:
    """ImageNet-1k: wnids and names in index order, from the class info that timm ships."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return ClassLabels(
        names=tuple(info.index_to_description(i) for i in range(1000)),
        ids=tuple(info.index_to_label_name(i) for i in range(1000)),
    )


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order."""
    return list(imagenet_labels().names)


def load_labels(path: str | Path | None, num_classes: int, served: ClassLabels | None = None) -> list[str]:
    """Names to print: a label file (one per line, in class order), else the served model's own labels,
    else ImageNet names for 1000 classes (where timm, of the export extra, is installed), else indices."""
    if path is not None:
        names = list(ClassLabels.from_file(path).names)
        if len(names) != num_classes:
            raise LabelError(f"label file {path} has {len(names)} labels, the model has {num_classes} classes")
        return names
    if served is not None:
        return list(served.names)
    if num_classes == 1000:
        try:
            return imagenet_names()
        except ImportError:  # a light install: the served labels are the usual source anyway
            pass
    return [str(i) for i in range(num_classes)]
