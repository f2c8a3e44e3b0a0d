"""Benchmark the served cascade against its own models with Triton's perf_analyzer.

For each concurrency: throughput and latency of `big` alone, `little` alone and the gate, measured
side by side on the same server and the same images; the escalation share p during the gate's run
(from the gate's metrics); the ideal speedup S* = c_big / (c_little + p * c_big) with c = 1 / served
throughput of each model alone; and the achieved fraction (gate / big) / S*.
"""

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
import urllib.request
from pathlib import Path

import numpy as np

from .infer import GATE_MODEL


class BenchmarkError(RuntimeError):
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


def write_input_data(images: np.ndarray, path: Path) -> Path:
    """perf_analyzer --input-data JSON: one entry per image (used round-robin), raw bytes in base64."""
    entries = [{"IMAGE": {"b64": base64.b64encode(np.ascontiguousarray(img).tobytes()).decode()}} for img in images]
    path.write_text(json.dumps({"data": entries}))
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
    composing: str | None = None,
) -> PerfResult:
    try:
        return _perf_analyzer_once(model, url, input_data, shape, concurrency, csv_path, measurement_ms, batch_size, composing)
    except BenchmarkError as err:
        # Deep queues on a busy machine can miss perf_analyzer's stability test; a longer window helps.
        if "stable measurement" not in str(err):
            raise
        return _perf_analyzer_once(model, url, input_data, shape, concurrency, csv_path, 2 * measurement_ms, batch_size, composing)


def _perf_analyzer_once(model, url, input_data, shape, concurrency, csv_path, measurement_ms, batch_size, composing) -> PerfResult:
    binary, env = perf_analyzer_command()
    cmd = [
        binary, "-m", model, "-u", url, "-i", "grpc",
        "--input-data", str(input_data), "--shape", "IMAGE:" + ",".join(map(str, shape)),
        "-b", str(batch_size), "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-interval", str(measurement_ms), "--stability-percentage", "25", "--max-trials", "8",
        "-f", str(csv_path),
    ]
    if composing:
        cmd += ["--bls-composing-models", composing]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise BenchmarkError(f"perf_analyzer failed on {model} at concurrency {concurrency}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return parse_csv(model, csv_path)


def run_gate(url: str, input_data: Path, shape, concurrency: int, csv_path: Path, measurement_ms: int, composing: str) -> PerfResult:
    try:
        return run_perf_analyzer(GATE_MODEL, url, input_data, shape, concurrency, csv_path, measurement_ms=measurement_ms, composing=composing)
    except BenchmarkError as err:
        # perf_analyzer's per-child statistics fail when a composing model ran no request in the
        # window (big at T=0); the gate's own figures do not need them.
        if "failed to find the requested model version" not in str(err):
            raise
        return run_perf_analyzer(GATE_MODEL, url, input_data, shape, concurrency, csv_path, measurement_ms=measurement_ms)


def summarise(concurrency: int, runs: dict) -> dict:
    """One concurrency level: medians over rounds of each model's figures and of the per-round ratios."""
    per_round = []
    for big, little, gate, share in zip(runs["big"], runs["little"], runs["gate"], runs["share"]):
        s_star = ideal_speedup(little.throughput, big.throughput, share)
        achieved = gate.throughput / big.throughput
        per_round.append({"escalation": share, "ideal_speedup": s_star, "achieved_speedup": achieved,
                          "achieved_fraction": achieved / s_star, "gate_vs_little": gate.throughput / little.throughput,
                          "ideal_throughput": s_star * big.throughput})
    row = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    row.update(
        concurrency=concurrency,
        rounds=len(per_round),
        big=dataclasses.asdict(median_result(runs["big"])),
        little=dataclasses.asdict(median_result(runs["little"])),
        gate=dataclasses.asdict(median_result(runs["gate"])),
        per_round=per_round,
        throughput_per_round={k: [x.throughput for x in runs[k]] for k in ("big", "little", "gate")},
    )
    return row


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


def scrape_rows(metrics_url: str) -> dict[str, float]:
    """The gate's littlebig_rows_total by route."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    rows = {"little": 0.0, "big": 0.0}
    for line in text.splitlines():
        if line.startswith("littlebig_rows_total{"):
            route = line.split('route="')[1].split('"')[0]
            rows[route] += float(line.rsplit(" ", 1)[1])
    return rows


def ideal_speedup(little_throughput: float, big_throughput: float, share: float) -> float:
    """S* = c_big / (c_little + p * c_big), with c = 1 / throughput of each model served alone."""
    c_little, c_big = 1.0 / little_throughput, 1.0 / big_throughput
    return c_big / (c_little + share * c_big)


def route_latencies(
    url: str, model: str, images: np.ndarray, concurrency: int, seconds: float, warmup: float = 1.0
) -> dict[int, list[float]]:
    """Closed-loop clients (``concurrency`` of them, one image per request) for ``warmup`` +
    ``seconds``; latency in ms of the requests sent after the warm-up (all clients start at once,
    so the first ones see a burst), grouped by the ROUTE each answer reports (-1 for a model without
    ROUTE). perf_analyzer cannot split latency by route. One asyncio loop keeps the client's own
    CPU use small."""
    import asyncio

    import tritonclient.grpc.aio as grpcaio

    async def run() -> dict[int, list[float]]:
        client = grpcaio.InferenceServerClient(url)
        try:
            metadata = await client.get_model_metadata(model)
            has_route = any(o.name == "ROUTE" for o in metadata.outputs)
            output = grpcaio.InferRequestedOutput("ROUTE" if has_route else "PROBS")
            inputs = []
            for img in images:
                tensor = grpcaio.InferInput("IMAGE", [1, *img.shape], "UINT8")
                tensor.set_data_from_numpy(img[None])
                inputs.append(tensor)
            by_route: dict[int, list[float]] = {}
            loop = asyncio.get_running_loop()
            recording = loop.time() + warmup
            deadline = recording + seconds

            async def worker(offset: int) -> None:
                i = offset
                while loop.time() < deadline:
                    start = loop.time()
                    result = await client.infer(model, [inputs[i % len(inputs)]], outputs=[output])
                    latency = (loop.time() - start) * 1000.0
                    route = int(result.as_numpy("ROUTE")[0, 0]) if has_route else -1
                    if start >= recording:
                        by_route.setdefault(route, []).append(latency)
                    i += concurrency

            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            return by_route
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except Exception as err:  # a benchmark with failed requests is not valid
        raise BenchmarkError(f"a request failed during the latency probe of {model}: {err}") from err


def median_of(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def alternating_probes(
    url: str, models: list[str], images: np.ndarray, concurrency: int, seconds: float, rounds: int, log=None
) -> dict[str, list[dict[int, list[float]]]]:
    """Probe every model back to back, ``rounds`` times, the order reversed on odd rounds (this
    machine's speed drifts, so models are compared within a round). Per model, one
    :func:`route_latencies` result per round."""
    probes: dict[str, list[dict[int, list[float]]]] = {model: [] for model in models}
    for r in range(rounds):
        for model in models if r % 2 == 0 else models[::-1]:
            probes[model].append(route_latencies(url, model, images, concurrency, seconds))
        if log:
            p50s = (f"{m} {median_of([x for v in probes[m][-1].values() for x in v]):.1f} ms" for m in models)
            log(f"latency probe round {r + 1}/{rounds} at concurrency {concurrency}: p50 " + ", ".join(p50s))
    return probes


def route_latency_comparison(
    url: str, little_model: str, images: np.ndarray, concurrency: int, seconds: float, rounds: int, log=None
) -> dict:
    """p50 latency of little-answered gate requests against little alone, probed alternately. The
    excess is the median of the per-round differences, so drift between rounds cancels."""
    probes = alternating_probes(url, [GATE_MODEL, little_model], images, concurrency, seconds, rounds, log)
    gate, alone = probes[GATE_MODEL], probes[little_model]
    gate_little = [median_of(g.get(0, [])) for g in gate]
    gate_big = [median_of(g.get(1, [])) for g in gate]
    little_alone = [median_of(a.get(-1, [])) for a in alone]
    counts = {
        "gate_little": sum(len(g.get(0, [])) for g in gate),
        "gate_big": sum(len(g.get(1, [])) for g in gate),
        "little": sum(len(a.get(-1, [])) for a in alone),
    }
    return {
        "concurrency": concurrency,
        "gate_little_answered_p50_ms": median_of(gate_little),
        "gate_big_answered_p50_ms": median_of([x for x in gate_big if x == x]),
        "little_alone_p50_ms": median_of(little_alone),
        "excess_ms": median_of([g - a for g, a in zip(gate_little, little_alone)]),
        "per_round": {"gate_little_answered_p50_ms": gate_little, "little_alone_p50_ms": little_alone},
        "rounds": rounds,
        "requests": counts,
    }


def bench(
    url: str,
    data: str | Path,
    out: str | Path,
    *,
    concurrencies: list[int],
    metrics_url: str,
    n_images: int = 64,
    threshold: float | None = None,
    measurement_ms: int = 4000,
    latency_seconds: float = 8.0,
    latency_rounds: int = 3,
    rounds: int = 3,
    log=print,
) -> dict:
    """Measure big, little and the gate at each concurrency; write bench.json, a table and plots."""
    from .control import switch_threshold
    from .images import list_images, to_wire_batch
    from .infer import LittleBigClient

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with LittleBigClient(url) as client:
        info = client.gate_info()
    little_model, big_model = info.little_model, info.big_model
    paths = list_images(data)[:n_images]
    if not paths:
        raise BenchmarkError(f"no images under {data}")
    images = to_wire_batch(paths, info.wire_size, info.crop_pct)
    input_data = write_input_data(images, out / "input_data.json")
    shape = (info.wire_size, info.wire_size, 3)

    original = info.threshold
    if threshold is not None:
        switch_threshold(url, threshold)
    t = original if threshold is None else threshold
    try:
        log(f"benchmarking on {len(images)} images, T={t:.6f}, concurrency {concurrencies}")
        # Rounds outside, concurrencies inside: this machine's speed drifts over minutes, so every
        # round measures big, little and the gate back to back at every level, ratios are taken
        # within a round, and the report gives medians over rounds.
        runs = {c: {"big": [], "little": [], "gate": [], "share": []} for c in concurrencies}
        for r in range(rounds):
            for c in concurrencies:
                tag = f"c{c}_r{r}"
                runs[c]["big"].append(run_perf_analyzer(big_model, url, input_data, shape, c, out / f"big_{tag}.csv", measurement_ms=measurement_ms))
                runs[c]["little"].append(run_perf_analyzer(little_model, url, input_data, shape, c, out / f"little_{tag}.csv", measurement_ms=measurement_ms))
                before = scrape_rows(metrics_url)
                runs[c]["gate"].append(run_gate(url, input_data, shape, c, out / f"gate_{tag}.csv", measurement_ms, f"{little_model},{big_model}"))
                after = scrape_rows(metrics_url)
                routed_big, routed_little = after["big"] - before["big"], after["little"] - before["little"]
                runs[c]["share"].append(routed_big / max(1.0, routed_big + routed_little))
                log(f"round {r + 1}/{rounds} c={c}: big {runs[c]['big'][-1].throughput:.1f}/s, little "
                    f"{runs[c]['little'][-1].throughput:.1f}/s, gate {runs[c]['gate'][-1].throughput:.1f}/s")
        rows = [summarise(c, runs[c]) for c in concurrencies]
        for row in rows:
            log(format_row(row))

        peak = max(rows, key=lambda r: r["big"]["throughput"])
        c = peak["concurrency"]
        latency = route_latency_comparison(url, little_model, images, c, latency_seconds, latency_rounds, log)
    finally:
        if threshold is not None:
            switch_threshold(url, original)

    report = {
        "threshold": t,
        "images": len(images),
        "macs_little": info.macs_little,
        "macs_big": info.macs_big,
        "big_peak_concurrency": c,
        "at_big_peak": {
            "ideal_speedup": peak["ideal_speedup"],
            "achieved_fraction": peak["achieved_fraction"],
            "gate_vs_little": peak["gate_vs_little"],
            "escalation": peak["escalation"],
        },
        "latency": latency,
        "runs": rows,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_bench(out, rows)
    log(
        f"at big's peak (concurrency {c}): p={peak['escalation']:.3f}, S*={peak['ideal_speedup']:.2f}, "
        f"achieved {peak['achieved_speedup']:.2f}x = {peak['achieved_fraction']:.1%} of S*, gate/little {peak['gate_vs_little']:.2f}"
    )
    log(
        f"p50 latency at concurrency {c}: little-answered via gate {latency['gate_little_answered_p50_ms']:.1f} ms, "
        f"little alone {latency['little_alone_p50_ms']:.1f} ms (excess, median of per-round differences: "
        f"{latency['excess_ms']:+.1f} ms), big-answered via gate {latency['gate_big_answered_p50_ms']:.1f} ms"
    )
    return report


def format_row(row: dict) -> str:
    return (
        f"c={row['concurrency']:>3}  big {row['big']['throughput']:7.1f}/s  little {row['little']['throughput']:7.1f}/s  "
        f"gate {row['gate']['throughput']:7.1f}/s  p={row['escalation']:.3f}  S*={row['ideal_speedup']:.2f}  "
        f"achieved {row['achieved_speedup']:.2f} ({row['achieved_fraction']:.0%} of S*)  "
        f"p50 ms big/little/gate {row['big']['p50_ms']:.1f}/{row['little']['p50_ms']:.1f}/{row['gate']['p50_ms']:.1f}"
    )


def plot_bench(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (key, label), color in zip((("big", "big alone"), ("little", "little alone"), ("gate", "Little-Big gate")), ("C0", "C1", "C2")):
        thr = [r[key]["throughput"] for r in rows]
        axes[0].plot(conc, thr, marker="o", color=color, label=label)
        axes[1].plot(thr, [r[key]["p50_ms"] for r in rows], marker="o", color=color, label=f"{label} p50")
        axes[1].plot(thr, [r[key]["p99_ms"] for r in rows], marker="x", ls=":", color=color, label=f"{label} p99")
    ideal = [r["ideal_throughput"] for r in rows]  # median over rounds of S* x big
    axes[0].plot(conc, ideal, ls="--", color="grey", label="ideal gate (S* x big)")
    axes[0].set(xlabel="concurrency", ylabel="images / s", title="Throughput", xscale="log", xticks=conc, xticklabels=[str(c) for c in conc])
    axes[1].set(xlabel="images / s", ylabel="latency (ms)", title="Latency vs throughput")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
