"""Export a classifier over any named tensor inputs (float features, token ids with a mask, ...) to
a serving ONNX graph and check it against PyTorch.

The image path (onnx_export.py) fixes one uint8 IMAGE input with preprocessing inside; these models
take their inputs as the client sends them. Two heads:
  multiclass  PROBS = softmax [N, C], plus the in-graph top-1 CLASS int64 [N, 1] and CONFIDENCE [N, 1]
  multilabel  PROBS = sigmoid [N, C] (independent labels: no top-1 in the graph)
The file records `task`, `num_classes`, `macs`, `labels`, the inputs and the parity check in its
littlebig.* metadata, like the image exports.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from littlebig.labels import ClassLabels

from .metadata import METADATA_PREFIX
from .onnx_export import (
    ONNX_IR_VERSION, ONNX_OPSET, OUTPUT_NAME, OUTPUT_NAMES, PARITY_MAX_ABS_DIFF, ort_session, replaced_on_success,
)
from .specs import ExportError

TASKS = ("multiclass", "multilabel")


class ClassifierHead(nn.Module):
    """Logits -> the served outputs of ``task``: (PROBS, CLASS, CONFIDENCE) or (PROBS,)."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        if task not in TASKS:
            raise ExportError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.model, self.task = model, task

    def forward(self, *inputs: torch.Tensor):
        logits = self.model(*inputs).float()
        if self.task == "multilabel":
            return (torch.sigmoid(logits),)
        probs = torch.softmax(logits, dim=1)
        confidence, index = probs.max(dim=1, keepdim=True)
        return probs, index.to(torch.int64), confidence

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME,) if self.task == "multilabel" else OUTPUT_NAMES


@dataclasses.dataclass
class TensorModel:
    """A torch classifier over named inputs, and what its file should say about it."""

    module: nn.Module
    input_names: tuple[str, ...]
    task: str
    labels: ClassLabels
    spec: str  # what it is, e.g. "example:digits-mlp-little"
    extra_metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # a tokenizer, a data set, ...


def count_tensor_macs(module: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """MACs of one forward pass on one row (matrix products, attention; element-wise work skipped).
    FlopCounterMode cannot see inside the fused TransformerEncoder fast path nor the CPU flash
    attention kernel (it counts 0 for them), so while counting those are off and attention runs as the
    plain matrix products it is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    one_row = tuple(t[:1] for t in example)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            module.eval()(*one_row)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


def tensor_parity(head: ClassifierHead, path: Path, inputs: dict[str, np.ndarray], batch_size: int = 8) -> dict:
    """PyTorch against onnxruntime on the same rows, batched (the dynamic axis is used)."""
    session = ort_session(path)
    names = list(inputs)
    rows = len(inputs[names[0]])
    torch_probs, ort_probs, top1_agrees = [], [], True
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            chunk = {name: inputs[name][start : start + batch_size] for name in names}
            torch_probs.append(head(*(torch.from_numpy(chunk[n]) for n in names))[0].numpy())
            outputs = session.run(list(head.output_names), chunk)
            ort_probs.append(outputs[0])
            if head.task == "multiclass":
                top1_agrees &= bool(np.array_equal(outputs[1][:, 0], outputs[0].argmax(1)))
                top1_agrees &= bool(np.array_equal(outputs[2][:, 0], outputs[0].max(1)))
    t, o = np.concatenate(torch_probs), np.concatenate(ort_probs)
    decided = (t >= 0.5) == (o >= 0.5) if head.task == "multilabel" else t.argmax(1) == o.argmax(1)
    return {
        "rows": int(rows),
        "decision_agreement": float(np.mean(decided)),  # argmax, or every label at 0.5
        "max_abs_diff": float(np.abs(t - o).max()),
        "max_abs_diff_limit": PARITY_MAX_ABS_DIFF,
        "top1_outputs_consistent": top1_agrees if head.task == "multiclass" else None,
        "classes": int(o.shape[1]),  # the graph's PROBS width
    }


def input_description(inputs: dict[str, np.ndarray]) -> list[dict]:
    return [{"name": name, "dtype": str(array.dtype), "dims": list(array.shape[1:])} for name, array in inputs.items()]


def _check_inputs(model: TensorModel, inputs: dict[str, np.ndarray]) -> None:
    if tuple(inputs) != model.input_names:
        raise ExportError(f"parity inputs are {list(inputs)}, the model takes {list(model.input_names)} (in that order)")
    rows = {len(array) for array in inputs.values()}
    if len(rows) != 1 or rows.pop() < 2:
        raise ExportError(f"parity inputs need the same number (>= 2) of rows each, got {[a.shape for a in inputs.values()]}")


def _write_graph(head: ClassifierHead, inputs: dict[str, np.ndarray], out: Path) -> onnx.ModelProto:
    example = tuple(torch.from_numpy(array[:2]) for array in inputs.values())
    names = list(inputs) + list(head.output_names)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # export the plain ops, not the fused CPU kernel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (see onnx_export.py)
            torch.onnx.export(
                head.eval(), example, str(out), dynamo=False, opset_version=ONNX_OPSET,
                input_names=list(inputs), output_names=list(head.output_names),
                dynamic_axes={name: {0: "batch"} for name in names}, do_constant_folding=True,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph = onnx.load(str(out))
    graph.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(graph)
    return graph


def _parity_failed(parity: dict) -> bool:
    return (
        parity["decision_agreement"] < 1.0
        or parity["max_abs_diff"] > PARITY_MAX_ABS_DIFF
        or parity["top1_outputs_consistent"] is False
    )


def export_tensor_model(model: TensorModel, out: str | Path, parity_inputs: dict[str, np.ndarray], log=print) -> dict:
    """Export ``model`` to ``out``, count its MACs per row, check parity; returns the metadata written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_inputs(model, parity_inputs)
    head = ClassifierHead(model.module, model.task).eval()
    example = tuple(torch.from_numpy(array) for array in parity_inputs.values())
    macs = count_tensor_macs(model.module, example)
    with replaced_on_success(out) as partial:
        graph = _write_graph(head, parity_inputs, partial)
        onnx.save(graph, str(partial))
        parity = tensor_parity(head, partial, parity_inputs)
        log(f"{model.spec}: {macs:,} MACs per row; parity vs PyTorch on {parity['rows']} rows: decisions agree "
            f"{parity['decision_agreement']:.1%}, max |dprob| {parity['max_abs_diff']:.2e} (limit {PARITY_MAX_ABS_DIFF:.0e})")
        if _parity_failed(parity):
            raise ExportError(f"ONNX export of {model.spec} disagrees with PyTorch: {parity}")
        if parity["classes"] != len(model.labels):
            raise ExportError(f"{model.spec} answers {parity['classes']} classes but has {len(model.labels)} labels")
        metadata = _metadata(model, parity_inputs, macs, parity)
        onnx.helper.set_model_props(graph, {METADATA_PREFIX + k: v for k, v in metadata.items()})
        onnx.save(graph, str(partial))
    out.with_suffix(".json").write_text(json.dumps({k: v for k, v in metadata.items() if k not in model.extra_metadata}
                                                   | {"parity": parity}, indent=2) + "\n")
    return metadata


def _metadata(model: TensorModel, parity_inputs: dict[str, np.ndarray], macs: int, parity: dict) -> dict[str, str]:
    return model.extra_metadata | {
        "spec": model.spec,
        "weights": "trained-here",
        "task": model.task,
        "num_classes": str(len(model.labels)),
        "labels": model.labels.to_json(),
        "inputs": json.dumps(input_description(parity_inputs)),
        "macs": str(macs),
        "parity": json.dumps(parity),
    }

