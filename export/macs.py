"""Multiply-accumulate count of a classifier, the paper's cost measure (Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, resolution: int) -> int:
    """MACs of one forward pass on one image at ``resolution``.

    PyTorch's FlopCounterMode counts convolutions and matrix products (2 FLOPs per MAC) and skips
    element-wise work (norms, activations), which is how papers and timm report GMACs.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() // 2
