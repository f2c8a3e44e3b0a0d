"""Reproduce the serving criteria of the EfficientNet-Lite0 -> Lite2 cascade on this machine.

Builds the repository from the demo's ONNX files (run `littlebig demo` first), serves it, calibrates
T on ../shared/data/imagenet-sample with --max-acc-drop 0, then:
  1. `bench` at the calibrated T over the concurrency levels, three interleaved rounds of big,
     little and the gate per level -> the concurrency where big alone peaks, (a) gate throughput /
     (S* x big), and (c) p50 latency of little-answered requests against little alone there
     (--latency-rounds alternating probes; the excess is the median of per-round differences);
  2. `bench` at T = 0 at that concurrency, three rounds -> (b) gate throughput / little alone.
Every figure is a median of three runs. Writes runs/criteria/criteria.json. Timings, not assertions.

    .venv/bin/python bench/criteria.py [--gate-instances 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from littlebig.client.benchmark import bench
from littlebig.client.calibrate import Criterion, calibrate
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.server import TritonServer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="folder with little.onnx and big.onnx")
    parser.add_argument("--data", default="../shared/data/imagenet-sample")
    parser.add_argument("--out", default="runs/criteria")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gate-instances", type=int, default=RepositoryOptions.gate_instances)
    parser.add_argument("--big-nice", type=int, default=RepositoryOptions.big_nice)
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--measurement-ms", type=int, default=3000)
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    out = Path(args.out)
    options = RepositoryOptions(runtime="python", gate_instances=args.gate_instances, big_nice=args.big_nice)
    repo = build_repository(Path(args.demo) / "little.onnx", Path(args.demo) / "big.onnx", out / "repository", options)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with TritonServer(repo, log_file=out / "tritonserver.log") as server:
        report = calibrate(server.grpc_url, args.data, out / "calibration", Criterion(max_acc_drop=0.0, point_estimate=True), apply=True)
        at_t = bench(server.grpc_url, args.data, out / "at_T", concurrencies=concurrencies, rounds=args.rounds,
                     metrics_url=server.metrics_url, measurement_ms=args.measurement_ms,
                     latency_rounds=args.latency_rounds, latency_seconds=args.latency_seconds)
        peak = at_t["big_peak_concurrency"]
        at_zero = bench(server.grpc_url, args.data, out / "at_T0", concurrencies=[peak], threshold=0.0, rounds=args.rounds,
                        metrics_url=server.metrics_url, measurement_ms=args.measurement_ms, latency_rounds=1)
    lat = at_t["latency"]
    medians = {
        "peak_concurrency": peak,
        "p": at_t["at_big_peak"]["escalation"],
        "ideal_speedup": at_t["at_big_peak"]["ideal_speedup"],
        "a_achieved_fraction_of_ideal": at_t["at_big_peak"]["achieved_fraction"],
        "b_gate_vs_little_at_T0": at_zero["at_big_peak"]["gate_vs_little"],
        "c_little_answered_p50_ms": lat["gate_little_answered_p50_ms"],
        "c_little_alone_p50_ms": lat["little_alone_p50_ms"],
        "c_excess_ms": lat["excess_ms"],
        "c_big_answered_p50_ms": lat["gate_big_answered_p50_ms"],
    }
    result = {
        "machine": "2-core CPU, tritonserver 2.51 from nvidia-pytriton, python-backend onnxruntime models",
        "threshold": report["threshold"],
        "calibration": {k: report[k] for k in ("escalation", "accuracy", "macs_reduction")},
        "options": {"gate_instances": args.gate_instances, "big_nice": args.big_nice},
        "rounds": args.rounds,
        "latency_rounds": args.latency_rounds,
        "medians": medians,
        "criteria": {
            "a_gate_ge_0.90_ideal": medians["a_achieved_fraction_of_ideal"] >= 0.90,
            "b_gate_ge_0.90_little_at_T0": medians["b_gate_vs_little_at_T0"] >= 0.90,
            "c_little_answered_p50_le_little_plus_2ms": medians["c_excess_ms"] <= 2.0,
        },
    }
    (out / "criteria.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": medians, "criteria": result["criteria"]}, indent=2))


if __name__ == "__main__":
    main()
