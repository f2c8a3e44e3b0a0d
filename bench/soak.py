"""Soak: clients at about the gate's capacity for a long while, T switched live every minute, every
answer checked; aborts of the server counted with what triggered them and how fast answers came back.

    .venv/bin/python bench/soak.py --little runs/lite/little.onnx --big runs/lite/big.onnx \
        --data ../shared/data/imagenet-sample --minutes 30 --out bench/results/soak/soak.json

Serves the pair (python runtime) with `littlebig serve`'s launcher and supervisor. Closed-loop gRPC
clients (--concurrency, enough to keep the gate busy: about its capacity) send batches of 1-4 images;
three requests in four carry their own T (0, 1, little's 20/50/80% confidence quantiles), one in four
uses the config T, which `switch_threshold` (the same reload `littlebig threshold` does) moves every
--switch-every-s between little's 30% and 70% quantiles. Every answer is compared with the cascade
computed offline by onnxruntime on the same ONNX files (at the config T in force while it was in
flight). Clients retry what the server could not answer, as the package's do (client/retry.py).
Prints answered / retried / failed / unanswered / wrong, and each abort: when, the server log's
last words, and the seconds to the next correct answer. Exit status 1 if anything was wrong or unanswered.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from littlebig.client.control import switch_threshold
from littlebig.client.retry import RetryPolicy
from littlebig.model_repository.builder import build_repository, read_gate
from littlebig.model_repository.options import RepositoryOptions
from littlebig.serving.reliability import Expected, Load, Schedule
from littlebig.serving.server import TritonServer
from littlebig.serving.supervisor import SERVER, Supervisor, SupervisorOptions

ABORT_WORDS = ("lock_exception", "terminate called", "Signal (", "Segmentation", "double free", "core dumped", "Aborted")


def soak_images(data: str | None, size: int, n: int) -> np.ndarray:
    """Real photos from ``data`` in the wire format, else seeded random images."""
    if data:
        from littlebig.client.images import list_images, to_wire_batch

        paths = list_images(data)[:n]
        if paths:
            return to_wire_batch(paths, size)
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def abort_lines(log: Path) -> list[str]:
    """The lines of the server log that tell of an abort (the log of every run is appended)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line.strip()[:200] for line in text.splitlines() if any(word in line for word in ABORT_WORDS)]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--switch-every-s", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--data", help="folder of photos (default: random images)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", help="JSON results")
    return parser.parse_args(argv)


def soak(server, supervisor, load, schedule: Schedule, config_ts: list[float], args) -> tuple[list[dict], int, float]:
    """Watch the load for ``args.minutes``, switching T every ``args.switch_every_s`` between ``config_ts``
    and noting each abort the supervisor recovered from; returns the aborts, the switches and the start."""
    aborts, switches, printed = [], 0, 0
    started = time.monotonic()
    end = started + 60.0 * args.minutes
    next_switch = started + args.switch_every_s
    while time.monotonic() < end:
        time.sleep(1.0)
        restarts = supervisor.recoveries[(SERVER, "restart")]
        if restarts > len(aborts):
            aborts.append({"at_s": round(time.monotonic() - started, 1), "log": abort_lines(server.log_file)[-3:]})
            print(f"[soak] abort {len(aborts)} at +{aborts[-1]['at_s']:.0f}s: {aborts[-1]['log']}", flush=True)
        if time.monotonic() >= next_switch:
            t = config_ts[switches % 2]
            try:
                switch_threshold(server.grpc_url, t)
                schedule.switched(t, time.monotonic())
                switches += 1
            except Exception as err:  # noqa: BLE001 - a switch during a restart: the next one follows
                print(f"[soak] switch to T={t:.3f} failed: {err}", flush=True)
            next_switch += args.switch_every_s
        minute = int((time.monotonic() - started) // 60)
        if minute > printed:  # once a minute, even when a switch made this pass longer than a second
            printed = minute
            bad = sum(o.status != "ok" for o in load.outcomes)
            print(f"[soak] {minute} min: {len(load.outcomes)} answered, {load.retries} retried, {bad} failed or wrong, "
                  f"{switches} switches, {len(aborts)} aborts", flush=True)
    return aborts, switches, started


def summarise(outcomes, aborts: list[dict], started: float, elapsed: float, **facts) -> dict:
    """The soak's figures: answers by status, latency percentiles, aborts and how long each took to recover."""
    for abort in aborts:
        at = started + abort["at_s"]
        after = [o.done for o in outcomes if o.done > at and o.status == "ok"]
        abort["recovered_s"] = round(min(after) - at, 1) if after else None
    latencies = np.array([o.done - o.sent for o in outcomes])
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "wrong", "error")}
    return {
        "minutes": round(elapsed / 60, 1), **facts, "answered": len(outcomes), **counts,
        "unanswered": sum("deadline" in o.detail.lower() for o in outcomes),
        "requests_per_s": round(len(outcomes) / elapsed, 1),
        "latency_s": {f"p{q}": round(float(np.percentile(latencies, q)), 4) for q in (50, 90, 99, 100)},
        "aborts": aborts, "errors": sorted({o.detail[:200] for o in outcomes if o.status != "ok"})[:10],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="littlebig-soak-"))
    repo = build_repository(args.little, args.big, work / "repo", RepositoryOptions(intra_op_threads=1))
    size = read_gate(repo)[2].wire_size
    expected = Expected.from_repository(repo, soak_images(args.data, size, args.images))
    conf = expected.little.max(1)
    thresholds = [0.0, 1.0] + [float(np.quantile(conf, q)) for q in (0.2, 0.5, 0.8)]
    config_ts = [float(np.quantile(conf, q)) for q in (0.3, 0.7)]
    schedule = Schedule(read_gate(repo)[2].thresholds[0])
    with TritonServer(repo, log_file=work / "tritonserver.log") as server:
        supervisor = Supervisor(server, SupervisorOptions(interval_s=1.0, metrics_file=work / "supervisor.prom"))
        supervisor.start()
        load = Load(server.grpc_url, expected, thresholds, concurrency=args.concurrency, timeout_s=60.0,
                    retry=RetryPolicy(deadline_s=60.0), schedule=schedule).start()
        aborts, switches, started = soak(server, supervisor, load, schedule, config_ts, args)
        outcomes = load.stop()
        elapsed = time.monotonic() - started
        supervisor.stop()
    result = summarise(outcomes, aborts, started, elapsed, concurrency=args.concurrency, images=len(expected.images),
                       data=args.data or "random", switches=switches, retries=load.retries,
                       recoveries={f"{t}/{a}": c for (t, a), c in supervisor.recoveries.items()})
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["wrong"] or result["unanswered"] else 0


if __name__ == "__main__":
    sys.exit(main())
