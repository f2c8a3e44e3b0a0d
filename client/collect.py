"""Run an image set (or a set of video clips) through the served `little` and `big` models and keep both
probabilities.

Calibration calls the two classifiers directly (not the gate): every image needs both answers, and
the gate stays a pure serving path. Async gRPC with a bounded number of requests in flight; the
result is cached as an npz so the analysis can be redone without the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np

from littlebig.contract import PROBS, STAGE_MACS, STAGE_SHA256, wire_input
from littlebig.errors import UserError
from littlebig.labels import ClassLabels

from .clips import to_wire_clips
from .datasets import ImageSet
from .images import to_wire_batch
from .infer import GateInfo, LittleBigClient
from .retry import Retrier


class StageMacs:
    """``macs_little`` and ``macs_big`` of a collection with ``macs`` per stage, in cost order."""

    macs: list[int]

    @property
    def macs_little(self) -> int:
        return self.macs[0]

    @property
    def macs_big(self) -> int:
        return self.macs[-1]


@dataclasses.dataclass
class Collected(StageMacs):
    """Every stage's probabilities on the same images, in cost order (two stages: little, big)."""

    stages: list[np.ndarray]  # float32 [N, C] per stage
    labels: np.ndarray | None  # class indices [N], or multi-hot [N, C] (multi-label)
    paths: list[str]
    macs: list[int]  # per stage
    model_labels: ClassLabels | None = None  # the served model's labels the data labels were mapped through
    models: tuple[str, ...] = ()  # the served names the stages were asked under
    digests: tuple[str, ...] = ()  # per stage, the sha256 of the ONNX it was built from ("": not stated)
    frames: int = 0  # video cascades: frames per clip (the paths are clips); 0: images

    def __post_init__(self) -> None:
        if len(self.stages) < 2 or len(self.stages) != len(self.macs):
            raise UserError(f"need >= 2 stages with one MACs count each, got {len(self.stages)} stages, {len(self.macs)} MACs")

    @property
    def little(self) -> np.ndarray:
        return self.stages[0]

    def holds(self, images: ImageSet) -> bool:
        """Whether these are the probabilities of exactly ``images``, with the same labels (a cache check)."""
        same_labels = (self.labels is None) == (images.labels is None) and (
            images.labels is None or np.array_equal(self.labels, images.labels)
        )
        return self.paths == [str(p) for p in images.paths] and same_labels

    @property
    def big(self) -> np.ndarray:
        return self.stages[-1]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            stages=np.stack(self.stages),
            labels=self.labels if self.labels is not None else np.zeros(0, np.int64),
            has_labels=self.labels is not None,
            paths=np.asarray(self.paths),
            macs=np.asarray(self.macs, dtype=np.int64),
            models=np.asarray(self.models, dtype=str),
            digests=np.asarray(self.digests, dtype=str),
            model_labels=np.asarray("" if self.model_labels is None else self.model_labels.to_json()),
            frames=np.asarray(self.frames),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Collected":
        with np.load(path) as data:
            # Two-stage caches written before K stages hold `little` and `big` instead of `stages`.
            stages = list(data["stages"]) if "stages" in data.files else [data["little"], data["big"]]
            return cls(
                stages=stages,
                labels=data["labels"] if bool(data["has_labels"]) else None,
                paths=[str(p) for p in data["paths"]],
                macs=[int(m) for m in data["macs"]],
                model_labels=_labels_of(data),
                models=tuple(str(m) for m in data["models"]) if "models" in data.files else (),
                digests=tuple(str(d) for d in data["digests"]) if "digests" in data.files else (),
                frames=int(data["frames"]) if "frames" in data.files else 0,
            )


def _labels_of(data) -> ClassLabels | None:
    text = str(data["model_labels"]) if "model_labels" in data.files else ""  # older caches lack it
    return ClassLabels.from_json(text) if text else None


async def _collect(url: str, images: ImageSet, models: tuple[str, ...], wire: "WireFormat", batch_size: int, concurrency: int, progress) -> dict:
    import tritonclient.grpc.aio as grpcaio

    results = {m: [None] * len(images) for m in models}
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    client = grpcaio.InferenceServerClient(url)
    retrier = Retrier()  # a restarting server is asked again (client/retry.py)

    async def run_chunk(start: int) -> None:
        async with gate:
            paths = images.paths[start : start + batch_size]
            # Decoding and resizing are CPU work: off the event loop, so requests keep flowing.
            batch = await loop.run_in_executor(None, wire.batch, paths)
            image = grpcaio.InferInput(wire.input_name, list(batch.shape), "UINT8")
            image.set_data_from_numpy(batch)
            output = [grpcaio.InferRequestedOutput(PROBS)]
            answers = await asyncio.gather(
                *(retrier.call_async(lambda m=m: client.infer(m, [image], outputs=output), f"inference on {m}") for m in models)
            )
            for model, answer in zip(models, answers):
                results[model][start] = answer.as_numpy(PROBS)
            progress(len(paths))

    try:
        await asyncio.gather(*(run_chunk(s) for s in range(0, len(images), batch_size)))
    finally:
        await client.close()
    return {m: np.concatenate([r for r in results[m] if r is not None]) for m in models}


@dataclasses.dataclass(frozen=True)
class WireFormat:
    """How images are sent: IMAGE uint8 [N, size, size, 3], centre-cropped by crop_pct; video clips:
    VIDEO uint8 [N, frames, size, size, 3] (client/clips.py)."""

    size: int
    crop_pct: float
    frames: int = 0  # frames per clip; 0: images

    @property
    def input_name(self) -> str:
        return wire_input(self.frames)

    def batch(self, items: list) -> np.ndarray:
        """Image (or clip) paths as one wire batch."""
        if self.frames:
            return to_wire_clips(items, self.frames, self.size, self.crop_pct)
        return to_wire_batch(items, self.size, self.crop_pct)

    @classmethod
    def of(cls, info: GateInfo) -> WireFormat:
        return cls(info.wire_size, info.crop_pct, info.frames)


def collect(
    url: str, images: ImageSet, *, batch_size: int = 16, concurrency: int = 4, show_progress: bool = True, info: GateInfo | None = None
) -> Collected:
    """Both models' probabilities for every image, in the image set's order."""
    if info is None:
        with LittleBigClient(url) as client:
            info = client.gate_info()
    return collect_stages(
        url, images, (info.little_model, info.big_model), WireFormat.of(info),
        macs=[info.macs_little, info.macs_big], model_labels=info.labels,
        batch_size=batch_size, concurrency=concurrency, show_progress=show_progress,
    )


@dataclasses.dataclass(frozen=True)
class ServedStage:
    """What a served stage model's config states about it (parameters written by the builder)."""

    macs: int  # per image
    digest: str  # sha256 of the ONNX file it was built from; "" in repositories built before it was written


def served_stages_facts(url: str, models: tuple[str, ...]) -> list[ServedStage]:
    facts = []
    with LittleBigClient(url) as client:
        for model in models:
            params = client.model_config(model).get("parameters", {})
            if STAGE_MACS not in params:
                raise UserError(f"served model {model!r} states no `{STAGE_MACS}` parameter: build the repository with `littlebig repo`")
            digest = params.get(STAGE_SHA256, {}).get("string_value", "")
            facts.append(ServedStage(int(params[STAGE_MACS]["string_value"]), digest))
    return facts


def collect_stages(
    url: str, images: ImageSet, models: tuple[str, ...], wire: WireFormat, *, macs: list[int] | None = None,
    model_labels: ClassLabels | None = None, batch_size: int = 16, concurrency: int = 4, show_progress: bool = True,
) -> Collected:
    """Every stage model's probabilities for every image, asking each served model directly (not the
    gate: every image needs every stage's answer). ``macs`` default: each model's served config."""
    from tqdm import tqdm

    if len(images) == 0:
        raise UserError("the image set is empty")
    if images.clips != bool(wire.frames):
        served, given = ("video clips", "images") if wire.frames else ("images", "video clips")
        raise UserError(f"the served models take {served}, the data set holds {given}")
    if batch_size < 1 or concurrency < 1:
        raise UserError("batch size and concurrency must be >= 1")
    served = served_stages_facts(url, models)
    if macs is None:
        macs = [stage.macs for stage in served]
    with tqdm(total=len(images), desc=f"collect ({len(models)} models)", unit="img", disable=not show_progress) as bar:
        probs = asyncio.run(_collect(url, images, models, wire, batch_size, concurrency, bar.update))
    return Collected(
        stages=[probs[m] for m in models],
        labels=images.labels,
        paths=[str(p) for p in images.paths],
        macs=list(macs),
        model_labels=model_labels,
        models=tuple(models),
        digests=tuple(stage.digest for stage in served),
        frames=wire.frames,
    )


def gate_stage_models(url: str) -> tuple[str, ...]:
    """The stage models the served gate calls, in cost order: its `stage_models` parameter (K stages),
    else its little and big."""
    with LittleBigClient(url) as client:
        return client.gate_config().stage_models


def same_models(url: str, cached: Collected, models: tuple[str, ...] | None, log) -> bool:
    """Whether the server serves the models ``cached`` was collected from (same names, MACs and, where
    the served configs state them, the same ONNX files by sha256); True when it cannot be asked (a
    cache is also for calibrating again offline), said in the log."""
    from tritonclient.utils import InferenceServerException

    try:
        served = tuple(models) if models is not None else gate_stage_models(url)
        facts = served_stages_facts(url, served)
    except (InferenceServerException, OSError) as err:
        log(f"cannot check the cached probabilities' models against {url} ({str(err).splitlines()[0][:120]}): using them as they are")
        return True
    if cached.models and cached.models != served:
        log(f"cached probabilities are from {', '.join(cached.models)}, the server serves {', '.join(served)}: asking it")
        return False
    macs, digests = [stage.macs for stage in facts], tuple(stage.digest for stage in facts)
    if macs != list(cached.macs):
        log(f"cached probabilities are from models of {cached.macs} MACs, the served ones have {macs}: asking the server")
        return False
    if all(digests) and cached.digests != digests:
        why = "are from other weights (the served models' ONNX files differ by sha256)" if cached.digests else \
            "do not record which weights gave them (an older cache)"
        log(f"cached probabilities {why}: asking the server")
        return False
    return True


def collect_cached(
    url: str, load_images, cache: Path, *, refresh: bool = False, log=print, models: tuple[str, ...] | None = None, **kwargs
) -> tuple[Collected, ImageSet]:
    """Reuse ``cache`` when it holds exactly the images ``load_images(model_labels, clips)`` lists, with
    the same labels, from the models the server serves now (same names, MACs and ONNX files: a repository
    rebuilt with other weights is asked again); otherwise ask the server (its gate's labels map the
    data's labels, and its wire format says whether the data are clips; ``models`` default: the stages
    the gate serves) and write it."""
    if cache.is_file() and not refresh:
        cached = Collected.load(cache)
        images = load_images(cached.model_labels, cached.frames > 0)
        if cached.holds(images) and same_models(url, cached, models, log):
            log(f"using cached probabilities {cache} (--recollect to ask the server again)")
            return cached, images
    with LittleBigClient(url) as client:
        info = client.gate_info()
    images = load_images(info.labels, bool(info.frames))
    models = tuple(models) if models is not None else gate_stage_models(url)
    if models == (info.little_model, info.big_model):
        collected = collect(url, images, info=info, **kwargs)
    else:
        collected = collect_stages(url, images, models, WireFormat.of(info), model_labels=info.labels, **kwargs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    collected.save(cache)
    return collected, images
