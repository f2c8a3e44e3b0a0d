"""What the audit costs: the gate's throughput with the audit at ``--rate`` against the same gate without
it, side by side on one server, and the big rows it adds.

One repository (EfficientNet-Lite0 -> Lite2, little in the gate) with the audit on; beside its ensemble
`littlebig`, a copy `littlebig_off` whose gate is the same but for audit_rate 0 (both share little's ONNX
file and big). Closed-loop asyncio gRPC clients (client/closed_loop.py, one random photo per request) at
``--concurrency``, ``--rounds`` rounds, the order rotating per round; the ratio printed is the median of
the per-round ratios. The added cost: Triton's own count of big's rows (nv_inference_count) against the
escalated rows and the audited rows the gate counts, per run.

    flock /tmp/littlebig-cpu.lock .venv/bin/python bench/audit_cost.py --little runs/lite/little.onnx \\
        --big runs/lite/big.onnx --data ../shared/data/imagenet-sample --threshold 0.36 \\
        --out bench/results/audit/cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio

from littlebig.client.closed_loop import closed_loop, image_inputs
from littlebig.client.images import list_images, to_wire_batch
from littlebig.client.infer import LittleBigClient
from littlebig.client.metrics import read_samples, sample_sum
from littlebig.contract import GATE_MODEL, GATE_STEP_MODEL, ROUTE, GateConfig
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.configs import _parameters, read_config, write_config
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer

OFF, OFF_GATE = "littlebig_off", "gate_off"
VARIANTS = {"audit": (GATE_MODEL, GATE_STEP_MODEL), "off": (OFF, OFF_GATE)}


def add_off(repository: Path) -> None:
    """The ensemble littlebig_off -> gate_off: the gate's config with audit_rate 0."""
    shutil.copytree(repository / GATE_STEP_MODEL, repository / OFF_GATE)
    config = read_config(repository / OFF_GATE / "config.pbtxt")
    config.name = OFF_GATE
    settings = GateConfig.from_parameters({k: v.string_value for k, v in config.parameters.items()})
    config.ClearField("parameters")
    _parameters(config, dataclasses.replace(settings, audit_rate=0.0).parameters())
    write_config(repository / OFF_GATE, config)
    shutil.copytree(repository / GATE_MODEL, repository / OFF)
    ensemble = read_config(repository / OFF / "config.pbtxt")
    ensemble.name = OFF
    ensemble.ensemble_scheduling.step[-1].model_name = OFF_GATE
    write_config(repository / OFF, ensemble)


def counts(metrics_url: str, gate: str) -> dict:
    samples = read_samples(metrics_url, settle=True)
    time.sleep(1.5)  # the audit's counts reach /metrics every second
    samples = read_samples(metrics_url)
    return {"rows": sample_sum(samples, "littlebig_rows_total", model=gate),
            "escalated": sample_sum(samples, "littlebig_rows_total", model=gate, route="big"),
            "audited": sample_sum(samples, "littlebig_audit_rows_total", model=gate),
            # prometheus_client names a counter's samples NAME_total, whatever Triton calls them.
            "big_rows": sample_sum(samples, "nv_inference_count_total", model="big")}


def measure(url: str, metrics_url: str, inputs, concurrency: int, rounds: int, seconds: float) -> dict:
    outputs = [grpcaio.InferRequestedOutput(ROUTE)]
    runs = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        for variant in order[r % 2:] + order[: r % 2]:
            model, gate = VARIANTS[variant]

            async def send(client, image, model=model):
                return int((await client.infer(model, [image], outputs=outputs)).as_numpy(ROUTE)[0, 0])

            before = counts(metrics_url, gate)
            answers = closed_loop(url, send, inputs, concurrency, seconds, seed=r)
            after = counts(metrics_url, gate)
            delta = {k: after[k] - before[k] for k in after}
            runs[variant].append({"throughput": len(answers) / seconds, "p50_ms": float(np.median([a.latency_ms for a in answers])),
                                  **delta})
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{v} {runs[v][-1]['throughput']:.2f}/s" for v in VARIANTS), flush=True)
    return runs


def summarise(runs: dict, rate: float) -> dict:
    ratios = [a["throughput"] / b["throughput"] for a, b in zip(runs["audit"], runs["off"])]
    audit = {k: sum(run[k] for run in runs["audit"]) for k in ("rows", "escalated", "audited", "big_rows")}
    p = audit["escalated"] / audit["rows"]
    return {
        "throughput_audit_over_off_median": statistics.median(ratios), "throughput_ratios": ratios,
        "throughput": {v: statistics.median(run["throughput"] for run in runs[v]) for v in runs},
        "p50_ms": {v: statistics.median(run["p50_ms"] for run in runs[v]) for v in runs},
        "escalation": p, "audited_per_row": audit["audited"] / audit["rows"], "rate_times_kept": rate * (1 - p),
        # Big's rows beyond the escalated ones, per row served: the audit's cost in units of big's MACs.
        "extra_big_rows_per_row": (audit["big_rows"] - audit["escalated"]) / audit["rows"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--threshold", type=float, default=0.36)
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        options = RepositoryOptions(threshold=args.threshold, audit_rate=args.rate)
        repo = build_repository(args.little, args.big, Path(tmp) / "repository", options)
        add_off(repo)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            with LittleBigClient(server.grpc_url) as client:
                info = client.gate_info()
            images = to_wire_batch(list_images(args.data)[: args.images], info.wire_size, info.crop_pct)
            runs = measure(server.grpc_url, server.metrics_url, image_inputs(images), args.concurrency, args.rounds, args.seconds)
    result = {"threshold": args.threshold, "rate": args.rate, "concurrency": args.concurrency, "rounds": args.rounds,
              "seconds_per_run": args.seconds, "images": len(images), "wall_s": time.time() - started, **summarise(runs, args.rate)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
