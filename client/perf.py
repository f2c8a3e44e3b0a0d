"""perf_analyzer, run as a subprocess: its binary and environment, real images as its input data,
one measurement, and its CSV read back as a PerfResult."""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from littlebig.contract import IMAGE
from littlebig.errors import UserError

from .retry import RETRY_MESSAGES, Retrier


class BenchmarkError(UserError):
    pass


def perf_analyzer_command() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary and the environment it needs (libcudart.so.12 on the library path)."""
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(binary).is_file():
        raise BenchmarkError(
            "perf_analyzer not found: it ships in the tritonclient==2.48.0 wheel (pip install "
            "'tritonclient[all]==2.48.0'; scripts/setup.sh does this) and needs Debian's libb64-0d"
        )
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # pip nvidia-cuda-runtime-cu12: perf_analyzer links against CUDA

        lib = str(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = lib + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    except ImportError:
        pass
    return binary, env


def write_input_data(images: np.ndarray, path: Path, escalates: np.ndarray | None = None, draws: int = 256,
                     seed: int = 0) -> Path:
    """perf_analyzer --input-data JSON: ``draws`` images drawn at random from ``images`` (with replacement),
    raw bytes in base64. run_perf_analyzer's one context sends the entries in order from the first, so a
    run sends a prefix of them. With ``escalates`` (each image's route at the benchmarked T) the sequence
    is balanced: every prefix of n entries holds the data's share of escalating images to within one
    image, each drawn at random from its kind (a random prefix can hold an easier mix than the data's)."""
    encoded = [base64.b64encode(np.ascontiguousarray(img).tobytes()).decode() for img in images]
    rng = np.random.default_rng(seed)
    size = max(draws, len(images))
    if escalates is None or not 0 < np.mean(escalates) < 1:
        order = rng.integers(0, len(images), size=size)
    else:
        share, up, down = float(np.mean(escalates)), np.flatnonzero(escalates), np.flatnonzero(~np.asarray(escalates, bool))
        steps = np.floor(np.arange(1, size + 1) * share) - np.floor(np.arange(size) * share)
        order = np.where(steps > 0, rng.choice(up, size=size), rng.choice(down, size=size))
    path.write_text(json.dumps({"data": [{IMAGE: {"b64": encoded[i]}} for i in order]}))
    return path


@dataclasses.dataclass
class PerfResult:
    model: str
    concurrency: int
    throughput: float  # inferences (images) per second
    p50_ms: float
    p99_ms: float
    p90_ms: float
    server_queue_ms: float
    server_compute_ms: float


def run_perf_analyzer(
    model: str,
    url: str,
    input_data: Path,
    shape: tuple[int, ...],
    concurrency: int,
    csv_path: Path,
    *,
    measurement_ms: int = 4000,
    batch_size: int = 1,
) -> PerfResult:
    def once(window_ms: int) -> PerfResult:
        # A server that restarts meanwhile is measured again once it answers (client/retry.py); the bench
        # has talked to it before this run.
        try:
            return Retrier(reached=True).call(lambda: _perf_analyzer_once(model, url, input_data, shape, concurrency, csv_path, window_ms, batch_size),
                                  f"perf_analyzer on {model}")
        except ConnectionError as err:
            raise BenchmarkError(str(err)) from None

    try:
        return once(measurement_ms)
    except BenchmarkError as err:
        # Deep queues on a busy machine can miss perf_analyzer's stability test; a longer window helps.
        if "stable measurement" not in str(err):
            raise
        return once(2 * measurement_ms)


def _perf_analyzer_once(model, url, input_data, shape, concurrency, csv_path, measurement_ms, batch_size) -> PerfResult:
    binary, env = perf_analyzer_command()
    cmd = [
        binary, "-m", model, "-u", url, "-i", "grpc",
        "--input-data", str(input_data), "--shape", "IMAGE:" + ",".join(map(str, shape)),
        "-b", str(batch_size), "--concurrency-range", f"{concurrency}:{concurrency}",
        # One sending thread, all requests in flight on its one context: they take the entries in order.
        # By default (sync) thread t of c sends only entries t, t + c, t + 2c, ... (r24.07 infer_context.cc),
        # so the threads holding escalating entries run slow and send fewer: 0.02 escalated of 0.125.
        "--async", "--max-threads", "1",
        "--measurement-interval", str(measurement_ms), "--stability-percentage", "25", "--max-trials", "8",
        "-f", str(csv_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and any(text in (proc.stdout + proc.stderr).lower() for text in (*RETRY_MESSAGES, "unavailable")):
        raise ConnectionError(f"perf_analyzer could not reach {url}: {(proc.stdout + proc.stderr).strip().splitlines()[-1][:200]}")
    if proc.returncode != 0:
        raise BenchmarkError(f"perf_analyzer failed on {model} at concurrency {concurrency}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return parse_csv(model, csv_path)


def median_result(results: list[PerfResult]) -> PerfResult:
    """Field-wise medians of repeated runs of one model at one concurrency."""
    fields = {f.name: statistics.median(getattr(r, f.name) for r in results) for f in dataclasses.fields(PerfResult) if f.name not in ("model", "concurrency")}
    return PerfResult(model=results[0].model, concurrency=results[0].concurrency, **fields)


def parse_csv(model: str, path: Path) -> PerfResult:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise BenchmarkError(f"perf_analyzer wrote no results to {path}")
    row = rows[0]
    us = lambda key: float(row[key]) / 1000.0  # noqa: E731 (perf_analyzer reports microseconds)
    return PerfResult(
        model=model,
        concurrency=int(row["Concurrency"]),
        throughput=float(row["Inferences/Second"]),
        p50_ms=us("p50 latency"),
        p99_ms=us("p99 latency"),
        p90_ms=us("p90 latency"),
        server_queue_ms=us("Server Queue"),
        server_compute_ms=us("Server Compute Infer"),
    )
