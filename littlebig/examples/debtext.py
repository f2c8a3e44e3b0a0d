"""Text example: Debian package short descriptions labelled by their archive section (libs, python,
perl, ...), read from this machine's package lists. Input INPUT_IDS int64 [L] and ATTENTION_MASK
int64 [L] from a word tokenizer built on the training split (its vocabulary travels in the ONNX
metadata, so a client can tokenize the same way)."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from littlebig.labels import ClassLabels

from .data import ExampleError, TensorSet, split_rows

INPUT_IDS, ATTENTION_MASK = "INPUT_IDS", "ATTENTION_MASK"
DPKG_STATUS = Path("/var/lib/dpkg/status")
WORD = re.compile(r"[a-z0-9]+")
PAD, UNK, CLS = 0, 1, 2
SPECIALS = ("[PAD]", "[UNK]", "[CLS]")


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    section: str
    description: str  # the one-line short description


def read_stanzas(text: str) -> list[Package]:
    """Packages (deb822 stanzas) with a Section and a Description; the area prefix ("contrib/") dropped."""
    packages = []
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Section|Description): *(.*)$", stanza, flags=re.MULTILINE))
        if {"Package", "Section", "Description"} <= fields.keys():
            packages.append(Package(fields["Package"], fields["Section"].rsplit("/", 1)[-1], fields["Description"].strip()))
    return packages


def package_text(source: str | Path | None = None) -> tuple[str, str]:
    """(deb822 text, where it came from): ``source`` if given, else `apt-cache dumpavail` (every
    package the apt lists know), else the installed packages of /var/lib/dpkg/status."""
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise ExampleError(f"package list {path} does not exist")
        return path.read_text(errors="replace"), str(path)
    if shutil.which("apt-cache"):
        done = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, errors="replace")
        if done.returncode == 0 and done.stdout.count("\nPackage: ") > 1000:
            return done.stdout, "apt-cache dumpavail"
    if DPKG_STATUS.is_file():
        return DPKG_STATUS.read_text(errors="replace"), str(DPKG_STATUS)
    raise ExampleError("no Debian package lists here (no apt-cache, no /var/lib/dpkg/status): the text example needs them")


def labelled_descriptions(packages: list[Package], sections: int, per_section: int) -> tuple[list[Package], ClassLabels]:
    """One row per distinct description (a text listed under two sections is dropped: its label is
    ambiguous), the ``sections`` most frequent sections, at most ``per_section`` rows each (chosen by a
    seeded shuffle of package names, so the same lists give the same rows)."""
    by_name = {p.name: p for p in sorted(packages, key=lambda p: p.name)}
    sections_of = collections.defaultdict(set)
    for p in by_name.values():
        sections_of[p.description.lower()].add(p.section)
    unique, seen = [], set()
    for p in by_name.values():
        key = p.description.lower()
        if len(sections_of[key]) == 1 and key not in seen:
            seen.add(key)
            unique.append(p)
    counts = collections.Counter(p.section for p in unique)
    chosen = sorted(s for s, _ in counts.most_common(sections))
    if len(chosen) < 2:
        raise ExampleError(f"the package lists hold {len(chosen)} section(s); the text example needs two or more")
    rows = []
    for section in chosen:
        members = [p for p in unique if p.section == section]
        keep = np.random.default_rng(0).permutation(len(members))[:per_section]
        rows += [members[i] for i in sorted(keep)]
    return rows, ClassLabels(tuple(chosen))


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Lower-case words ([a-z0-9]+) -> ids; [CLS] first, [PAD] after, [UNK] for unknown words."""

    vocab: tuple[str, ...]  # id -> word, SPECIALS first
    max_length: int

    @classmethod
    def fit(cls, texts: list[str], max_length: int, max_words: int = 4000, min_count: int = 2) -> "Tokenizer":
        counts = collections.Counter(word for text in texts for word in WORD.findall(text.lower()))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))[:max_words]
        return cls(SPECIALS + tuple(words), max_length)

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        index = {word: i for i, word in enumerate(self.vocab)}
        ids = np.full((len(texts), self.max_length), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [CLS] + [index.get(w, UNK) for w in WORD.findall(text.lower())]
            tokens = tokens[: self.max_length]
            ids[row, : len(tokens)] = tokens
        return {INPUT_IDS: ids, ATTENTION_MASK: (ids != PAD).astype(np.int64)}

    def to_json(self) -> str:
        return json.dumps({"kind": "words", "pattern": WORD.pattern, "lowercase": True, "max_length": self.max_length,
                           "pad": PAD, "unk": UNK, "cls": CLS, "vocab": list(self.vocab)})

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        data = json.loads(text)
        return cls(tuple(data["vocab"]), int(data["max_length"]))


@dataclasses.dataclass
class TextSplits:
    sets: dict[str, TensorSet]  # train, calib, test
    texts: dict[str, list[str]]
    labels: ClassLabels
    tokenizer: Tokenizer
    source: str


def splits(source=None, sections: int = 6, per_section: int = 2500, max_length: int = 16, seed: int = 0) -> TextSplits:
    text, where = package_text(source)
    rows, labels = labelled_descriptions(read_stanzas(text), sections, per_section)
    index = {name: i for i, name in enumerate(labels.names)}
    parts = split_rows([p.name for p in rows], (0.6, 0.2), seed)
    texts = {name: [rows[i].description for i in part] for name, part in zip(("train", "calib", "test"), parts)}
    tokenizer = Tokenizer.fit(texts["train"], max_length)
    sets = {}
    for name, part in zip(("train", "calib", "test"), parts):
        classes = np.array([index[rows[i].section] for i in part], dtype=np.int64)
        sets[name] = TensorSet(tokenizer.encode(texts[name]), classes)
    return TextSplits(sets, texts, labels, tokenizer, where)


class TextEncoder(nn.Module):
    """Token + position embeddings, a TransformerEncoder, mean over the attended tokens, a linear head.
    Position 0 ([CLS]) is always attended, so a row whose mask is all zeros still has a defined answer."""

    def __init__(self, vocab: int, classes: int, max_length: int, width: int, layers: int, heads: int, ff: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(1, max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        first = torch.arange(input_ids.shape[1], device=input_ids.device).eq(0).unsqueeze(0)
        keep = attention_mask.ne(0) | first
        x = self.encoder(self.tokens(input_ids) + self.positions, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(x.dtype)
        return self.head((x * weights).sum(1) / weights.sum(1))


# little: one narrow layer; big: three layers four times as wide (about 44x the MACs).
SIZES = {
    "little": {"width": 32, "layers": 1, "heads": 2, "ff": 64},
    "big": {"width": 128, "layers": 3, "heads": 4, "ff": 256},
}
EPOCHS = {"little": 6, "big": 6}
