"""torchvision video classifiers (r3d_18, mc3_18, r2plus1d_18, s3d, mvit_*, swin3d_*) as serving models.

A served video model takes ``VIDEO`` uint8 [N, F, S, S, 3]: N clips of F RGB frames at the wire size S,
each frame made like a wire image (shorter side to S / crop_pct, centre crop; client/clips.py). The
graph resizes the frames to the model's resolution, normalises them with the weights' mean/std and
feeds the model its [N, 3, F, R, R] layout (VideoServingWrapper in onnx_export.py).

Preprocessing, frame count and class names come from the torchvision weights' own description
(`weights.transforms()`, the `clip_len` of their documentation, `meta["categories"]`), which torchvision
ships without downloading anything, so a random-init model is described like the trained one.
"""

from __future__ import annotations

import re

from littlebig.labels import ClassLabels

from .specs import ExportError, LoadedModel, ModelInfo, build_torchvision

DEFAULT_FRAMES = 16  # torchvision's Kinetics-400 evaluations use clip_len 16 for most models


def video_models() -> set[str]:
    """The names torchvision registers as video classifiers."""
    import torchvision.models as tvm

    return set(tvm.list_models(module=tvm.video))


def clip_length(weights) -> int:
    """Frames per clip the weights were evaluated with (their documentation says clip_len=N)."""
    found = re.search(r"clip_len=(\d+)", weights.meta.get("_docs", ""))
    return int(found.group(1)) if found else DEFAULT_FRAMES


def load_video(name: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None):
    """A torchvision video model (see specs._load_torchvision for the weights rules)."""
    import torchvision.models as tvm

    builder = tvm.get_model_builder(name)
    described = tvm.get_model_weights(name).DEFAULT  # a description only: nothing is downloaded here
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    module = build_torchvision(builder, described, spec, random_init or bool(weights), kwargs)
    transforms = described.transforms()
    resolution = int(transforms.crop_size[0])
    if transforms.crop_size[0] != transforms.crop_size[-1]:
        raise ExportError(f"{spec} expects non-square frames {transforms.crop_size}; only square ones are supported")
    categories = described.meta.get("categories")
    classes = num_classes or len(categories)
    labels = ClassLabels(tuple(categories)) if num_classes is None and categories else None
    return LoadedModel(
        module,
        ModelInfo(
            spec=spec,
            resolution=resolution,
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            num_classes=classes,
            crop_pct=resolution / float(transforms.resize_size[0]),
            weights=str(weights) if weights else ("random-init" if random_init else "pretrained"),
            labels=labels,
            frames=clip_length(described),
        ),
    )

