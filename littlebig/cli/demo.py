"""`littlebig demo`: EfficientNet-Lite0 -> Lite2 end to end: export, repository, serve, classify."""

from __future__ import annotations

from pathlib import Path

from littlebig.contract import PROBS
from littlebig.errors import UsageError

from .classify import print_predictions
from .export import parity_images
from .options import command, probability, require_export_extra


def run(args) -> None:
    require_export_extra("demo")
    from littlebig.client.images import list_images, sample_photos, to_wire_batch
    from littlebig.client.infer import LittleBigClient
    from littlebig.export import export_onnx, load_model
    from littlebig.labels import load_labels
    from littlebig.model_repository.builder import build_repository
    from littlebig.model_repository.options import RepositoryOptions
    from littlebig.serving.server import TritonServer

    if args.data:  # before minutes of export
        paths = list_images(args.data)
        if not paths:
            raise UsageError(f"no images found under {args.data}")
        names, images = [p.name for p in paths], paths
    else:
        photos = sample_photos()
        names, images = list(photos), list(photos.values())

    work = Path(args.workdir)
    wire = args.wire_size
    onnx_files = {}
    for role, spec in (("little", "efficientnet-lite:0"), ("big", "efficientnet-lite:2")):
        path = work / f"{role}.onnx"
        onnx_files[role] = path
        if path.exists() and not args.force:
            print(f"[demo] {role}: reusing {path} (--force to export again)")
            continue
        print(f"[demo] exporting {role} = {spec} -> {path}")
        loaded = load_model(spec)
        export_onnx(loaded, path, wire_size=wire, parity_images=parity_images(None, wire, loaded.info.crop_pct))
    repo = build_repository(
        onnx_files["little"], onnx_files["big"], work / "repository", RepositoryOptions(runtime="python", threshold=args.threshold)
    )
    print(f"[demo] model repository {repo} (threshold T={args.threshold})")

    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        print(f"[demo] tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, log {server.log_file}")
        with LittleBigClient(server.grpc_url) as client:
            info = client.gate_info()
            batch = to_wire_batch(images, info.wire_size, info.crop_pct)
            predictions = client.classify(batch)
            little = _little_confidence(client, batch, info.little_model)
    print(f"[demo] little: little's confidence (its max softmax); little answers when it is >= T={args.threshold}, "
          "else big does. conf: the confidence of the model that answered.")
    print_predictions(names, predictions, load_labels(None, info.num_classes, info.labels), little)
    _print_demo_summary(predictions, info, sample_set=not args.data)


def _little_confidence(client, wire, little_model: str, batch_size: int = 16):
    """Little's own max softmax per image, asked of `little` directly (the gate returns the answering model's)."""
    import numpy as np

    chunks = [
        client.infer(wire[start : start + batch_size], model=little_model, outputs=[PROBS])[PROBS]
        for start in range(0, len(wire), batch_size)
    ]
    return np.concatenate(chunks).max(axis=1)


# What `littlebig calibrate` (default: certified 2 points at 95%) measured for this pair on 500 ImageNet
# photos (docs/calibration.md; bench/results/calibration/splits.json, "full_set_default").
IMAGENET_CALIBRATION = (
    "T=0.36, p=0.128: 0.495 GMACs per image against 0.860 for big alone (42% fewer), accuracy 0.908 vs big's 0.900, "
    "drop <= 1.9 points at 95% confidence"
)


def _print_demo_summary(predictions, info, *, sample_set: bool) -> None:
    escalated = sum(p.route for p in predictions)
    share = escalated / len(predictions)
    gmacs = (info.macs_little + share * info.macs_big) / 1e9
    break_even = 1.0 - info.macs_little / info.macs_big
    print(
        f"[demo] {len(predictions)} images, {escalated} escalated to big (p={share:.2f}); "
        f"{gmacs:.3f} GMACs per image against {info.macs_big / 1e9:.3f} for big alone. "
        f"The cascade is cheaper than big while p < 1 - MACs little / MACs big = {break_even:.2f}."
    )
    if share < break_even:
        return
    if sample_set:
        print(
            "[demo] Why so many escalate here: most of the photos bundled with scikit-image are not ImageNet-like "
            "(microscopy, a star field, coins, the moon, a black-and-white silhouette), so little is unsure of "
            "them and hands them to big."
        )
        print(f"[demo] On photos of its task it is different; on ImageNet photos calibration gave {IMAGENET_CALIBRATION}.")
        print("[demo] Try your own photos: `littlebig demo --data DIR`.")
    else:
        print("[demo] Little is unsure of most of these images: choose T for your data with `littlebig calibrate`.")


def add(sub) -> None:
    p = command(sub, "demo", help="EfficientNet-Lite0 -> Lite2 end to end: export, repository, serve, classify")
    p.add_argument("--workdir", default="runs/demo", help="folder for the ONNX files, repository and server log")
    p.add_argument("--data", help="folder of your images (default: photographs bundled with scikit-image)")
    p.add_argument("--threshold", type=probability, default=0.36,
                   help="T (%(default)s: what `littlebig calibrate` picks by default on 500 ImageNet photos)")
    p.add_argument("--wire-size", type=int, default=260, help="side S of the uint8 [N,S,S,3] images sent")
    p.add_argument("--force", action="store_true", help="export again even if the ONNX files exist")
    p.set_defaults(func=run)
