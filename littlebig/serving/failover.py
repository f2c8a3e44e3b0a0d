"""What clients see when a replica behind the load balancer dies: closed-loop load over HTTP and
gRPC, one replica's tritonserver SIGKILLed mid-run, restarted on the same ports, taken back.

Every request's outcome is kept (send and answer time, error, answer checked against the expected
class), so the report splits them by phase: before the kill, while the replica is down (until its
restart is ready), after it is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import urllib.request

import numpy as np

from littlebig.client.infer import GATE_MODEL
from littlebig.contract import CLASS, IMAGE
from littlebig.serving.balancer import Balancer, ServeReplica

PROTOCOLS = ("http", "grpc")
PHASES = ("before", "down", "after")


@dataclasses.dataclass(frozen=True)
class Outcome:
    protocol: str
    sent: float  # time.time()
    latency_ms: float
    error: str | None
    correct: bool


@dataclasses.dataclass(frozen=True)
class PhaseFigures:
    requests: int
    errors: int
    wrong: int
    throughput: float  # answered requests per second
    p50_ms: float
    p99_ms: float
    error_kinds: dict[str, int]


@dataclasses.dataclass
class FailoverReport:
    concurrency: int
    killed_pid: int
    kill_time: float
    ready_time: float  # the restarted replica answered /v2/health/ready
    end_time: float
    outcomes: list[Outcome]
    restarted_inferences: int  # inferences the restarted replica served (its own statistics)
    first_request_after_ready_s: float | None  # from the proxy's log: when it sent the replica traffic again
    retried_requests: int  # access-log lines whose request went to more than one replica
    proxy: str  # the balancer's name (nginx, haproxy), for the report

    def phase_of(self, t: float) -> str:
        return "before" if t < self.kill_time else "down" if t < self.ready_time else "after"

    def figures(self, protocol: str, phase: str) -> PhaseFigures:
        rows = [o for o in self.outcomes if o.protocol == protocol and self.phase_of(o.sent) == phase]
        start = {"before": min((o.sent for o in self.outcomes), default=0), "down": self.kill_time, "after": self.ready_time}[phase]
        end = {"before": self.kill_time, "down": self.ready_time, "after": self.end_time}[phase]
        answered = [o.latency_ms for o in rows if o.error is None]
        kinds: dict[str, int] = {}
        for o in rows:
            if o.error is not None:
                kinds[o.error] = kinds.get(o.error, 0) + 1
        pct = np.percentile(answered, [50, 99]) if answered else [float("nan")] * 2
        return PhaseFigures(len(rows), len(rows) - len(answered), sum(not o.correct for o in rows if o.error is None),
                            len(answered) / max(end - start, 1e-9), float(pct[0]), float(pct[1]), kinds)


def _error_kind(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}" if str(err) else type(err).__name__


async def _client_loop(protocol: str, url: str, images: np.ndarray, expected: np.ndarray, concurrency: int,
                       stop: threading.Event, out: list[Outcome]) -> None:
    if protocol == "grpc":
        import tritonclient.grpc.aio as tc
    else:
        import tritonclient.http.aio as tc
    client = tc.InferenceServerClient(url)

    async def worker(offset: int) -> None:
        index = offset
        while not stop.is_set():
            row = index % len(images)
            index += concurrency
            image = tc.InferInput(IMAGE, [1, *images.shape[1:]], "UINT8")
            image.set_data_from_numpy(images[row : row + 1])
            sent, t0 = time.time(), time.perf_counter()
            try:
                result = await client.infer(GATE_MODEL, [image], outputs=[tc.InferRequestedOutput(CLASS)])
                correct = int(result.as_numpy(CLASS)[0, 0]) == int(expected[row])
                out.append(Outcome(protocol, sent, (time.perf_counter() - t0) * 1e3, None, correct))
            except Exception as err:  # noqa: BLE001 - every failure a client sees is what is measured
                out.append(Outcome(protocol, sent, (time.perf_counter() - t0) * 1e3, _error_kind(err), False))

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await client.close()


def _run_load(balancer: Balancer, images, expected, concurrency: int, stop: threading.Event, out: list[Outcome]) -> None:
    async def both() -> None:
        await asyncio.gather(
            *(_client_loop(p, balancer.url(p), images, expected, concurrency, stop, out) for p in PROTOCOLS),
        )

    asyncio.run(both())


def _inference_count(replica: ServeReplica) -> int:
    import json

    with urllib.request.urlopen(f"http://{replica.http_url}/v2/models/{GATE_MODEL}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def kill_and_restart(balancer: Balancer, replicas: list[ServeReplica], images: np.ndarray, expected: np.ndarray,
                     *, concurrency: int = 32, before_s: float = 5.0, down_s: float = 5.0, after_s: float = 5.0,
                     log=print) -> FailoverReport:
    """Load through ``balancer``; SIGKILL replicas[0]'s tritonserver after ``before_s``; restart it on the
    same ports ``down_s`` later (the load goes on meanwhile); keep loading ``after_s`` once it is ready."""
    outcomes: list[Outcome] = []
    stop = threading.Event()
    load = threading.Thread(target=_run_load, args=(balancer, images, expected, concurrency, stop, outcomes), daemon=True)
    victim = replicas[0]
    load.start()
    try:
        time.sleep(before_s)
        pid = victim.tritonserver_pid()
        kill_time = time.time()
        victim.kill_tritonserver(pid)
        log(f"killed tritonserver pid {pid} of replica {victim.name} (SIGKILL)")
        time.sleep(down_s)
        victim.start()
        ready_time = time.time()
        log(f"replica {victim.name} restarted on the same ports, ready after {ready_time - kill_time:.1f} s")
        time.sleep(after_s)
    finally:
        stop.set()
        load.join()
    end_time = time.time()
    first, retried = balancer.traffic(victim.ports, ready_time)
    return FailoverReport(concurrency, pid, kill_time, ready_time, end_time, outcomes, _inference_count(victim), first, retried,
                          proxy=balancer.name)


def format_report(report: FailoverReport) -> str:
    lines = [f"concurrency {report.concurrency} per protocol; replica killed (pid {report.killed_pid}), "
             f"back and ready {report.ready_time - report.kill_time:.1f} s later",
             f"{'protocol':<8} {'phase':<7} {'requests':>8} {'errors':>6} {'wrong':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}"]
    for protocol in PROTOCOLS:
        for phase in PHASES:
            f = report.figures(protocol, phase)
            lines.append(f"{protocol:<8} {phase:<7} {f.requests:>8} {f.errors:>6} {f.wrong:>5} {f.throughput:>7.1f} "
                         f"{f.p50_ms:>7.1f} {f.p99_ms:>7.1f}")
            lines += [f"{'':<17}{n} x {kind}" for kind, n in f.error_kinds.items()]
    first = "never" if report.first_request_after_ready_s is None else f"{report.first_request_after_ready_s:.2f} s after it was ready"
    lines.append(f"restarted replica: first request from {report.proxy} {first}; it served {report.restarted_inferences} inferences")
    lines.append(f"requests {report.proxy} retried on the other replica: {report.retried_requests}")
    return "\n".join(lines)


def expected_classes(url: str, images: np.ndarray) -> np.ndarray:
    """The gate's answer for each image, asked directly (one image per request, like the load)."""
    from littlebig.client.infer import LittleBigClient

    with LittleBigClient(url) as client:
        return np.asarray([int(client.infer(images[i : i + 1])[CLASS][0, 0]) for i in range(len(images))])

