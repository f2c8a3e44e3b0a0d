"""Faults under load, with the supervisor on: what clients saw and when answers were correct again.

    flock /tmp/littlebig-cpu.lock .venv/bin/python bench/faults.py --little little.onnx --big big.onnx \
        --out bench/results/faults.json

Serves the pair (python runtime) with `littlebig serve`'s launcher and supervisor, runs closed-loop
gRPC clients (mixed per-request thresholds, every answer checked against onnxruntime), and injects
one fault at a time, waiting for recovery between them: big's stub SIGKILLed, big's stub paused
(SIGSTOP, SIGCONT after --pause-s and after --long-pause-s), a gate stub SIGKILLed, the server
SIGKILLed. Times are from the fault (the SIGSTOP for a pause) to the end of the last failed request
and to the first correct escalated answer after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from littlebig.model_repository.builder import build_repository, read_gate
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.reliability import Expected, Load, pause, report, stub_pid
from littlebig.serving.server import TritonServer
from littlebig.serving.supervisor import Supervisor, SupervisorOptions


def kill_stub(server, instance):
    os.kill(stub_pid(server.process.pid, instance), signal.SIGKILL)


FAULTS = {
    "big stub SIGKILL": lambda server, args: kill_stub(server, "big_0_0"),
    "big stub SIGSTOP/SIGCONT": lambda server, args: pause(stub_pid(server.process.pid, "big_0_0"), args.pause_s),
    "big stub SIGSTOP/SIGCONT long": lambda server, args: pause(stub_pid(server.process.pid, "big_0_0"), args.long_pause_s),
    "gate stub SIGKILL": lambda server, args: kill_stub(server, "gate_0_0"),
    "server SIGKILL": lambda server, args: os.kill(server.process.pid, signal.SIGKILL),
}


def wire_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def run_fault(name, server, supervisor, load, args) -> dict:
    time.sleep(args.settle_s)
    at = time.monotonic()
    FAULTS[name](server, args)
    print(f"[faults] {name} at +0.0s", flush=True)
    time.sleep(args.observe_s)
    result = report(load.outcomes, at)
    print(f"[faults] {name}: {result.line()}", flush=True)
    return {"fault": name, **dataclasses.asdict(result), "recoveries": {f"{t}/{a}": c for (t, a), c in supervisor.recoveries.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    parser.add_argument("--pause-s", type=float, default=2.0)
    parser.add_argument("--long-pause-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=5.0, help="load before each fault")
    parser.add_argument("--observe-s", type=float, default=25.0, help="load after each fault")
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="littlebig-faults-"))
    repo = build_repository(args.little, args.big, work / "repo", RepositoryOptions(intra_op_threads=1))
    size = read_gate(repo)[2].wire_size
    expected = Expected.from_repository(repo, wire_images(256, size))
    conf = expected.little.max(1)
    thresholds = [0.0, 1.0] + [float(np.quantile(conf, q)) for q in (0.2, 0.5, 0.8)]
    results = []
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        supervisor = Supervisor(server, SupervisorOptions(interval_s=1.0, metrics_file=work / "supervisor.prom"))
        supervisor.start()
        load = Load(server.grpc_url, expected, thresholds, concurrency=args.concurrency).start()
        try:
            for name in args.faults.split(","):
                results.append(run_fault(name.strip(), server, supervisor, load, args))
        finally:
            outcomes = load.stop()
            supervisor.stop()
    total = {s: sum(o.status == s for o in outcomes) for s in ("ok", "wrong", "error")}
    print(f"[faults] all requests: {total}; log {server.log_file}")
    if args.out:
        Path(args.out).write_text(json.dumps({"faults": results, "total": total, "concurrency": args.concurrency}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
