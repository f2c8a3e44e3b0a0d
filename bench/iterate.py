"""Build the demo repository with given options, serve it, and benchmark one concurrency.

Usage: python bench/iterate.py --threshold T --concurrency 16 [--gate-instances 2] [--big-nice 10] ...
A development aid for comparing repository settings side by side on this machine.
"""
import argparse
import dataclasses
import json
from pathlib import Path

from littlebig.client.benchmark import bench
from littlebig.model_repository.builder import RepositoryOptions, build_repository
from littlebig.server import TritonServer

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", default="runs/demo")
parser.add_argument("--data", default="../shared/data/imagenet-sample")
parser.add_argument("--threshold", type=float, required=True)
parser.add_argument("--concurrency", default="16")
parser.add_argument("--out", default="runs/iterate")
parser.add_argument("--measurement-ms", type=int, default=3000)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--latency-seconds", type=float, default=4.0)
parser.add_argument("--latency-rounds", type=int, default=1)
for field in dataclasses.fields(RepositoryOptions):
    if field.name not in ("threshold", "runtime"):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
args = parser.parse_args()
options = RepositoryOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RepositoryOptions) if f.name != "runtime"})
work = Path(args.workdir)
repo = build_repository(work / "little.onnx", work / "big.onnx", Path(args.out) / "repository", options)
with TritonServer(repo, log_file=Path(args.out) / "server.log") as server:
    report = bench(server.grpc_url, args.data, args.out, concurrencies=[int(c) for c in args.concurrency.split(",")],
                   metrics_url=server.metrics_url, measurement_ms=args.measurement_ms, rounds=args.rounds,
                   latency_seconds=args.latency_seconds, latency_rounds=args.latency_rounds)
print(json.dumps({"options": dataclasses.asdict(options), "at_big_peak": report["at_big_peak"], "latency": report["latency"]}))
