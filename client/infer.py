"""Gated inference against a running Triton server, over gRPC (default) or HTTP."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from littlebig.contract import CLASS, CONFIDENCE, GATE_MODEL, IMAGE, MASK, PROBS, ROUTE, VIDEO, GateConfig, route_label  # noqa: F401 - GATE_MODEL is re-exported for the client modules
from littlebig.errors import UserError
from littlebig.labels import ClassLabels

from .clips import to_wire_clips
from .images import ImageLike, to_wire_batch
from .retry import Retrier, RetryPolicy


@dataclasses.dataclass(frozen=True)
class Prediction:
    class_index: int | None  # None for segmentation: the answer is ``mask``
    confidence: float
    route: int  # 0: little answered, 1: escalated to big, 2: escalated, big failed, little answered
    probs: np.ndarray | None = None  # [C] (segmentation: [C, S, S])
    stages: int = 2  # of the cascade that answered (K stages: ROUTE is the answering stage, or K + k)
    mask: np.ndarray | None = None  # segmentation: int32 [S, S], each pixel's class, at the wire size

    @property
    def route_name(self) -> str:
        return route_label(self.route, self.stages)


@dataclasses.dataclass(frozen=True)
class GateInfo:
    """What the served gate says about itself (its config parameters)."""

    wire_size: int | None  # None: the gate's models take no images (text, features)
    crop_pct: float
    num_classes: int
    threshold: float
    macs_little: int
    macs_big: int
    little_model: str
    big_model: str
    labels: ClassLabels | None = None  # the model's own class labels, where the export recorded them
    thresholds: tuple[float, ...] = ()  # T_0 .. T_{K-2} (two stages: (threshold,))
    frames: int = 0  # video models: frames per clip (they take VIDEO [N, frames, S, S, 3]); 0: images
    task: str = "multiclass"  # or multilabel, segmentation (the gate answers LABELS, MASK instead of CLASS)

    def to_wire(self, items: list) -> np.ndarray:
        """Images (or, for video models, clips: client/clips.py) as one wire batch."""
        if self.frames:
            return to_wire_clips(items, self.frames, self.wire_size, self.crop_pct)
        return to_wire_batch(items, self.wire_size, self.crop_pct)


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise UserError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return module


class LittleBigClient:
    """Send images to the gate and get per-image class, confidence and route back. A call the server could
    not answer (it restarts, the connection dropped) is sent again within ``retry``'s deadline
    (client/retry.py); ``retries`` counts those."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = GATE_MODEL, retry: RetryPolicy = RetryPolicy()):
        self.protocol = protocol
        self.model = model
        self._tc = _module(protocol)
        self.client = self._tc.InferenceServerClient(url)
        self.retrier = Retrier(retry)

    @property
    def retries(self) -> int:
        return self.retrier.retries

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "LittleBigClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_config(self, model: str | None = None) -> dict:
        name = model or self.model
        if self.protocol == "grpc":
            return self.retrier.call(lambda: self.client.get_model_config(name, as_json=True)["config"], f"config of {name}")
        return self.retrier.call(lambda: self.client.get_model_config(name), f"config of {name}")

    def gate_model(self) -> str:
        """The model that holds the gate's parameters: the ensemble's gate step, or the gate itself."""
        config = self.model_config()
        if config.get("platform") == "ensemble":
            return config["ensemble_scheduling"]["step"][-1]["model_name"]
        return self.model

    def gate_config(self) -> GateConfig:
        """The served gate's parameters."""
        params = {k: v["string_value"] for k, v in self.model_config(self.gate_model()).get("parameters", {}).items()}
        return GateConfig.from_parameters(params)

    def gate_info(self) -> GateInfo:
        config = self.gate_config()
        return GateInfo(
            wire_size=config.wire_size or None,
            crop_pct=config.crop_pct,
            num_classes=config.num_classes,
            threshold=config.thresholds[0],
            macs_little=config.stage_macs[0],
            macs_big=config.stage_macs[-1],
            little_model=config.stage_models[0],
            big_model=config.stage_models[-1],
            labels=ClassLabels.from_json(config.labels) if config.labels else None,
            thresholds=config.thresholds,
            frames=config.frames,
            task=config.task,
        )

    def infer(
        self,
        batch: np.ndarray,
        *,
        threshold: float | str | None = None,
        return_probs: bool = False,
        model: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One request with a ready wire batch (IMAGE uint8 [N, S, S, 3], or VIDEO [N, F, S, S, 3] for video
        models); returns output name -> array."""
        if len(batch) == 0:
            # Triton itself refuses a zero-row tensor with "input byte size mismatch"; say what it means.
            raise UserError("empty batch: send at least one image")
        tc = self._tc
        image = tc.InferInput(VIDEO if batch.ndim == 5 else IMAGE, list(batch.shape), _triton_dtype(batch.dtype))
        image.set_data_from_numpy(batch)
        if outputs is None:
            outputs = [CLASS, CONFIDENCE, ROUTE] + ([PROBS] if return_probs else [])
        requested = [tc.InferRequestedOutput(name) for name in outputs]
        parameters = None if threshold is None else {"threshold": threshold}
        name = model or self.model
        result = self.retrier.call(lambda: self.client.infer(name, [image], outputs=requested, parameters=parameters), f"inference on {name}")
        return {name: result.as_numpy(name) for name in outputs}

    def classify(
        self,
        images: Sequence[ImageLike] | np.ndarray,
        *,
        threshold: float | None = None,
        return_probs: bool = False,
        batch_size: int = 16,
        info: GateInfo | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Prediction]:
        """Paths, PIL images or uint8 arrays -> one Prediction each, sent in batches of ``batch_size``
        (images decoded batch by batch; ``progress(n)`` after each). Video models take clips: .npy paths,
        frame folders or uint8 [T, H, W, 3] arrays, or a ready batch [N, F, S, S, 3]."""
        info = info or self.gate_info()
        if isinstance(images, np.ndarray) and images.ndim != (5 if info.frames else 4):
            what, one = ("[N, F, S, S, 3] or a list of clips", "clip") if info.frames else ("[N, S, S, 3] or a list of images", "image")
            raise UserError(f"classify takes a batch {what}; got one array of shape {images.shape}: pass [{one}] for a single {one}")
        images = images if isinstance(images, np.ndarray) else list(images)
        stages = len(info.thresholds) + 1 if info.thresholds else 2
        segmentation = info.task == "segmentation"
        answer = MASK if segmentation else CLASS
        predictions = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            wire = chunk if isinstance(chunk, np.ndarray) else info.to_wire(list(chunk))
            out = self.infer(wire, threshold=threshold, outputs=[answer, CONFIDENCE, ROUTE] + ([PROBS] if return_probs else []))
            for row in range(len(out[answer])):
                predictions.append(
                    Prediction(
                        class_index=None if segmentation else int(out[CLASS][row, 0]),
                        confidence=float(out[CONFIDENCE][row, 0]),
                        route=int(out[ROUTE][row, 0]),
                        probs=out[PROBS][row] if return_probs else None,
                        stages=stages,
                        mask=out[MASK][row] if segmentation else None,
                    )
                )
            if progress is not None:
                progress(len(wire))
        return predictions


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))
