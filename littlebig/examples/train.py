"""A short, seeded training loop shared by the examples (CPU, seconds to a minute)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .data import TensorSet


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0


def _loss(task: str):
    return nn.BCEWithLogitsLoss() if task == "multilabel" else nn.CrossEntropyLoss()


def _target(labels: np.ndarray, task: str) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.float32 if task == "multilabel" else np.int64))


def train(module: nn.Module, data: TensorSet, task: str, options: TrainOptions, name: str = "model") -> nn.Module:
    """AdamW with a cosine schedule over ``options.epochs``; returns ``module`` in eval mode."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    inputs = [torch.from_numpy(array) for array in data.inputs.values()]
    target = _target(data.labels, task)
    optimiser = torch.optim.AdamW(module.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps = options.epochs * -(-len(data) // options.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    loss_fn = _loss(task)
    module.train()
    with tqdm(total=steps, desc=f"training {name}", unit="step", leave=False) as progress:
        for _ in range(options.epochs):
            for rows in torch.randperm(len(data), generator=generator).split(options.batch_size):
                loss = loss_fn(module(*(t[rows] for t in inputs)), target[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
    return module.eval()
