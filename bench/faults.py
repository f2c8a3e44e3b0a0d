"""Faults under load, with the supervisor on: what clients saw and when answers were correct again.

    .venv/bin/python bench/faults.py --little runs/lite/little.onnx --big runs/lite/big.onnx \
        --out bench/results/faults/faults.json

Serves the pair (python runtime) with `littlebig serve`'s launcher and supervisor and runs two groups
of closed-loop gRPC clients side by side (mixed per-request thresholds, every answer checked against
onnxruntime): raw ones that record every failure as it comes (a tritonclient user without retries;
30 s timeout), and ones that send a request the server could not answer again, as the package's
clients do (client/retry.py). One fault at a time, waiting for recovery between them: big's stub
paused (SIGSTOP, SIGCONT after --pause-s), big's stub SIGKILLed, a gate stub SIGKILLed, the server
SIGKILLed. Per fault: failed and wrong answers, requests in flight at the fault still unanswered 2 s
later (and never answered), and from the fault to the first correct escalated answer after the last
failure; for the retrying clients, failures and retries.
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

from littlebig.client.retry import RetryPolicy
from littlebig.model_repository.builder import build_repository, read_gate
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.reliability import Expected, Load, pause, report, stub_pid
from littlebig.serving.server import TritonServer
from littlebig.serving.supervisor import Supervisor, SupervisorOptions


def kill_stub(server, instance):
    os.kill(stub_pid(server.process.pid, instance), signal.SIGKILL)


FAULTS = {
    "big stub SIGSTOP/SIGCONT": lambda server, args: pause(stub_pid(server.process.pid, "big_0_0"), args.pause_s),
    "big stub SIGKILL": lambda server, args: kill_stub(server, "big_0_0"),
    "gate stub SIGKILL": lambda server, args: kill_stub(server, "gate_0_0"),
    "server SIGKILL": lambda server, args: os.kill(server.process.pid, signal.SIGKILL),
}


def wire_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def run_fault(name, server, supervisor, raw, retrying, args) -> dict:
    time.sleep(args.settle_s)
    retries = retrying.retries
    at = time.monotonic()
    FAULTS[name](server, args)
    print(f"[faults] {name} at +0.0s", flush=True)
    time.sleep(2.5)
    held = report(raw.outcomes, at, sending=raw.sending).unanswered  # still in flight 2 s after the fault
    time.sleep(max(0.0, args.observe_s - 2.5))
    result = report(raw.outcomes, at)
    riding = report(retrying.outcomes, at)
    print(f"[faults] {name}: raw clients: {result.line()}", flush=True)
    print(f"[faults] {name}: retrying clients: answered {riding.answered}, failed {riding.failed}, wrong {riding.wrong}, "
          f"retries {retrying.retries - retries}", flush=True)
    return {"fault": name, **dataclasses.asdict(result), "unanswered": max(result.unanswered, held),
            "retrying": {"answered": riding.answered, "failed": riding.failed, "wrong": riding.wrong,
                         "retries": retrying.retries - retries, "errors": riding.errors},
            "recoveries": {f"{t}/{a}": c for (t, a), c in supervisor.recoveries.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--concurrency", type=int, default=6, help="raw clients, and as many retrying ones")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    parser.add_argument("--pause-s", type=float, default=3.0)
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
        raw = Load(server.grpc_url, expected, thresholds, concurrency=args.concurrency, timeout_s=30.0).start()
        retrying = Load(server.grpc_url, expected, thresholds, concurrency=args.concurrency, seed=1000,
                        retry=RetryPolicy(deadline_s=60.0)).start()
        try:
            for name in args.faults.split(","):
                results.append(run_fault(name.strip(), server, supervisor, raw, retrying, args))
        finally:
            outcomes = raw.stop()
            riding = retrying.stop()
            supervisor.stop()
    total = {s: sum(o.status == s for o in outcomes) for s in ("ok", "wrong", "error")}
    total_retrying = {s: sum(o.status == s for o in riding) for s in ("ok", "wrong", "error")}
    print(f"[faults] all requests: raw clients {total}; retrying clients {total_retrying}, {retrying.retries} retries; "
          f"log {server.log_file}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"faults": results, "total": total, "total_retrying": total_retrying,
                                              "retries": retrying.retries, "concurrency": args.concurrency}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
