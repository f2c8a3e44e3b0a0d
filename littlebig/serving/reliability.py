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


class Load:
    """``concurrency`` closed-loop clients until ``stop()``; outcomes in ``self.outcomes``."""

    def __init__(self, url: str, expected: Expected, thresholds: list[float], concurrency: int = 32,
                 max_rows: int = 4, timeout_s: float = 120.0, seed: int = 0):
        if len(expected.images) <= max_rows:
            raise ValueError(f"Load needs more than max_rows={max_rows} images, got {len(expected.images)}")
        self.url, self.expected, self.thresholds = url, expected, thresholds
        self.max_rows, self.timeout_s = max_rows, timeout_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed + i,), daemon=True) for i in range(concurrency)]

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

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        n = len(self.expected.images)
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                start = rng.randrange(n - self.max_rows)
                rows = np.arange(start, start + rng.randint(1, self.max_rows))
                self._record(self._one(client, rows, rng.choice(self.thresholds)))

    def _one(self, client, rows: np.ndarray, threshold: float) -> Outcome:
        image = grpcclient.InferInput(IMAGE, [len(rows), *self.expected.images.shape[1:]], "UINT8")
        image.set_data_from_numpy(self.expected.images[rows])
        outputs = [grpcclient.InferRequestedOutput(n) for n in (CLASS, CONFIDENCE, ROUTE)]
        escalated = bool((self.expected.little[rows].max(1) < threshold).any())
        sent = time.monotonic()
        try:
            result = client.infer(GATE_MODEL, [image], outputs=outputs, parameters={"threshold": threshold},
                                  client_timeout=self.timeout_s)
        except InferenceServerException as err:
            return Outcome(sent, time.monotonic(), "error", f"{err.status()} {err.message()}", escalated)
        except Exception as err:  # noqa: BLE001 - recorded as a failure: a client thread must not end unseen
            return Outcome(sent, time.monotonic(), "error", f"{type(err).__name__}: {err}", escalated)
        try:
            wrong = self.expected.check(rows, threshold, {k: result.as_numpy(k) for k in (CLASS, CONFIDENCE, ROUTE)})
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
    errors: tuple[str, ...]  # distinct error messages, shortened
    last_bad_s: float  # from the fault to the end of the last failed or wrong request (0: none)
    recovered_s: float | None  # from the fault to the first correct escalated answer after the last bad one
    max_latency_s: float

    def line(self) -> str:
        rec = "never" if self.recovered_s is None else f"{self.recovered_s:.1f}s"
        return (f"answered {self.answered}, failed {self.failed}, wrong {self.wrong}, last failure at +{self.last_bad_s:.1f}s, "
                f"correct again at +{rec}, max latency {self.max_latency_s:.1f}s; errors: {'; '.join(self.errors) or '-'}")


def report(outcomes: list[Outcome], at: float) -> FaultReport:
    after = [o for o in outcomes if o.done >= at]
    bad = [o for o in after if o.status != "ok"]
    last_bad = max((o.done for o in bad), default=at)
    good_after = [o.done for o in after if o.status == "ok" and o.escalated and o.sent >= last_bad]
    errors = tuple(sorted({o.detail[:140] for o in bad}))[:5]
    return FaultReport(
        answered=len(after), failed=sum(o.status == "error" for o in bad), wrong=sum(o.status == "wrong" for o in bad),
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
