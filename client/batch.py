"""Two-pass batch classification of a whole image folder (paper Table 9, memory-constrained).

Pass 1 runs `little` over every image with `big` (and the gate) unloaded; pass 2 unloads `little`,
loads `big` and runs it over the images whose little confidence is below T. The answers are the
cascade's (Eq. 4), the same the served gate gives, while the server holds one model at a time.
Models are switched through Triton's repository API (the server runs with explicit model control);
at the end the models that were loaded before the job are loaded again, the gate with the very
config it was serving.

Resumable: every answered chunk is appended to ``<out>.partial.jsonl`` (keyed by the image's path
under the data folder) before the next is counted, and the job's settings (T, the models, the gate's
config) are its first line. Running the same command again skips what is there; the file is removed
once the CSV is written.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.grpc as grpcclient

from littlebig.contract import IMAGE, PROBS, GateConfig
from littlebig.errors import UserError
from littlebig.labels import ClassLabels

from .images import list_images, to_wire_batch
from .infer import GATE_MODEL, LittleBigClient
from .retry import Retrier

ROUTES = ("little", "big")


class BatchError(UserError):
    """The batch job cannot run or cannot resume as asked."""


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """Fixed at the job's start and kept in the partial file, so a resumed job answers the same way."""

    data: str
    threshold: float
    wire_size: int
    crop_pct: float
    num_classes: int
    little_model: str
    big_model: str
    gate_model: str
    loaded_at_start: tuple[str, ...]
    gate_config: str | None  # the config that holds the gate's parameters (JSON), to load it back exactly as it was
    gate_step: str = ""  # the ensemble's gate step, which holds them ("": the gate holds them itself)

    @property
    def gate_models(self) -> tuple[str, ...]:
        """The gate's models, the one clients call first."""
        return (self.gate_model, self.gate_step) if self.gate_step else (self.gate_model,)

    @property
    def holder(self) -> str:
        return self.gate_step or self.gate_model


@dataclasses.dataclass(frozen=True)
class Answer:
    class_index: int
    confidence: float


@dataclasses.dataclass(frozen=True)
class PassWindow:
    """When a pass ran its inferences (time.monotonic()), after its models were switched."""

    model: str
    start: float
    end: float
    images: int


@dataclasses.dataclass
class BatchResult:
    out: Path
    images: int
    escalated: int
    inferred: dict[str, int]  # images inferred by this run per route (less than all after a resume)
    windows: list[PassWindow]


def set_loaded(client: grpcclient.InferenceServerClient, model: str, loaded: bool, *,
               config: str | None = None, headers: dict[str, str] | None = None) -> None:
    """Load or unload one model through the repository API. Every switch of this module goes through
    here, so headers a restricted repository API needs (an admin key) are added in one place."""
    if loaded:
        client.load_model(model, headers=headers, config=config)
        if not client.is_model_ready(model, headers=headers):
            raise BatchError(f"model {model!r} is not ready after loading it")
        return
    client.unload_model(model, headers=headers)
    # Unloading finishes in the background: the model stops being ready at once, but its instances
    # (python-backend stub processes, seconds later) are gone only when the index leaves UNLOADING.
    deadline = time.monotonic() + 120
    while model_states(client, headers).get(model) in ("READY", "UNLOADING"):
        if time.monotonic() > deadline:
            raise BatchError(f"model {model!r} is still loaded 120 s after unloading it")
        time.sleep(0.1)


def model_states(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None = None) -> dict[str, str]:
    index = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
    return {m["name"]: m.get("state", "") for m in index}


def loaded_models(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None = None) -> set[str]:
    return {name for name, state in model_states(client, headers).items() if state == "READY"}


def keep_only(client, settings: JobSettings, model: str | None, headers=None) -> None:
    """Unload the job's other models first (memory comes back before more is taken), then load ``model``."""
    loaded = loaded_models(client, headers)
    for other in (*settings.gate_models, settings.little_model, settings.big_model):
        if other != model and other in loaded:
            set_loaded(client, other, False, headers=headers)
    if model is not None and model not in loaded:
        set_loaded(client, model, True, headers=headers)


def restore(client, settings: JobSettings, headers=None) -> None:
    """Load back what was loaded before the job; the gate last, with the config it was serving."""
    loaded = loaded_models(client, headers)
    for model in (settings.little_model, settings.big_model, *reversed(settings.gate_models)):
        if model in settings.loaded_at_start and model not in loaded:
            config = settings.gate_config if model == settings.holder else None
            set_loaded(client, model, True, config=config, headers=headers)


def _check_supported(config: GateConfig) -> None:
    """batch reproduces a two-stage, max-softmax, multi-class gate with w = 1; refuse any other (its
    answers would differ from the gate's)."""
    stages = config.stage_models
    if len(stages) != 2:
        raise BatchError(f"the gate serves {len(stages)} stages ({', '.join(stages)}); batch supports two (little, big)")
    for key, supported in (("signal", "max_softmax"), ("task", "multiclass"), ("ensemble_weight", 1.0)):
        value = getattr(config, key)
        if value != supported:
            raise BatchError(f"the gate's {key} is {value!r}; batch supports only {supported!r} (its answers "
                             "would differ from the gate's)")


def settings_from_server(url: str, data: Path, threshold: float | None, headers: dict[str, str] | None, gate: str = GATE_MODEL) -> JobSettings:
    with LittleBigClient(url, model=gate) as gate_client:
        if not gate_client.client.is_model_ready(gate):
            raise BatchError(f"the gate {gate!r} is not loaded on {url}: its config names the models and T; load it first")
        info = gate_client.gate_info()
        holder = gate_client.gate_model()
        config = gate_client.model_config(holder)
        loaded = loaded_models(gate_client.client, headers)
    _check_supported(GateConfig.from_parameters({k: v["string_value"] for k, v in config.get("parameters", {}).items()}))
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise BatchError(f"threshold must be in [0, 1], got {threshold}")
    return JobSettings(
        data=str(data.resolve()),
        threshold=info.threshold if threshold is None else float(threshold),
        wire_size=info.wire_size,
        crop_pct=info.crop_pct,
        num_classes=info.num_classes,
        little_model=info.little_model,
        big_model=info.big_model,
        gate_model=gate,
        loaded_at_start=tuple(sorted(loaded & {gate, holder, info.little_model, info.big_model})),
        gate_config=json.dumps(config),
        gate_step=holder if holder != gate else "",
    )


class PartialResults:
    """The answers so far, one JSON line per image and route, appended and flushed as chunks finish."""

    def __init__(self, path: Path, settings: JobSettings, answers: dict[str, dict[str, Answer]]):
        self.path = path
        self.settings = settings
        self.answers = answers  # route -> file -> answer

    @classmethod
    def open(cls, path: Path, new_settings: Callable[[], JobSettings], threshold: float | None) -> "PartialResults":
        if not path.is_file():
            settings = new_settings()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": dataclasses.asdict(settings)}) + "\n")
            return cls(path, settings, {route: {} for route in ROUTES})
        lines = path.read_text().splitlines()
        try:
            raw = json.loads(lines[0])["settings"]
            settings = JobSettings(**{**raw, "loaded_at_start": tuple(raw["loaded_at_start"])})
        except (IndexError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise BatchError(f"{path} is not a batch job's partial results ({err!r}); remove it to start over") from None
        if threshold is not None and threshold != settings.threshold:
            raise BatchError(f"{path} holds a job at T={settings.threshold}, not {threshold}; remove it to start over")
        answers = {route: {} for route in ROUTES}
        kept = len(lines)
        for number, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    kept -= 1  # the last line was cut by the interruption; that chunk is asked again
                    break
                raise BatchError(f"{path} line {number} is not JSON; remove the file to start over") from None
            answers[row["route"]][row["file"]] = Answer(int(row["class"]), float(row["confidence"]))
        if kept < len(lines) or not path.read_bytes().endswith(b"\n"):
            # New rows are appended: first drop the cut line and end the last whole one.
            path.write_text("\n".join(lines[:kept]) + "\n")
        return cls(path, settings, answers)

    def add(self, route: str, files: list[str], probs: np.ndarray) -> None:
        confidence, label = probs.max(axis=1), probs.argmax(axis=1)
        rows = []
        for row, name in enumerate(files):
            answer = Answer(int(label[row]), float(confidence[row]))
            self.answers[route][name] = answer
            rows.append(json.dumps({"route": route, "file": name, "class": answer.class_index, "confidence": answer.confidence}))
        with open(self.path, "a") as handle:
            handle.write("\n".join(rows) + "\n")


async def infer_files(url: str, model: str, folder: Path, files: list[str], settings: JobSettings,
                       on_chunk: Callable[[list[str], np.ndarray], None], batch_size: int, concurrency: int) -> None:
    import tritonclient.grpc.aio as grpcaio

    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    client = grpcaio.InferenceServerClient(url)
    retrier = Retrier()  # a restarting server is asked again (client/retry.py)

    async def run_chunk(chunk: list[str]) -> None:
        async with gate:
            # Decoding is CPU work: off the event loop, so requests keep flowing.
            batch = await loop.run_in_executor(None, _wire, folder, chunk, settings)
            image = grpcaio.InferInput(IMAGE, list(batch.shape), "UINT8")
            image.set_data_from_numpy(batch)
            output = [grpcaio.InferRequestedOutput(PROBS)]
            result = await retrier.call_async(lambda: client.infer(model, [image], outputs=output), f"inference on {model}")
            on_chunk(chunk, result.as_numpy(PROBS))

    try:
        await asyncio.gather(*(run_chunk(files[s : s + batch_size]) for s in range(0, len(files), batch_size)))
    finally:
        await client.close()


def _wire(folder: Path, files: list[str], settings: JobSettings) -> np.ndarray:
    try:
        return to_wire_batch([folder / name for name in files], settings.wire_size, settings.crop_pct)
    except (OSError, ValueError) as err:
        raise BatchError(f"cannot read an image of {files}: {err}") from None


def write_csv(out: Path, files: list[str], partial: PartialResults, labels: list[str]) -> int:
    """The predictions CSV in file order; returns how many images big answered."""
    escalated = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class", "label", "confidence", "route"])
        for name in files:
            little = partial.answers["little"][name]
            route = "big" if little.confidence < partial.settings.threshold else "little"
            answer = partial.answers[route][name]
            escalated += route == "big"
            writer.writerow([name, answer.class_index, labels[answer.class_index], repr(answer.confidence), route])
    tmp.replace(out)
    return escalated


def _run_pass(url: str, route: str, folder: Path, files: list[str], partial: PartialResults, *,
              batch_size: int, concurrency: int, show_progress: bool, progress: Callable[[int], None] | None) -> PassWindow:
    from tqdm import tqdm

    settings = partial.settings
    model = settings.little_model if route == "little" else settings.big_model
    start = time.monotonic()
    with tqdm(total=len(files), desc=f"pass {ROUTES.index(route) + 1} ({model})", unit="img", disable=not show_progress) as bar:
        def on_chunk(chunk: list[str], probs: np.ndarray) -> None:
            partial.add(route, chunk, probs)
            bar.update(len(chunk))
            if progress is not None:
                progress(len(chunk))

        asyncio.run(infer_files(url, model, folder, files, settings, on_chunk, batch_size, concurrency))
    return PassWindow(model, start, time.monotonic(), len(files))


def run_batch(
    url: str,
    data: str | Path,
    out: str | Path,
    *,
    threshold: float | None = None,
    labels: str | Path | None = None,
    batch_size: int = 16,
    concurrency: int = 4,
    show_progress: bool = True,
    headers: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> BatchResult:
    """Classify every image under ``data`` with the cascade in two passes; write ``out`` (CSV).

    ``url`` is the server's gRPC address. T is the served gate's unless ``threshold`` is given.
    ``headers`` go with every load/unload (default: the admin key stored for ``url``, see client/admin.py).
    ``progress`` is called with the number of images of each answered chunk.
    """
    from tritonclient.utils import InferenceServerException

    from littlebig.admin import admin_headers

    headers = admin_headers(url) if headers is None else headers  # load/unload are admin calls
    try:
        return _run_batch(url, Path(data), Path(out), threshold, labels, batch_size, concurrency, show_progress, headers, progress)
    except InferenceServerException as err:
        raise BatchError(f"server {url}: {err}") from None


def served_labels(gate_config: str | None) -> ClassLabels | None:
    """The model's own labels, from the gate config the job recorded (the gate may be unloaded now)."""
    params = json.loads(gate_config).get("parameters", {}) if gate_config else {}
    return ClassLabels.from_json(params["labels"]["string_value"]) if "labels" in params else None


def _run_batch(url, folder: Path, out: Path, threshold, labels, batch_size, concurrency, show_progress, headers, progress) -> BatchResult:
    from littlebig.labels import load_labels

    if batch_size < 1 or concurrency < 1:
        raise BatchError("batch size and concurrency must be >= 1")
    files = [str(p.relative_to(folder)) for p in list_images(folder)]
    if not files:
        raise BatchError(f"no images found under {folder}")
    partial = PartialResults.open(out.with_name(out.name + ".partial.jsonl"),
                                  lambda: settings_from_server(url, folder, threshold, headers), threshold)
    settings = partial.settings
    if settings.data != str(folder.resolve()):
        raise BatchError(f"{partial.path} belongs to a job over {settings.data}, not {folder.resolve()}")
    names = load_labels(labels, settings.num_classes, served_labels(settings.gate_config))
    options = dict(batch_size=batch_size, concurrency=concurrency, show_progress=show_progress, progress=progress)
    inferred = {route: 0 for route in ROUTES}
    windows = []
    with grpcclient.InferenceServerClient(url) as client:
        try:
            for route in ROUTES:
                todo = [f for f in files if f not in partial.answers[route]]
                if route == "big":
                    little = partial.answers["little"]
                    todo = [f for f in todo if little[f].confidence < settings.threshold]
                if not todo:
                    continue
                keep_only(client, settings, settings.little_model if route == "little" else settings.big_model, headers)
                windows.append(_run_pass(url, route, folder, todo, partial, **options))
                inferred[route] = len(todo)
            escalated = write_csv(out, files, partial, names)
        finally:
            # Interrupted or not, the server goes back to serving; a rerun switches again and resumes.
            restore(client, settings, headers)
    partial.path.unlink()
    return BatchResult(out, len(files), escalated, inferred, windows)
