"""Run an image set through the served `little` and `big` models and keep both probabilities.

Calibration calls the two classifiers directly (not the gate): every image needs both answers, and
the gate stays a pure serving path. Async gRPC with a bounded number of requests in flight; the
result is cached as an npz so the analysis can be redone without the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np

from .datasets import ImageSet
from .images import to_wire_batch
from .infer import GateInfo, LittleBigClient
from .labels import ClassLabels


@dataclasses.dataclass
class Collected:
    little: np.ndarray  # float32 [N, C]
    big: np.ndarray
    labels: np.ndarray | None
    paths: list[str]
    macs_little: int
    macs_big: int
    model_labels: ClassLabels | None = None  # the served model's labels the data labels were mapped through

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            little=self.little,
            big=self.big,
            labels=self.labels if self.labels is not None else np.zeros(0, np.int64),
            has_labels=self.labels is not None,
            paths=np.asarray(self.paths),
            macs=np.asarray([self.macs_little, self.macs_big], dtype=np.int64),
            model_labels=np.asarray("" if self.model_labels is None else self.model_labels.to_json()),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Collected":
        with np.load(path) as data:
            return cls(
                little=data["little"],
                big=data["big"],
                labels=data["labels"] if bool(data["has_labels"]) else None,
                paths=[str(p) for p in data["paths"]],
                macs_little=int(data["macs"][0]),
                macs_big=int(data["macs"][1]),
                model_labels=_labels_of(data),
            )


def _labels_of(data) -> ClassLabels | None:
    text = str(data["model_labels"]) if "model_labels" in data.files else ""  # older caches lack it
    return ClassLabels.from_json(text) if text else None


async def _collect(url: str, images: ImageSet, models: tuple[str, str], info: GateInfo, batch_size: int, concurrency: int, progress) -> dict:
    import tritonclient.grpc.aio as grpcaio

    results = {m: [None] * len(images) for m in models}
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    client = grpcaio.InferenceServerClient(url)

    async def run_chunk(start: int) -> None:
        async with gate:
            paths = images.paths[start : start + batch_size]
            # Decoding and resizing are CPU work: off the event loop, so requests keep flowing.
            batch = await loop.run_in_executor(None, to_wire_batch, paths, info.wire_size, info.crop_pct)
            image = grpcaio.InferInput("IMAGE", list(batch.shape), "UINT8")
            image.set_data_from_numpy(batch)
            answers = await asyncio.gather(
                *(client.infer(m, [image], outputs=[grpcaio.InferRequestedOutput("PROBS")]) for m in models)
            )
            for model, answer in zip(models, answers):
                results[model][start] = answer.as_numpy("PROBS")
            progress(len(paths))

    try:
        await asyncio.gather(*(run_chunk(s) for s in range(0, len(images), batch_size)))
    finally:
        await client.close()
    return {m: np.concatenate([r for r in results[m] if r is not None]) for m in models}


def collect(
    url: str, images: ImageSet, *, batch_size: int = 16, concurrency: int = 4, show_progress: bool = True, info: GateInfo | None = None
) -> Collected:
    """Both models' probabilities for every image, in the image set's order."""
    from tqdm import tqdm

    if info is None:
        with LittleBigClient(url) as client:
            info = client.gate_info()
    little_model, big_model = info.little_model, info.big_model
    if len(images) == 0:
        raise ValueError("the image set is empty")
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch size and concurrency must be >= 1")
    with tqdm(total=len(images), desc="collect", unit="img", disable=not show_progress) as bar:
        probs = asyncio.run(
            _collect(url, images, (little_model, big_model), info, batch_size, concurrency, bar.update)
        )
    return Collected(
        little=probs[little_model],
        big=probs[big_model],
        labels=images.labels,
        paths=[str(p) for p in images.paths],
        macs_little=info.macs_little,
        macs_big=info.macs_big,
        model_labels=info.labels,
    )


def collect_cached(url: str, load_images, cache: Path, *, refresh: bool = False, log=print, **kwargs) -> tuple[Collected, ImageSet]:
    """Reuse ``cache`` when it holds exactly the images ``load_images(model_labels)`` lists, with the
    same labels; otherwise ask the server (its gate's labels map the data's labels) and write it."""
    if cache.is_file() and not refresh:
        cached = Collected.load(cache)
        images = load_images(cached.model_labels)
        same_labels = (cached.labels is None) == (images.labels is None) and (
            images.labels is None or np.array_equal(cached.labels, images.labels)
        )
        if cached.paths == [str(p) for p in images.paths] and same_labels:
            log(f"using cached probabilities {cache} (--recollect to ask the server again)")
            return cached, images
    with LittleBigClient(url) as client:
        info = client.gate_info()
    images = load_images(info.labels)
    collected = collect(url, images, info=info, **kwargs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    collected.save(cache)
    return collected, images
