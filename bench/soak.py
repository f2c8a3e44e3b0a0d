"""Soak: closed-loop gRPC clients against the gate for a while, every answer checked.

    flock /tmp/littlebig-cpu.lock .venv/bin/python bench/soak.py --little little.onnx --big big.onnx \
        --seconds 300 --concurrency 32 --data ../shared/data/imagenet-sample --out bench/results/soak.json

Serves the pair (python runtime) with the launcher and the supervisor on, sends batches of 1-4
images with per-request thresholds drawn from {0, 1, little's 20/50/80% confidence quantiles}, and
compares every answer (route, class, confidence) with the cascade computed offline by onnxruntime
on the same ONNX files. Reports answered / failed / wrong, requests per second, latency quantiles
and the supervisor's recoveries (none expected). Exit status 1 if anything failed or was wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from littlebig.model_repository.builder import build_repository, read_gate
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.reliability import Expected, Load
from littlebig.serving.server import TritonServer
from littlebig.serving.supervisor import Supervisor, SupervisorOptions


def soak_images(data: str | None, size: int, n: int) -> np.ndarray:
    """Real photos from ``data`` in the wire format, else seeded random images."""
    if data:
        from littlebig.client.images import list_images, to_wire_batch

        paths = list_images(data)[:n]
        if paths:
            return to_wire_batch(paths, size)
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--data", help="folder of photos (default: random images)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="littlebig-soak-"))
    repo = build_repository(args.little, args.big, work / "repo", RepositoryOptions(intra_op_threads=1))
    size = read_gate(repo)[2].wire_size
    expected = Expected.from_repository(repo, soak_images(args.data, size, args.images))
    conf = expected.little.max(1)
    thresholds = [0.0, 1.0] + [float(np.quantile(conf, q)) for q in (0.2, 0.5, 0.8)]
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        supervisor = Supervisor(server, SupervisorOptions(interval_s=1.0, metrics_file=work / "supervisor.prom"))
        supervisor.start()
        load = Load(server.grpc_url, expected, thresholds, concurrency=args.concurrency).start()
        started = time.monotonic()
        time.sleep(args.seconds)
        outcomes = load.stop()
        elapsed = time.monotonic() - started
        supervisor.stop()
    latencies = np.array([o.done - o.sent for o in outcomes])
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "wrong", "error")}
    result = {
        "seconds": round(elapsed, 1), "concurrency": args.concurrency, "images": len(expected.images),
        "data": args.data or "random", "thresholds": thresholds, "answered": len(outcomes), **counts,
        "escalated_requests": sum(o.escalated for o in outcomes),
        "requests_per_s": round(len(outcomes) / elapsed, 1),
        "latency_s": {f"p{q}": round(float(np.percentile(latencies, q)), 4) for q in (50, 90, 99, 100)},
        "recoveries": {f"{t}/{a}": c for (t, a), c in supervisor.recoveries.items()},
        "errors": sorted({o.detail[:200] for o in outcomes if o.status != "ok"})[:10],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if counts["wrong"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
