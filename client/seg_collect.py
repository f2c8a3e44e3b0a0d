"""Run a segmentation set through the served `little` and `big` and keep what calibration needs.

As client/collect.py for classifiers: each stage model is asked directly (every image needs both
answers), over async gRPC with a bounded number of requests in flight, and the result is cached as an
npz. The masks themselves are not kept: per image, each stage's intersection and union per class and its
correct pixels against the label mask (mIoU and pixel accuracy are sums of these over images), the
pixels where little's mask equals big's, little's served CONFIDENCE, and the other image-level
confidences calibration compares (client/segmentation.region_signals: grid and SLIC regions).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from littlebig.contract import CONFIDENCE, IMAGE, MASK, PIXEL_CONFIDENCE
from littlebig.errors import UserError
from littlebig.labels import ClassLabels

from .collect import StageMacs, WireFormat, same_models, served_stages_facts
from .images import to_wire_batch
from .infer import GateInfo
from .retry import Retrier
from .segmentation import (
    PixelCounts,
    SegmentationSet,
    pixel_counts,
    region_signals,
    wire_labels,
)


@dataclasses.dataclass
class SegCollected(StageMacs):
    """Little's and big's answers on the same images, reduced to per-image facts."""

    confidence: np.ndarray  # float32 [2, N]: each stage's served CONFIDENCE
    signals: dict[str, np.ndarray]  # little's other image-level confidences, float64 [N] each
    counts: list[PixelCounts] | None  # per stage, against the label masks; None when unlabelled
    agree: np.ndarray  # int64 [N]: pixels where little's mask equals big's
    pixels: np.ndarray  # int64 [N]: pixels per mask
    paths: list[str]
    macs: list[int]
    models: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()  # sha256 of each stage's ONNX file, as the served configs state them
    model_labels: ClassLabels | None = None
    masks_digest: str = ""  # sha256 over the label mask files ("" unlabelled)

    @property
    def has_labels(self) -> bool:
        return self.counts is not None

    def holds(self, images: SegmentationSet) -> bool:
        """Whether these are the answers on exactly ``images`` and their masks (a cache check)."""
        return self.paths == [str(p) for p in images.paths] and self.masks_digest == masks_digest(images)

    def save(self, path: str | Path) -> None:
        stages = {} if self.counts is None else {
            f"{name}": np.stack([getattr(c, name) for c in self.counts]) for name in ("inter", "union", "correct", "labelled")}
        np.savez_compressed(
            path, confidence=self.confidence, agree=self.agree, pixels=self.pixels, paths=np.asarray(self.paths),
            macs=np.asarray(self.macs, dtype=np.int64), models=np.asarray(self.models, dtype=str),
            digests=np.asarray(self.digests, dtype=str), masks_digest=np.asarray(self.masks_digest),
            model_labels=np.asarray("" if self.model_labels is None else self.model_labels.to_json()),
            signal_names=np.asarray(list(self.signals), dtype=str),
            **{f"signal_{name}": values for name, values in self.signals.items()}, **stages,
        )

    @classmethod
    def load(cls, path: str | Path) -> SegCollected:
        with np.load(path) as data:
            counts = None
            if "inter" in data.files:
                counts = [PixelCounts(*(data[name][k] for name in ("inter", "union", "correct", "labelled")))
                          for k in range(len(data["inter"]))]
            labels = str(data["model_labels"])
            return cls(
                confidence=data["confidence"], signals={str(n): data[f"signal_{n}"] for n in data["signal_names"]},
                counts=counts, agree=data["agree"], pixels=data["pixels"], paths=[str(p) for p in data["paths"]],
                macs=[int(m) for m in data["macs"]], models=tuple(str(m) for m in data["models"]),
                digests=tuple(str(d) for d in data["digests"]), model_labels=ClassLabels.from_json(labels) if labels else None,
                masks_digest=str(data["masks_digest"]),
            )


def masks_digest(images: SegmentationSet) -> str:
    if images.masks is None:
        return ""
    digest = hashlib.sha256()
    for path in images.masks:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _facts(batch: np.ndarray, labels: np.ndarray | None, answers: list[dict], classes: int) -> dict:
    """One chunk's per-image facts from the wire images, the label masks and both stages' answers."""
    little, big = answers
    return {
        "confidence": np.stack([a[CONFIDENCE][:, 0] for a in answers]),
        "signals": region_signals(batch, little[PIXEL_CONFIDENCE]),
        "counts": None if labels is None else [pixel_counts(a[MASK], labels, classes) for a in answers],
        "agree": (little[MASK] == big[MASK]).sum(axis=(1, 2)).astype(np.int64),
        "pixels": np.full(len(batch), little[MASK][0].size, dtype=np.int64),
    }


async def _collect(url: str, images: SegmentationSet, models: tuple[str, ...], wire: WireFormat, classes: int,
                   batch_size: int, concurrency: int, progress) -> list[dict]:
    import tritonclient.grpc.aio as grpcaio

    starts = list(range(0, len(images), batch_size))
    results, loop = [None] * len(starts), asyncio.get_running_loop()
    gate, retrier = asyncio.Semaphore(concurrency), Retrier()
    client = grpcaio.InferenceServerClient(url)
    outputs = ([MASK, CONFIDENCE, PIXEL_CONFIDENCE], [MASK, CONFIDENCE])

    async def run_chunk(index: int, start: int) -> None:
        async with gate:
            paths = images.paths[start : start + batch_size]
            batch = await loop.run_in_executor(None, to_wire_batch, paths, wire.size, wire.crop_pct)
            labels = None
            if images.masks is not None:
                labels = await loop.run_in_executor(None, wire_labels, images.masks[start : start + batch_size], wire.size,
                                                    wire.crop_pct, classes)
            image = grpcaio.InferInput(IMAGE, list(batch.shape), "UINT8")
            image.set_data_from_numpy(batch)

            async def ask(model, names):
                answer = await retrier.call_async(
                    lambda: client.infer(model, [image], outputs=[grpcaio.InferRequestedOutput(n) for n in names]),
                    f"inference on {model}")
                return {name: answer.as_numpy(name) for name in names}

            answers = await asyncio.gather(*(ask(m, names) for m, names in zip(models, outputs)))
            results[index] = await loop.run_in_executor(None, _facts, batch, labels, answers, classes)
            progress(len(paths))

    try:
        await asyncio.gather(*(run_chunk(i, s) for i, s in enumerate(starts)))
    finally:
        await client.close()
    return results


def _joined(chunks: list[dict], images: SegmentationSet, info: GateInfo, models, served) -> SegCollected:
    counts = None
    if images.has_labels:
        counts = [PixelCounts(*(np.concatenate([getattr(c["counts"][k], name) for c in chunks])
                                for name in ("inter", "union", "correct", "labelled"))) for k in range(len(models))]
    return SegCollected(
        confidence=np.concatenate([c["confidence"] for c in chunks], axis=1),
        signals={name: np.concatenate([c["signals"][name] for c in chunks]) for name in chunks[0]["signals"]},
        counts=counts, agree=np.concatenate([c["agree"] for c in chunks]), pixels=np.concatenate([c["pixels"] for c in chunks]),
        paths=[str(p) for p in images.paths], macs=[stage.macs for stage in served], models=tuple(models),
        digests=tuple(stage.digest for stage in served), model_labels=info.labels, masks_digest=masks_digest(images),
    )


def collect_segmentation(url: str, images: SegmentationSet, info: GateInfo, *, batch_size: int = 8, concurrency: int = 2,
                         show_progress: bool = True) -> SegCollected:
    """Little's and big's answers on every image of ``images``, asking each served model directly."""
    from tqdm import tqdm

    if len(images) == 0:
        raise UserError("the image set is empty")
    if batch_size < 1 or concurrency < 1:
        raise UserError("batch size and concurrency must be >= 1")
    models = (info.little_model, info.big_model)
    served = served_stages_facts(url, models)
    wire = WireFormat(info.wire_size, info.crop_pct)
    with tqdm(total=len(images), desc="collect (little, big)", unit="img", disable=not show_progress) as bar:
        chunks = asyncio.run(_collect(url, images, models, wire, info.num_classes, batch_size, concurrency, bar.update))
    return _joined(chunks, images, info, models, served)


def collect_segmentation_cached(url: str, images: SegmentationSet, info: GateInfo, cache: Path, *, refresh: bool = False,
                                log=print, **kwargs) -> SegCollected:
    """Reuse ``cache`` when it holds exactly these images and masks from the models served now, else ask."""
    if cache.is_file() and not refresh:
        cached = SegCollected.load(cache)
        if cached.holds(images) and same_models(url, cached, (info.little_model, info.big_model), log):
            log(f"using cached answers {cache} (--recollect to ask the server again)")
            return cached
    collected = collect_segmentation(url, images, info, **kwargs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    collected.save(cache)
    return collected
