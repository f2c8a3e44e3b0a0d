"""Images to the wire format both models of a pair take: uint8 [N, S, S, 3] RGB.

Geometry (the one the export assumes): resize the shorter side to S / crop_pct, centre-crop S x S.
The graph then resizes S -> the model's resolution and normalises.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from littlebig.errors import UserError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Photographs that ship inside scikit-image's wheel: real images for parity checks and the demo,
# available without any download.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "coins",
    "moon",
    "horse",
)


def load_image(image: ImageLike) -> Image.Image:
    """A path, PIL image or HxW / HxWx3 / HxWx4 uint8 array as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(f"image arrays must be uint8, got {image.dtype}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            return Image.fromarray(image.squeeze()).convert("RGB")
        raise UserError(f"image array must be HxW or HxWxC with C in 1, 3, 4; got shape {image.shape}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise  # named by the CLI ("not an image Pillow can read")
    except (OSError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def to_wire(image: ImageLike, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """One image as uint8 [size, size, 3]: shorter side to size / crop_pct, centre crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return np.asarray(wire_geometry(load_image(image), size, crop_pct, Image.BICUBIC), dtype=np.uint8)


def wire_geometry(img: Image.Image, size: int, crop_pct: float, resample) -> Image.Image:
    """Shorter side to size / crop_pct, centre crop size x size (segmentation masks: with NEAREST)."""
    if img.size == (size, size) and crop_pct == 1.0:
        return img
    scale = size / crop_pct / min(img.size)
    resized = (max(size, round(img.width * scale)), max(size, round(img.height * scale)))
    img = img.resize(resized, resample)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_wire_batch(images: Sequence[ImageLike], size: int | None, crop_pct: float = 0.875) -> np.ndarray:
    if size is None:
        raise UserError("the served models take no images (their gate states no wire_size): send their own inputs")
    if len(images) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([to_wire(img, size, crop_pct) for img in images])


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def sample_photos(names: Iterable[str] = SKIMAGE_PHOTOS) -> dict[str, np.ndarray]:
    """Real photographs from scikit-image's bundled data, by name."""
    import skimage.data

    photos = {}
    for name in names:
        img = getattr(skimage.data, name)()
        if img.dtype != np.uint8:  # horse is boolean
            img = (img > 0).astype(np.uint8) * 255 if img.dtype == bool else img.astype(np.uint8)
        photos[name] = img
    return photos
