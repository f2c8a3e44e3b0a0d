"""`littlebig example multilabel|text --out DIR`: build the data, train little and big, export both
(`segmentation`: segpair.py).

DIR gets little.onnx and big.onnx (with .json reports), calib.npz and test.npz (the model inputs by
name plus `labels`, see data.TensorSet), labels.txt, and example.json: the data source, sizes, MACs
and each model's test metric (accuracy, or micro-F1 for multi-label) computed with onnxruntime.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from littlebig.labels import ClassLabels
from littlebig.export.tensor_export import TensorModel, export_tensor_model

from . import debtext, digits
from .data import TensorSet
from .reference import metric, stage_probs
from .train import TrainOptions, train

ROLES = ("little", "big")
EXAMPLES = ("multilabel", "text", "segmentation")


@dataclasses.dataclass
class PairSpec:
    """What build_pair needs: the data, how to make and train each role's model, what to record."""

    name: str
    task: str
    sets: dict[str, TensorSet]  # train, calib, test
    labels: ClassLabels
    make: dict[str, callable]  # role -> () -> nn.Module
    options: dict[str, TrainOptions]
    source: str
    extra_metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def build_pair(spec: PairSpec, out: str | Path, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parity = spec.sets["calib"].take(slice(0, 32)).inputs
    summary = {"example": spec.name, "task": spec.task, "source": spec.source, "labels": list(spec.labels.names),
               "rows": {name: len(s) for name, s in spec.sets.items()}, "models": {}}
    for role in ROLES:
        torch.manual_seed(spec.options[role].seed)
        module: nn.Module = train(spec.make[role](), spec.sets["train"], spec.task, spec.options[role], role)
        model = TensorModel(module, tuple(parity), spec.task, spec.labels, f"example:{spec.name}-{role}", spec.extra_metadata)
        meta = export_tensor_model(model, out / f"{role}.onnx", parity, log=log)
        probs = stage_probs([out / f"{role}.onnx"], spec.sets["test"])[0]
        decisions = (probs >= 0.5).astype("int64") if spec.task == "multilabel" else probs.argmax(1)
        summary["models"][role] = {"macs": int(meta["macs"]), "test_metric": metric(spec.task, decisions, spec.sets["test"].labels),
                                   "epochs": spec.options[role].epochs, "seed": spec.options[role].seed}
    for name in ("calib", "test"):
        spec.sets[name].save(out / f"{name}.npz")
    (out / "labels.txt").write_text(spec.labels.file_lines())
    summary["metric"] = "micro_f1" if spec.task == "multilabel" else "accuracy"
    (out / "example.json").write_text(json.dumps(summary, indent=2) + "\n")
    little, big = summary["models"]["little"], summary["models"]["big"]
    log(f"{spec.name}: little {little['macs']:,} MACs {summary['metric']} {little['test_metric']:.4f}; "
        f"big {big['macs']:,} MACs {big['test_metric']:.4f} (test rows {len(spec.sets['test'])})")
    return summary


def multilabel_spec(seed: int = 0, epoch_scale: float = 1.0) -> PairSpec:
    return PairSpec(
        name="digits-attributes", task="multilabel", sets=digits.splits(seed), labels=digits.LABELS,
        make={role: (lambda role=role: digits.DigitsMLP(digits.SIZES[role])) for role in ROLES},
        options={role: TrainOptions(max(1, round(digits.EPOCHS[role] * epoch_scale)), lr=3e-3, seed=seed + i)
                 for i, role in enumerate(ROLES)},
        source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)",
    )


def text_spec(seed: int = 0, epoch_scale: float = 1.0, source=None, per_section: int = 2500) -> PairSpec:
    data = debtext.splits(source, per_section=per_section, seed=seed)
    vocab, classes, length = len(data.tokenizer.vocab), len(data.labels), data.tokenizer.max_length
    return PairSpec(
        name="debian-sections", task="multiclass", sets=data.sets, labels=data.labels,
        make={role: (lambda role=role: debtext.TextEncoder(vocab, classes, length, **debtext.SIZES[role])) for role in ROLES},
        options={role: TrainOptions(max(1, round(debtext.EPOCHS[role] * epoch_scale)), lr=1e-3, seed=seed + i)
                 for i, role in enumerate(ROLES)},
        source=f"Debian package short descriptions by section, from {data.source}",
        extra_metadata={"tokenizer": data.tokenizer.to_json()},
    )


def build_example(name: str, out: str | Path, seed: int = 0, epoch_scale: float = 1.0, log=print) -> dict:
    if name == "segmentation":
        from .segpair import build_segmentation_pair

        return build_segmentation_pair(out, seed, epoch_scale, log=log)
    spec = multilabel_spec(seed, epoch_scale) if name == "multilabel" else text_spec(seed, epoch_scale)
    return build_pair(spec, out, log=log)
