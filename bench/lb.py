"""Replicas behind nginx, one killed mid-run: what clients see, measured.

Two (or more) `littlebig serve` replicas behind nginx (HTTP and gRPC, retries with
`non_idempotent`) or HAProxy (`--proxy haproxy`: L7 retries, active readiness checks); closed-loop clients at the given concurrency over each protocol; after
`--before` seconds the first replica's tritonserver gets SIGKILL; `--down` seconds later it is
restarted on the same ports; the load goes on `--after` seconds once it is ready. Prints, per
protocol and phase, requests, errors, wrong answers, throughput and p50/p99 latency, and when nginx
sent the restarted replica traffic again.

    .venv/bin/python bench/lb.py --models runs/lite --data ../shared/data/imagenet-sample
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from littlebig.serving.balancer import balanced_replicas
from littlebig.serving.failover import PHASES, PROTOCOLS, expected_classes, format_report, kill_and_restart
from littlebig.client.images import list_images, to_wire_batch
from littlebig.model_repository.builder import build_repository
from littlebig.model_repository.facts import ModelFacts
from littlebig.model_repository.options import RepositoryOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="runs/demo", help="folder with little.onnx and big.onnx")
    parser.add_argument("--data", default="../shared/data/imagenet-sample")
    parser.add_argument("--images", type=int, default=32, help="distinct images the clients cycle through")
    parser.add_argument("--threshold", type=float, default=0.256272)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--proxy", choices=["nginx", "haproxy"], default="nginx")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per protocol")
    parser.add_argument("--before", type=float, default=10.0)
    parser.add_argument("--down", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=15.0)
    parser.add_argument("--out", default="runs/lb")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    models = Path(args.models)
    repo = build_repository(models / "little.onnx", models / "big.onnx", out / "repository",
                            RepositoryOptions(threshold=args.threshold))
    facts = ModelFacts.from_onnx(models / "little.onnx")
    images = to_wire_batch(list_images(args.data)[: args.images], facts.wire_size, facts.crop_pct)
    with balanced_replicas(repo, args.replicas, out, proxy=args.proxy) as (balancer, replicas):
        expected = expected_classes(f"127.0.0.1:{replicas[-1].ports.grpc}", images)
        report = kill_and_restart(balancer, replicas, images, expected, concurrency=args.concurrency,
                                  before_s=args.before, down_s=args.down, after_s=args.after)
    print(format_report(report))
    figures = {p: {ph: dataclasses.asdict(report.figures(p, ph)) for ph in PHASES} for p in PROTOCOLS}
    summary = {"proxy": args.proxy, "ready_after_kill_s": report.ready_time - report.kill_time, "figures": figures,
               "restarted_inferences": report.restarted_inferences, "retried_requests": report.retried_requests,
               "first_request_after_ready_s": report.first_request_after_ready_s}
    (out / f"lb_{args.proxy}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
