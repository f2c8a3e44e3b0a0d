"""Benchmark the served cascade against its own models with Triton's perf_analyzer.

For each concurrency: throughput and latency of `big` alone, `little` alone and the gate, measured
side by side on the same server and the same images; the escalation share p during the gate's run
(from the gate's metrics); the ideal speedup S* = c_big / (c_little + p * c_big) with c = 1 / served
throughput of each model alone; and the achieved fraction (gate / big) / S*.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np

from littlebig.contract import ROUTE
from littlebig.gate.config import ladder_text

from .control import switch_threshold
from .gate_cost import measure_gate_cost
from .images import list_images, to_wire_batch
from .infer import GATE_MODEL, LittleBigClient
from .latency import route_latency_comparison
from .metrics import gate_rows
from .perf import BenchmarkError, median_result, run_perf_analyzer, write_input_data

__all__ = ["BenchmarkError", "bench", "ideal_speedup"]


def data_routes(url: str, images, threshold: float) -> np.ndarray:
    """Whether the gate sends each of ``images`` to big at ``threshold`` (its answers' ROUTE)."""
    with LittleBigClient(url) as client:
        routes = [client.infer(images[i : i + 16], threshold=threshold, outputs=[ROUTE])[ROUTE][:, 0] for i in range(0, len(images), 16)]
    return np.concatenate(routes) != 0


def mix_tolerance(share: float, rows: int) -> float:
    """How far a served escalation share may sit from the data's by chance: three standard errors of a
    share over ``rows`` random draws, and at least 0.02."""
    return max(0.02, 3.0 * math.sqrt(share * (1.0 - share) / max(rows, 1)))


def summarise(concurrency: int, runs: dict, data: float) -> dict:
    """One concurrency level: medians over rounds of each model's figures and of the per-round ratios, and
    the served escalation share against the data's ``data`` (within mix_tolerance, or said)."""
    per_round = []
    for big, little, gate, share in zip(runs["big"], runs["little"], runs["gate"], runs["share"]):
        s_star = ideal_speedup(little.throughput, big.throughput, share)
        achieved = gate.throughput / big.throughput
        per_round.append({"escalation": share, "ideal_speedup": s_star, "achieved_speedup": achieved,
                          "achieved_fraction": achieved / s_star, "gate_vs_little": gate.throughput / little.throughput,
                          "ideal_throughput": s_star * big.throughput})
    row = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    tolerance = mix_tolerance(data, min(runs["rows"]))
    row.update(
        data_escalation=data,
        mix_tolerance=tolerance,
        mix_as_data=abs(row["escalation"] - data) <= tolerance,
        concurrency=concurrency,
        rounds=len(per_round),
        big=dataclasses.asdict(median_result(runs["big"])),
        little=dataclasses.asdict(median_result(runs["little"])),
        gate=dataclasses.asdict(median_result(runs["gate"])),
        per_round=per_round,
        throughput_per_round={k: [x.throughput for x in runs[k]] for k in ("big", "little", "gate")},
    )
    return row


def ideal_speedup(little_throughput: float, big_throughput: float, share: float) -> float:
    """S* = c_big / (c_little + p * c_big), with c = 1 / throughput of each model served alone."""
    c_little, c_big = 1.0 / little_throughput, 1.0 / big_throughput
    return c_big / (c_little + share * c_big)


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
    gate_cost_batches: tuple[int, ...] = (1, 8, 32),
    log=print,
) -> dict:
    """Measure big, little and the gate at each concurrency; write bench.json, a table and plots. Then, at T = 0, the
    gate's own cost: its time per execution at ``gate_cost_batches`` and the latency it adds to little alone at c = 1."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info, original_gears, images = _served_and_images(url, data, n_images)
    little_model = info.little_model
    if threshold is not None:
        switch_threshold(url, threshold)
    t = info.threshold if threshold is None else threshold
    try:
        escalates = data_routes(url, images, t)
        data = float(np.mean(escalates))
        input_data = write_input_data(images, out / "input_data.json", escalates)
        log(f"benchmarking on {len(images)} images (escalation share of the data at T: {data:.3f}), T={t:.6f}, "
            f"concurrency {concurrencies}")
        runs = measure_rounds(url, (little_model, info.big_model), input_data, (info.wire_size, info.wire_size, 3),
                              concurrencies, rounds, measurement_ms, metrics_url, out, log)
        rows = [summarise(c, runs[c], data) for c in concurrencies]
        for row in rows:
            log(format_row(row))
        peak = max(rows, key=lambda r: r["big"]["throughput"])
        latency = route_latency_comparison(url, little_model, images, peak["concurrency"], latency_seconds, latency_rounds,
                                           log)
        costs = [measure_gate_cost(url, little_model, images, b, metrics_url=metrics_url) for b in gate_cost_batches]
        switch_threshold(url, 0.0)
        added = route_latency_comparison(url, little_model, images, 1, latency_seconds, latency_rounds, log)
    finally:
        switch_threshold(url, info.threshold, gears=original_gears)

    report = _report(info, t, len(images), peak, latency, costs, added, rows)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_bench(out, rows)
    log_summary(peak, latency, costs, added, log)
    return report


def _served_and_images(url: str, data: str | Path, n_images: int):
    """The gate's facts, the gears ladder to restore after a switch of T, and the images in the wire format."""
    with LittleBigClient(url) as client:
        info = client.gate_info()
        # A ladder made for the served T is dropped by a switch to another T: restored with it at the end.
        served = client.gate_config().gears
    paths = list_images(data)[:n_images]
    if not paths:
        raise BenchmarkError(f"no images under {data}")
    return info, (ladder_text(served) if served else None), to_wire_batch(paths, info.wire_size, info.crop_pct)


def _report(info, threshold: float, images: int, peak: dict, latency, costs, added, rows: list[dict]) -> dict:
    """bench.json: the runs, the figures at big's peak and the gate's own cost."""
    return {
        "threshold": threshold,
        "images": images,
        "macs_little": info.macs_little,
        "macs_big": info.macs_big,
        "big_peak_concurrency": peak["concurrency"],
        "at_big_peak": {key: peak[key] for key in ("ideal_speedup", "achieved_fraction", "gate_vs_little", "escalation")},
        "latency": latency,
        "gate_cost": {
            "own_ms_per_execution": [dataclasses.asdict(cost) for cost in costs],
            "added_latency_c1_at_T0": added,
        },
        "runs": rows,
    }


def measure_rounds(url: str, models: tuple[str, str], input_data: Path, shape: tuple[int, ...], concurrencies: list[int],
                   rounds: int, measurement_ms: int, metrics_url: str, out: Path, log) -> dict:
    """perf_analyzer runs of big, little and the gate at every concurrency, and the gate's escalation share.
    Rounds outside, concurrencies inside: this machine's speed drifts over minutes, so every round measures
    big, little and the gate back to back at every level, ratios are taken within a round, and the report
    gives medians over rounds."""
    little_model, big_model = models
    runs = {c: {"big": [], "little": [], "gate": [], "share": [], "rows": []} for c in concurrencies}
    for r in range(rounds):
        for c in concurrencies:
            tag = f"c{c}_r{r}"
            runs[c]["big"].append(run_perf_analyzer(big_model, url, input_data, shape, c, out / f"big_{tag}.csv", measurement_ms=measurement_ms))
            runs[c]["little"].append(run_perf_analyzer(little_model, url, input_data, shape, c, out / f"little_{tag}.csv", measurement_ms=measurement_ms))
            before = gate_rows(metrics_url)
            runs[c]["gate"].append(run_perf_analyzer(GATE_MODEL, url, input_data, shape, c, out / f"gate_{tag}.csv", measurement_ms=measurement_ms))
            after = gate_rows(metrics_url)
            routed_big, routed_little = after["big"] - before["big"], after["little"] - before["little"]
            runs[c]["share"].append(routed_big / max(1.0, routed_big + routed_little))
            runs[c]["rows"].append(routed_big + routed_little)
            log(f"round {r + 1}/{rounds} c={c}: big {runs[c]['big'][-1].throughput:.1f}/s, little "
                f"{runs[c]['little'][-1].throughput:.1f}/s, gate {runs[c]['gate'][-1].throughput:.1f}/s, served escalation "
                f"share {runs[c]['share'][-1]:.3f}")
    return runs


def log_summary(peak: dict, latency: dict, costs: list, added: dict, log) -> None:
    c = peak["concurrency"]
    log(
        f"at big's peak (concurrency {c}): p={peak['escalation']:.3f}, S*={peak['ideal_speedup']:.2f}, "
        f"achieved {peak['achieved_speedup']:.2f}x = {peak['achieved_fraction']:.1%} of S*, gate/little {peak['gate_vs_little']:.2f}"
    )
    log(
        f"p50 latency at concurrency {c}: little-answered via gate {latency['gate_little_answered_p50_ms']:.1f} ms, "
        f"little alone {latency['little_alone_p50_ms']:.1f} ms (excess, median of per-round differences: "
        f"{latency['excess_ms']:+.1f} ms), big-answered via gate {latency['gate_big_answered_p50_ms']:.1f} ms"
    )
    log("gate's own time per execution (T=0, Triton statistics): " + ", ".join(
        f"batch {cost.batch_size} {cost.own_ms:.2f} ms (little {cost.little_ms:.2f} ms)" for cost in costs))
    log(f"latency the gate adds to little alone at concurrency 1, T=0: {added['excess_ms']:+.2f} ms "
        f"(median of {added['rounds']} alternating rounds; p50 {added['gate_little_answered_p50_ms']:.1f} vs "
        f"{added['little_alone_p50_ms']:.1f} ms)")


def format_row(row: dict) -> str:
    return (
        f"c={row['concurrency']:>3}  big {row['big']['throughput']:7.1f}/s  little {row['little']['throughput']:7.1f}/s  "
        f"gate {row['gate']['throughput']:7.1f}/s  p={row['escalation']:.3f} (data {row['data_escalation']:.3f}"
        f"{'' if row['mix_as_data'] else ', OUTSIDE the tolerance ' + format(row['mix_tolerance'], '.3f')})  S*={row['ideal_speedup']:.2f}  "
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
