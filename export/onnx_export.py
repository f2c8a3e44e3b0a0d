"""Export a classifier to a self-contained serving ONNX graph and check it against PyTorch.

The graph takes ``IMAGE`` uint8 [N, S, S, 3] (RGB, wire size S) and returns ``PROBS`` float32 [N, C]:
resize S -> the model's resolution, normalise with the model's mean/std, the model, softmax. So the
server needs no preprocessing code and both models of a pair take the same bytes. Video models take
``VIDEO`` uint8 [N, F, S, S, 3] (F frames per clip) the same way (VideoServingWrapper).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from littlebig.contract import CLASS, CONFIDENCE, IMAGE, PROBS, wire_input

from .macs import count_macs
from .metadata import METADATA_PREFIX, torchscript_path
from .specs import ExportError, LoadedModel, ModelInfo

# Triton 24.10 (the NGC release docker/ names) ships onnxruntime 1.19, which reads IR <= 10 and
# opset <= 21; IR 8 with opset 17 loads there and in every newer onnxruntime.
ONNX_OPSET = 17
ONNX_IR_VERSION = 8
INPUT_NAME = IMAGE
OUTPUT_NAME = PROBS
# In-graph top-1 beside PROBS: the gate reads two numbers per row instead of C probabilities.
TOP_CLASS_NAME, TOP_PROB_NAME = CLASS, CONFIDENCE
OUTPUT_NAMES = (OUTPUT_NAME, TOP_CLASS_NAME, TOP_PROB_NAME)
PARITY_MAX_ABS_DIFF = 1e-4


class ServingWrapper(nn.Module):
    """uint8 NHWC wire images -> class probabilities, with the model's own preprocessing inside."""

    def __init__(self, model: nn.Module, info: ModelInfo, wire_size: int):
        super().__init__()
        self.model = model
        self.resolution = info.resolution
        self.wire_size = wire_size
        mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        if self.wire_size != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = x * self.scale + self.shift
        return torch.softmax(self.model(x).float(), dim=1)


class VideoServingWrapper(ServingWrapper):
    """uint8 clips [N, F, S, S, 3] -> class probabilities: each frame resized and normalised like an
    image, the clip fed in the video models' [N, 3, F, R, R] layout."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        n, frames = video.shape[0], video.shape[1]
        x = video.reshape(n * frames, *video.shape[2:]).permute(0, 3, 1, 2).float()
        if self.wire_size != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = x * self.scale + self.shift
        x = x.reshape(n, frames, 3, self.resolution, self.resolution).permute(0, 2, 1, 3, 4)
        return torch.softmax(self.model(x).float(), dim=1)


def serving_wrapper(loaded: LoadedModel, wire_size: int) -> ServingWrapper:
    """The wrapper of an image or a video model, in eval mode."""
    kind = VideoServingWrapper if loaded.info.frames else ServingWrapper
    return kind(loaded.module, loaded.info, wire_size).eval()


class WithTop1(nn.Module):
    """The exported graph: PROBS, and each row's top-1 class (int64 [N, 1]) and its probability ([N, 1])."""

    def __init__(self, serving: ServingWrapper):
        super().__init__()
        self.serving = serving

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.serving(image)
        confidence, index = probs.max(dim=1, keepdim=True)
        return probs, index.to(torch.int64), confidence


@dataclasses.dataclass
class ExportResult:
    path: Path
    info: ModelInfo
    wire_size: int
    macs: int
    parity: dict

    def metadata(self) -> dict[str, str]:
        labels = {} if self.info.labels is None else {"labels": self.info.labels.to_json()}
        frames = {"frames": str(self.info.frames)} if self.info.frames else {}
        return labels | frames | dict(self.info.notes) | {
            "spec": self.info.spec,
            "weights": self.info.weights,
            "resolution": str(self.info.resolution),
            "wire_size": str(self.wire_size),
            "num_classes": str(self.info.num_classes),
            "mean": json.dumps(list(self.info.mean)),
            "std": json.dumps(list(self.info.std)),
            "crop_pct": repr(self.info.crop_pct),
            "macs": str(self.macs),
            "parity": json.dumps(self.parity),
        }


def ort_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session that does not spin: idle spinning threads steal cores from the
    other model of the cascade (measured: a lite0->lite2 cascade ran slower than lite2 alone)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def parity_check(wrapper: ServingWrapper, path: Path, images: np.ndarray, batch_size: int = 8) -> dict:
    """Compare PyTorch and onnxruntime on the same wire images (batched, so the dynamic axis is used)."""
    session = ort_session(path)
    input_name = session.get_inputs()[0].name  # IMAGE, or VIDEO for clips
    has_top1 = {o.name for o in session.get_outputs()} >= set(OUTPUT_NAMES)
    torch_probs, ort_probs, top1_agrees = [], [], True
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            torch_probs.append(wrapper(torch.from_numpy(chunk)).numpy())
            outputs = session.run(list(OUTPUT_NAMES) if has_top1 else [OUTPUT_NAME], {input_name: chunk})
            ort_probs.append(outputs[0])
            if has_top1:  # the in-graph top-1 must be exactly argmax / max of the same PROBS
                top1_agrees &= bool(np.array_equal(outputs[1][:, 0], outputs[0].argmax(1)))
                top1_agrees &= bool(np.array_equal(outputs[2][:, 0], outputs[0].max(1)))
    t, o = np.concatenate(torch_probs), np.concatenate(ort_probs)
    return {
        "images": int(len(images)),
        "argmax_agreement": float(np.mean(t.argmax(1) == o.argmax(1))),
        "max_abs_diff": float(np.abs(t - o).max()),
        "max_abs_diff_limit": PARITY_MAX_ABS_DIFF,
        "top1_outputs_consistent": top1_agrees if has_top1 else None,
    }


@contextlib.contextmanager
def replaced_on_success(out: Path):
    """A path beside ``out`` to write the new file to; it replaces ``out`` only if the block succeeds (a
    failed export leaves no half-written file, and a previous good export in place)."""
    partial = out.with_name(out.name + ".partial")
    try:
        yield partial
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


def _write_graph(wrapper: torch.nn.Module, example: torch.Tensor, out: Path, input_name: str = INPUT_NAME) -> onnx.ModelProto:
    """The serving graph at ``out`` (dynamic batch axis, checked); returns it for the metadata to be added."""
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, but it is the one
        # that exports every timm/torchvision classifier with a dynamic batch axis reliably.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithTop1(wrapper).eval(),  # export restores the mode it found: train mode would leak into the parity check
            (example,),
            str(out),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[input_name],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (input_name, *OUTPUT_NAMES)},
            do_constant_folding=True,
        )
    model = onnx.load(str(out))
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return model


def _write_torchscript(wrapper: ServingWrapper, images: np.ndarray, path: Path) -> dict:
    """The same serving module (PROBS, CLASS, CONFIDENCE) as TorchScript at ``path``, checked against eager
    PyTorch on ``images`` as the ONNX graph is."""
    module = WithTop1(wrapper).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace is deprecated in favour of torch.export, but a TorchScript file loads onto any
        # device (map_location) in any torch 2.x, with no Python code of the model's; the graph has
        # no device constants (checked for the EfficientNets), so a CPU trace serves on a GPU.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, (torch.from_numpy(images[:2]),), check_trace=False)
        eager = [module(torch.from_numpy(images[i : i + 8])) for i in range(0, len(images), 8)]
        scripted = [traced(torch.from_numpy(images[i : i + 8])) for i in range(0, len(images), 8)]
    t, s = torch.cat([e[0] for e in eager]).numpy(), torch.cat([x[0] for x in scripted]).numpy()
    parity = {"images": len(images), "argmax_agreement": float(np.mean(t.argmax(1) == s.argmax(1))),
              "max_abs_diff": float(np.abs(t - s).max()), "max_abs_diff_limit": PARITY_MAX_ABS_DIFF}
    if parity["argmax_agreement"] < 1.0 or parity["max_abs_diff"] > PARITY_MAX_ABS_DIFF:
        raise ExportError(f"the TorchScript trace disagrees with PyTorch: {parity}")
    traced.save(str(path))
    return parity


def export_onnx(
    loaded: LoadedModel,
    out: str | Path,
    *,
    wire_size: int,
    parity_images: np.ndarray,
    torchscript: bool = False,
    log=print,
) -> ExportResult:
    """Export ``loaded`` to ``out``, count its MACs, check parity, and record both in the file; with
    ``torchscript``, also the same module as TorchScript beside it (torchscript_path), for the torch runtime."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if wire_size < 1:
        raise ExportError(f"wire size must be positive, got {wire_size}")
    frames = loaded.info.frames
    shape = ((frames,) if frames else ()) + (wire_size, wire_size, 3)
    if parity_images.dtype != np.uint8 or parity_images.shape[1:] != shape:
        what = "clips" if frames else "images"
        raise ExportError(
            f"parity {what} must be uint8 [N, {', '.join(map(str, shape))}], got {parity_images.dtype} {parity_images.shape}"
        )
    wrapper = serving_wrapper(loaded, wire_size)
    macs = count_macs(loaded.module, loaded.info.resolution, frames)
    per = f"clip of {frames} frames" if frames else "image"
    log(f"{loaded.info.spec}: {macs / 1e9:.3f} GMACs per {per} at {loaded.info.resolution}px")

    with replaced_on_success(out) as partial:
        model = _write_graph(wrapper, torch.from_numpy(parity_images[:2]), partial, wire_input(frames))
        parity = parity_check(wrapper, partial, parity_images)
        result = ExportResult(out, loaded.info, wire_size, macs, parity)
        log(
            f"parity vs PyTorch on {parity['images']} {'clips' if frames else 'images'}: argmax agreement "
            f"{parity['argmax_agreement']:.1%}, max |dprob| {parity['max_abs_diff']:.2e} (limit {PARITY_MAX_ABS_DIFF:.0e})"
        )
        if parity["argmax_agreement"] < 1.0 or parity["max_abs_diff"] > PARITY_MAX_ABS_DIFF or parity["top1_outputs_consistent"] is False:
            raise ExportError(f"ONNX export of {loaded.info.spec} disagrees with PyTorch: {parity}")
        onnx.helper.set_model_props(model, {METADATA_PREFIX + k: v for k, v in result.metadata().items()})
        onnx.save(model, str(partial))
    report = result.metadata() | {"parity": parity}
    if torchscript:
        with replaced_on_success(torchscript_path(out)) as partial:
            report["torchscript_parity"] = _write_torchscript(wrapper, parity_images, partial)
        log(f"wrote {torchscript_path(out)} (TorchScript, same outputs; max |dprob| vs PyTorch "
            f"{report['torchscript_parity']['max_abs_diff']:.2e})")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return result
