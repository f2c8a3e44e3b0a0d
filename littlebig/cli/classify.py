"""`littlebig classify`: Classify images (or, for video cascades, clips) through the served cascade
(segmentation: write their masks)."""

from __future__ import annotations

import sys
from pathlib import Path

from littlebig.errors import UsageError

from .options import GRPC_URL, HTTP_URL, command, positive_int, probability, server_address


def print_predictions(names, predictions, labels, little_confidence=None) -> None:
    """One row per image; ``conf`` is the answering model's confidence, ``little`` little's (when given)."""
    width = max([len(str(n)) for n in names] + [5])
    little_head = f"{'little':>6}  " if little_confidence is not None else ""
    print(f"{'image':<{width}}  {'class':>5}  {'name':<32}  {little_head}{'conf':>6}  route")
    for row, (name, p) in enumerate(zip(names, predictions)):
        little = f"{little_confidence[row]:6.3f}  " if little_confidence is not None else ""
        print(f"{str(name):<{width}}  {p.class_index:>5}  {labels[p.class_index][:32]:<32}  {little}{p.confidence:6.3f}  {p.route_name}")


def _given_paths(arguments: list[str], lister, item: str, items: str) -> list[Path]:
    """Files as given, folders expanded through ``lister``; a missing path or an empty folder is named."""
    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            found = lister(argument)
            if not found:
                raise UsageError(f"no {items} under the folder {argument}")
            paths += found
        elif argument.is_file():
            paths.append(argument)
        else:
            raise UsageError(f"{item} {argument} does not exist")
    return paths
def write_masks(folder: str | Path, names: list[Path], predictions, labels) -> list[Path]:
    """Each answer's mask as <folder>/<image name>.png (class indices, Pascal VOC colours); one row per image
    with the mask file and its most covered classes."""
    from collections import Counter

    import numpy as np

    from littlebig.client.segmentation import save_mask

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen, written = Counter(), []
    for name, p in zip(names, predictions):
        stem = Path(name).stem
        seen[stem] += 1
        written.append(folder / (f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png"))  # same name, other folder
        save_mask(written[-1], p.mask)
    width = max([len(str(n)) for n in names] + [5])
    print(f"{'image':<{width}}  {'conf':>6}  {'route':<8}  mask, most covered classes")
    for name, p, path in zip(names, predictions, written):
        classes, counts = np.unique(p.mask, return_counts=True)
        top = ", ".join(f"{labels[c][:20]} {n / p.mask.size:.0%}" for c, n in sorted(zip(classes, counts), key=lambda x: -x[1])[:3])
        print(f"{name!s:<{width}}  {p.confidence:6.3f}  {p.route_name:<8}  {path}: {top}")
    return written


def _image_paths(arguments: list[str]) -> list[Path]:
    """Files as given, folders expanded to the images inside; unreadable ones named before any request."""
    from PIL import Image, UnidentifiedImageError

    from littlebig.client.images import list_images

    paths = _given_paths(arguments, list_images, "image", "images (.jpg, .png, ...)")
    for path in paths:
        try:
            with Image.open(path):  # reads the header only: a file that is not an image fails here
                pass
        except UnidentifiedImageError:
            raise UsageError(f"{path} is not an image Pillow can read (JPEG, PNG, BMP, GIF, WebP, TIFF)") from None
    return paths


def _clip_paths(arguments: list[str]) -> list[Path]:
    """Clips as given (.npy files, frame folders), folders of clips expanded to the clips inside."""
    from littlebig.client.clips import CLIP_SUFFIX, list_clips

    paths = _given_paths(arguments, list_clips, "clip", "clips (.npy files or folders of frames)")
    for path in paths:
        if path.is_file() and path.suffix.lower() != CLIP_SUFFIX:
            raise UsageError(f"{path} is not a clip: the served models take video clips (.npy files or folders of frames)")
    return paths


def run(args) -> None:
    from littlebig.client.infer import LittleBigClient
    from littlebig.labels import load_labels

    clips = [a for a in args.images if Path(a).suffix.lower() == ".npy"]
    paths = [] if clips else _image_paths(args.images)  # images are checked before any request
    args.url = args.url or (HTTP_URL if args.http else GRPC_URL)  # before the first request: errors name it
    from tqdm import tqdm

    with LittleBigClient(args.url, "http" if args.http else "grpc") as client:
        info = client.gate_info()
        if info.frames:
            paths = _clip_paths(args.images)
        elif clips:
            raise UsageError(f"{clips[0]} is a video clip, and the served models take images")
        if info.task == "segmentation" and not args.masks:
            raise UsageError("the served gate segments images: pass --masks DIR, the folder for one mask PNG per image")
        # On stderr, shown only for work long enough to watch: the answers on stdout stay a clean table.
        with tqdm(total=len(paths), desc="classify", unit="img", file=sys.stderr, disable=len(paths) <= 4 * args.batch_size) as bar:
            predictions = client.classify(paths, threshold=args.threshold, batch_size=args.batch_size, info=info,
                                          progress=bar.update)
        labels = load_labels(args.labels, info.num_classes, info.labels)
        if info.task == "segmentation":
            write_masks(args.masks, paths, predictions, labels)
        else:
            print_predictions(paths, predictions, labels)


def add(sub) -> None:
    p = command(sub, "classify", help="classify images (or video clips) through the served gate")
    p.add_argument("images", nargs="+", help="image files, or folders of images; video cascades: clips (.npy files "
                   "of uint8 [T, H, W, 3], or folders of frames), or folders of clips")
    p.add_argument("--url", type=server_address, help=f"server HOST:PORT (default: {GRPC_URL}, or {HTTP_URL} with --http)")
    p.add_argument("--http", action="store_true", help="use HTTP instead of gRPC")
    p.add_argument("--threshold", type=probability, help="override T for these requests")
    p.add_argument("--labels", help="class names, one per line (default: ImageNet names for 1000 classes)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per request")
    p.add_argument("--masks", help="segmentation gates: write each image's mask here as <name>.png (class indices, "
                   "at the wire size, of the centre square the image is sent as)")
    p.set_defaults(func=run)
