"""Export a semantic segmentation model to a self-contained serving ONNX graph and check it against PyTorch.

The graph takes ``IMAGE`` uint8 [N, S, S, 3] (wire size S) and answers, per image:
  MASK              int32 [S, S]     each pixel's class (argmax of PROBS)
  CONFIDENCE        float32 [1]      the image-level confidence the gate routes on (below)
  PIXEL_CONFIDENCE  float32 [S, S]   each pixel's max softmax probability
  PROBS             float32 [C, S, S] per-pixel softmax (computed only when asked for)
Preprocessing is inside (resize S -> the model's resolution, normalise); the logits are resized back
to S before the softmax, so masks are at the wire size whatever the model's resolution.

The image-level confidence (paper Appendix A.1.3): each region's mean max-softmax over its pixels,
aggregated over the regions. The paper's regions are SLIC superpixels; in the graph they are a fixed
G x G grid of equal cells (average pooling), because SLIC is an iterative clustering that needs
scikit-image and has no ONNX form, and the gate must stay numpy-only. With equal cells the mean over
regions equals the mean over pixels; ``aggregate="min"`` (the least sure cell) is the other choice.
Calibration compares both with SLIC regions offline (client/segmentation.py).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from littlebig.contract import CONFIDENCE, IMAGE, MASK, PIXEL_CONFIDENCE, PROBS

from .macs import count_macs
from .metadata import METADATA_PREFIX
from .onnx_export import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    PARITY_MAX_ABS_DIFF,
    ExportResult,
    ort_session,
    replaced_on_success,
)
from .specs import ExportError, LoadedModel, ModelInfo

OUTPUT_NAMES = (MASK, CONFIDENCE, PIXEL_CONFIDENCE, PROBS)
AGGREGATES = ("mean", "min")
DEFAULT_REGIONS = 8  # an 8 x 8 grid: divides the usual wire sizes (64, 224, 256, 512, 520)
# Pixels whose class may differ between PyTorch and onnxruntime: at most this share, and only where the
# top two probabilities are within the parity tolerance (a tie that float rounding may break either way).
PIXEL_AGREEMENT_MIN = 0.999


def grid_confidence(pixel: torch.Tensor, regions: int, aggregate: str) -> torch.Tensor:
    """[N, S, S] max-softmax -> [N, 1]: the mean of each of G x G equal cells, then their mean (or min)."""
    side = pixel.shape[-1]
    cell = side // regions
    means = pixel.reshape(-1, regions, cell, regions, cell).mean(dim=(2, 4)).flatten(1)
    return means.mean(dim=1, keepdim=True) if aggregate == "mean" else means.amin(dim=1, keepdim=True)


class SegmentationWrapper(nn.Module):
    """uint8 NHWC wire images -> MASK, CONFIDENCE, PIXEL_CONFIDENCE, PROBS, with the model's preprocessing."""

    def __init__(self, model: nn.Module, info: ModelInfo, wire_size: int, regions: int = DEFAULT_REGIONS, aggregate: str = "mean"):
        super().__init__()
        check_regions(wire_size, regions, aggregate)
        self.model, self.resolution, self.wire_size = model, info.resolution, wire_size
        self.regions, self.aggregate = regions, aggregate
        mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))  # (x / 255 - mean) / std as one multiply-add
        self.register_buffer("shift", -mean / std)

    def forward(self, image: torch.Tensor):
        x = image.permute(0, 3, 1, 2).float()
        if self.wire_size != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        logits = self.model(x * self.scale + self.shift)
        logits = (logits["out"] if isinstance(logits, dict) else logits).float()
        if logits.shape[-1] != self.wire_size or logits.shape[-2] != self.wire_size:
            logits = F.interpolate(logits, size=(self.wire_size, self.wire_size), mode="bilinear", align_corners=False)
        probs = torch.softmax(logits, dim=1)
        pixel, index = probs.max(dim=1)
        return index.to(torch.int32), grid_confidence(pixel, self.regions, self.aggregate), pixel, probs


def check_regions(wire_size: int, regions: int, aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise ExportError(f"region aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if regions < 1 or wire_size % regions:
        raise ExportError(f"--regions {regions} must divide the wire size {wire_size} (a grid of equal cells)")


def without_aux_head(module: nn.Module) -> nn.Module:
    """torchvision's auxiliary head (training only) would be counted in the MACs and run for nothing."""
    if getattr(module, "aux_classifier", None) is not None:
        module.aux_classifier = None
    return module


@dataclasses.dataclass
class SegmentationExport(ExportResult):
    regions: int = DEFAULT_REGIONS
    aggregate: str = "mean"

    def metadata(self) -> dict[str, str]:
        return super().metadata() | {"task": "segmentation", "regions": str(self.regions), "region_aggregate": self.aggregate}


def _fix_output_dims(model: onnx.ModelProto, wire_size: int, classes: int) -> None:
    """The exporter leaves the sizes after the batch symbolic (they pass through shape ops); they are fixed,
    and the repository builder declares them as the stage's output dims."""
    dims = {MASK: [wire_size, wire_size], CONFIDENCE: [1], PIXEL_CONFIDENCE: [wire_size, wire_size],
            PROBS: [classes, wire_size, wire_size]}
    for output in model.graph.output:
        shape = output.type.tensor_type.shape
        for dim, size in zip(shape.dim[1:], dims[output.name]):
            dim.Clear()
            dim.dim_value = size


def _write_graph(wrapper: SegmentationWrapper, example: torch.Tensor, out: Path, classes: int) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (see onnx_export.py)
        torch.onnx.export(
            wrapper.eval(), (example,), str(out), dynamo=False, opset_version=ONNX_OPSET, input_names=[IMAGE],
            output_names=list(OUTPUT_NAMES), dynamic_axes={name: {0: "batch"} for name in (IMAGE, *OUTPUT_NAMES)},
            do_constant_folding=True,
        )
    model = onnx.load(str(out))
    model.ir_version = ONNX_IR_VERSION
    _fix_output_dims(model, wrapper.wire_size, classes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return model


def parity_check(wrapper: SegmentationWrapper, path: Path, images: np.ndarray, batch_size: int = 4) -> dict:
    """PyTorch against onnxruntime on the same wire images, and the graph's outputs against each other."""
    session = ort_session(path)
    diff, agree, pixels, untied, consistent = 0.0, 0, 0, 0, True
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            probs = wrapper(torch.from_numpy(chunk))[3].numpy()
            mask, confidence, pixel, served = session.run(list(OUTPUT_NAMES), {IMAGE: chunk})
            diff = max(diff, float(np.abs(probs - served).max()))
            differs = mask != probs.argmax(1)
            top2 = np.sort(probs, axis=1)[:, -2:]
            untied += int(np.sum(differs & (top2[:, 1] - top2[:, 0] > PARITY_MAX_ABS_DIFF)))
            agree, pixels = agree + int(np.sum(~differs)), pixels + differs.size
            consistent &= bool(np.array_equal(mask, served.argmax(1)) and np.array_equal(pixel, served.max(1)))
            expected = grid_confidence(torch.from_numpy(pixel), wrapper.regions, wrapper.aggregate).numpy()
            consistent &= bool(np.abs(confidence - expected).max() <= 1e-6)
    return {
        "images": len(images),
        "pixel_agreement": agree / pixels,
        "disagreements_not_ties": untied,
        "max_abs_diff": diff,
        "max_abs_diff_limit": PARITY_MAX_ABS_DIFF,
        "outputs_consistent": consistent,
    }


def _parity_failed(parity: dict) -> bool:
    return (parity["pixel_agreement"] < PIXEL_AGREEMENT_MIN or parity["disagreements_not_ties"] > 0
            or parity["max_abs_diff"] > PARITY_MAX_ABS_DIFF or not parity["outputs_consistent"])


def export_segmentation(
    loaded: LoadedModel, out: str | Path, *, wire_size: int, parity_images: np.ndarray, regions: int = DEFAULT_REGIONS,
    aggregate: str = "mean", log=print,
) -> SegmentationExport:
    """Export ``loaded`` (a segmentation model) to ``out``, count its MACs, check parity, record both."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if parity_images.dtype != np.uint8 or parity_images.shape[1:] != (wire_size, wire_size, 3):
        raise ExportError(f"parity images must be uint8 [N, {wire_size}, {wire_size}, 3], got {parity_images.dtype} {parity_images.shape}")
    module = without_aux_head(loaded.module).eval()
    wrapper = SegmentationWrapper(module, loaded.info, wire_size, regions, aggregate).eval()
    macs = count_macs(module, loaded.info.resolution)
    log(f"{loaded.info.spec}: {macs / 1e9:.3f} GMACs per image at {loaded.info.resolution}px")
    with replaced_on_success(out) as partial:
        model = _write_graph(wrapper, torch.from_numpy(parity_images[:2]), partial, loaded.info.num_classes)
        parity = parity_check(wrapper, partial, parity_images)
        log(f"parity vs PyTorch on {parity['images']} images: pixel agreement {parity['pixel_agreement']:.4%}, "
            f"max |dprob| {parity['max_abs_diff']:.2e} (limit {PARITY_MAX_ABS_DIFF:.0e})")
        if _parity_failed(parity):
            raise ExportError(f"ONNX export of {loaded.info.spec} disagrees with PyTorch: {parity}")
        result = SegmentationExport(out, loaded.info, wire_size, macs, parity, regions, aggregate)
        onnx.helper.set_model_props(model, {METADATA_PREFIX + k: v for k, v in result.metadata().items()})
        onnx.save(model, str(partial))
    out.with_suffix(".json").write_text(json.dumps(result.metadata() | {"parity": parity}, indent=2) + "\n")
    return result
