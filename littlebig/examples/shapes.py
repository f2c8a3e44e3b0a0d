"""Segmentation example: images of random shapes drawn by scikit-image (`skimage.draw.random_shapes`,
which returns each shape's kind), labelled per pixel with the kind of shape that covers it, over a
noisy background. Generated, so the labels are exact; each image gets its own noise level, so some
images are easy and some hard, as in real data. Input IMAGE uint8 [S, S, 3]; classes background,
rectangle, circle, triangle, ellipse."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from littlebig.labels import ClassLabels

SHAPES = ("rectangle", "circle", "triangle", "ellipse")
LABELS = ClassLabels(("background",) + SHAPES)
WIRE = 64


def draw_shape(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int] | None:
    """One random shape on an empty canvas: (its pixels, its colour image, its class index), or None when
    scikit-image found no place for it."""
    from skimage.draw import random_shapes

    image, found = random_shapes((size, size), max_shapes=1, min_shapes=1, min_size=size // 5, max_size=size // 2,
                                 rng=int(rng.integers(2**31)))  # channel values in [0, 254]
    if not found:
        return None
    covered = (image < 255).any(axis=-1)  # the canvas is white (255) where no shape is; shapes are < 255
    return covered, image, 1 + SHAPES.index(found[0][0])


def make_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [S, S, 3], mask uint8 [S, S]): 1-4 shapes, later ones on top, on a smooth random
    background, with Gaussian noise of a level drawn per image (the hard images are the noisy ones)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    corners = rng.uniform(0, 255, size=(4, 3))
    background = (corners[0] * (1 - yy[..., None]) * (1 - xx[..., None]) + corners[1] * (1 - yy[..., None]) * xx[..., None]
                  + corners[2] * yy[..., None] * (1 - xx[..., None]) + corners[3] * yy[..., None] * xx[..., None])
    image, mask = background, np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        shape = draw_shape(size, rng)
        if shape is not None:
            covered, colours, label = shape
            image[covered], mask[covered] = colours[covered], label
    noise = rng.uniform(0.0, 50.0)
    image = image + rng.normal(0.0, noise, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_set(count: int, seed: int, size: int = WIRE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [make_image(size, rng) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _block(inputs: int, outputs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """A small fully convolutional net: strided 3x3 blocks down to 1/4, dilated blocks there (context to tell
    shapes apart), a 1x1 classifier; torchvision's segmentation models answer the same {"out": logits}
    at the input size."""

    def __init__(self, widths: tuple[int, ...], dilations: tuple[int, ...], classes: int = len(LABELS)):
        super().__init__()
        layers, width = [], 3
        for index, out in enumerate(widths):
            layers.append(_block(width, out, stride=2 if index < 2 else 1, dilation=dilations[index]))
            width = out
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        logits = self.classifier(self.body(x))
        return {"out": nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


# little: three narrow blocks; big: six wide ones with growing dilation (about 20x the MACs).
SIZES = {
    "little": {"widths": (8, 16, 16), "dilations": (1, 1, 1)},
    "big": {"widths": (32, 64, 64, 64, 64, 64), "dilations": (1, 1, 2, 4, 8, 1)},
}


class Preprocessed(nn.Module):
    """Training view: uint8 NHWC images in, the net fed as the exported graph feeds it (x / 255 - mean) / std."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image):
        return self.net((image.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std)["out"]
