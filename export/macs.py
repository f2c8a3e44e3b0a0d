"""Multiply-accumulate count of a classifier, the paper's cost measure (Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, resolution: int, frames: int = 0) -> int:
    """MACs of one forward pass on one image at ``resolution`` (video models: one clip of ``frames``
    frames, input [1, 3, frames, resolution, resolution]).

    PyTorch's FlopCounterMode counts convolutions and matrix products (2 FLOPs per MAC) and skips
    element-wise work (norms, activations), which is how papers and timm report GMACs.
    """
    shape = (1, 3, frames, resolution, resolution) if frames else (1, 3, resolution, resolution)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(shape))
    return counter.get_total_flops() // 2
