"""Load with checked answers, and faults injected into a running server (soak and fault runs).

``Load`` runs closed-loop gRPC clients that send small batches with mixed per-request thresholds
and check every answer against the cascade computed offline with onnxruntime on the same ONNX
files (``Expected``). Each request's outcome is recorded with its times, so a fault run can say what
clients saw and when answers were correct again. ``stub_pid`` finds the python-backend stub process
of a model instance among a server's descendants.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from littlebig.client.retry import Retrier, RetryPolicy
from littlebig.contract import CLASS, CONFIDENCE, GATE_MODEL, IMAGE, PROBS, ROUTE

CONFIDENCE_ATOL = 2e-6  # same ONNX, same onnxruntime; batch composition may differ by float noise


@dataclasses.dataclass
class Expected:
    """Offline probabilities of little and big on ``images``."""

    images: np.ndarray
    little: np.ndarray
    big: np.ndarray

    @classmethod
    def from_repository(cls, repository: str | Path, images: np.ndarray) -> "Expected":
        from littlebig.export import ort_session

        repository = Path(repository)
        probs = [ort_session(repository / m / "1" / "model.onnx").run([PROBS], {IMAGE: images})[0] for m in ("little", "big")]
        return cls(images, *probs)

    def check(self, rows: np.ndarray, threshold: float, out: dict[str, np.ndarray]) -> str | None:
        """None if the served answer for ``rows`` at ``threshold`` is the cascade's (Eq. 4), else why not."""
        route = (self.little[rows].max(1).astype(np.float64) < threshold).astype(np.int32)
        probs = np.where(route[:, None] == 1, self.big[rows], self.little[rows])
        if not np.array_equal(out[ROUTE][:, 0], route):
            return f"route {out['ROUTE'][:, 0].tolist()} != {route.tolist()}"
        if not np.array_equal(out[CLASS][:, 0], probs.argmax(1)):
            return f"class {out['CLASS'][:, 0].tolist()} != {probs.argmax(1).tolist()}"
        if not np.allclose(out[CONFIDENCE][:, 0], probs.max(1), rtol=0, atol=CONFIDENCE_ATOL):
            return "confidence differs"
        return None


@dataclasses.dataclass(frozen=True)
class Outcome:
    sent: float  # monotonic seconds
    done: float
    status: str  # "ok", "wrong" or "error"
    detail: str = ""
    escalated: bool = False


class Schedule:
    """The config T in force over time, as a soak switches it: a request sent without its own T is
    right when it matches the cascade at one of the Ts in force while it was in flight."""

    def __init__(self, threshold: float):
        self.changes = [(float("-inf"), threshold)]  # (monotonic time from which it holds, T)

    def switched(self, threshold: float, at: float) -> None:
        self.changes.append((at, threshold))

    def between(self, sent: float, done: float) -> list[float]:
        changes = list(self.changes)
        first = max(k for k, (at, _) in enumerate(changes) if at <= sent)
        return [t for at, t in changes[first:] if at <= done]


class Load:
    """``concurrency`` closed-loop clients until ``stop()``; outcomes in ``self.outcomes``."""

    def __init__(self, url: str, expected: Expected, thresholds: list[float], concurrency: int = 32,
                 max_rows: int = 4, timeout_s: float = 120.0, seed: int = 0, retry: RetryPolicy | None = None,
                 schedule: Schedule | None = None):
        if len(expected.images) <= max_rows:
            raise ValueError(f"Load needs more than max_rows={max_rows} images, got {len(expected.images)}")
        self.url, self.expected, self.thresholds = url, expected, thresholds
        # With a schedule, one request in four sends no T of its own and is checked against the config's.
        self.schedule = schedule
        self.max_rows, self.timeout_s = max_rows, timeout_s
        # With a policy, each client sends a request the server could not answer again (as the package's
        # clients do); without, every failure is recorded as it comes (as a raw tritonclient user sees it).
        self.retriers = [Retrier(retry) for _ in range(concurrency)] if retry is not None else []
        self.outcomes: list[Outcome] = []
        self.sending: dict[int, float] = {}  # client index -> when its request in flight was sent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed + i, i), daemon=True) for i in range(concurrency)]

    def start(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        """Stops the clients and returns every outcome; raises if a client did not come back."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 10)
        stuck = sum(thread.is_alive() for thread in self._threads)
        if stuck:
            raise RuntimeError(f"{stuck} of {len(self._threads)} load clients did not come back within "
                               f"{self.timeout_s + 10:.0f} s of stop (a request neither answered nor timed out)")
        return self.outcomes

    @property
    def retries(self) -> int:
        return sum(retrier.retries for retrier in self.retriers)

    def _client(self, seed: int, index: int) -> None:
        rng = random.Random(seed)
        n = len(self.expected.images)
        retrier = self.retriers[index] if self.retriers else None
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                start = rng.randrange(n - self.max_rows)
                rows = np.arange(start, start + rng.randint(1, self.max_rows))
                self.sending[index] = time.monotonic()
                threshold = None if self.schedule is not None and rng.random() < 0.25 else rng.choice(self.thresholds)
                outcome = self._one(client, rows, threshold, retrier)
                del self.sending[index]
                self._record(outcome)

    def _one(self, client, rows: np.ndarray, threshold: float | None, retrier: Retrier | None = None) -> Outcome:
        """One request at ``threshold`` (None: the config's, per the schedule)."""
        image = grpcclient.InferInput(IMAGE, [len(rows), *self.expected.images.shape[1:]], "UINT8")
        image.set_data_from_numpy(self.expected.images[rows])
        outputs = [grpcclient.InferRequestedOutput(n) for n in (CLASS, CONFIDENCE, ROUTE)]
        parameters = None if threshold is None else {"threshold": threshold}
        sent = time.monotonic()
        escalated = bool((self.expected.little[rows].max(1) < (threshold if threshold is not None else self.schedule.between(sent, sent)[-1])).any())

        def send():
            return client.infer(GATE_MODEL, [image], outputs=outputs, parameters=parameters, client_timeout=self.timeout_s)

        try:
            result = send() if retrier is None else retrier.call(send)
        except InferenceServerException as err:
            return Outcome(sent, time.monotonic(), "error", f"{err.status()} {err.message()}", escalated)
        except Exception as err:  # noqa: BLE001 - recorded as a failure: a client thread must not end unseen
            return Outcome(sent, time.monotonic(), "error", f"{type(err).__name__}: {err}", escalated)
        candidates = [threshold] if threshold is not None else self.schedule.between(sent, time.monotonic())
        try:
            answer = {k: result.as_numpy(k) for k in (CLASS, CONFIDENCE, ROUTE)}
            checks = [self.expected.check(rows, t, answer) for t in candidates]
            wrong = None if None in checks else checks[0]
        except Exception as err:  # noqa: BLE001 - a missing or malformed output is a wrong answer
            wrong = f"answer not readable: {type(err).__name__}: {err}"
        return Outcome(sent, time.monotonic(), "wrong" if wrong else "ok", wrong or "", escalated)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)
        if outcome.status == "error":
            time.sleep(0.05)  # a failing server is not hammered by 32 tight loops


@dataclasses.dataclass(frozen=True)
class FaultReport:
    """What clients saw around a fault at ``at`` (monotonic seconds)."""

    answered: int
    failed: int
    wrong: int
    unanswered: int  # in flight at the fault and still without an answer (or an error) 2 s after it
    timed_out: int  # never answered: ended by the client's own timeout
    errors: tuple[str, ...]  # distinct error messages, shortened
    last_bad_s: float  # from the fault to the end of the last failed or wrong request (0: none)
    recovered_s: float | None  # from the fault to the first correct escalated answer after the last bad one
    max_latency_s: float

    def line(self) -> str:
        rec = "never" if self.recovered_s is None else f"{self.recovered_s:.1f}s"
        return (f"answered {self.answered}, failed {self.failed}, wrong {self.wrong}, unanswered 2 s after the fault "
                f"{self.unanswered} ({self.timed_out} never), last failure at +{self.last_bad_s:.1f}s, "
                f"correct again at +{rec}, max latency {self.max_latency_s:.1f}s; errors: {'; '.join(self.errors) or '-'}")


def report(outcomes: list[Outcome], at: float, held_s: float = 2.0, sending: dict[int, float] | None = None) -> FaultReport:
    """``sending``: Load.sending, the requests still in flight (those sent before the fault count as
    unanswered once ``held_s`` has passed)."""
    after = [o for o in outcomes if o.done >= at]
    still = [sent for sent in dict(sending or {}).values() if sent <= at] if time.monotonic() > at + held_s else []
    bad = [o for o in after if o.status != "ok"]
    last_bad = max((o.done for o in bad), default=at)
    good_after = [o.done for o in after if o.status == "ok" and o.escalated and o.sent >= last_bad]
    errors = tuple(sorted({o.detail[:140] for o in bad}))[:5]
    return FaultReport(
        answered=len(after), failed=sum(o.status == "error" for o in bad), wrong=sum(o.status == "wrong" for o in bad),
        unanswered=sum(o.sent <= at and o.done > at + held_s for o in after) + len(still),
        timed_out=sum("deadline" in o.detail.lower() for o in bad),
        errors=errors, last_bad_s=last_bad - at if bad else 0.0,
        recovered_s=(min(good_after) - at) if good_after else None,
        max_latency_s=max((o.done - o.sent for o in after), default=0.0),
    )


def stub_pid(server_pid: int, instance: str) -> int:
    """The python-backend stub of ``instance`` (e.g. "big_0_0") under the server ``server_pid``."""
    from littlebig.serving.supervisor import stub_processes

    stubs = stub_processes(server_pid)
    if instance not in stubs:
        raise LookupError(f"no stub process for {instance} under pid {server_pid} (found {sorted(stubs)})")
    return stubs[instance]


def pause(pid: int, seconds: float) -> None:
    """SIGSTOP ``pid`` for ``seconds``; it is continued even when the wait is interrupted."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
