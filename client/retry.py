"""Sending an inference again when the server could not answer it: the server is restarting or
overloaded (UNAVAILABLE), the connection dropped, or the Python process that held the request died.

A classification is idempotent, so sending it again is safe; a client mistake (INVALID_ARGUMENT and
the like) is never retried: it would fail the same way. Nor is a refused connection before the server
ever answered this client: that is a wrong address (or no server), told at once, not 30 s later. Delays
grow exponentially, bounded, and every attempt fits in one total deadline. Each retry is counted and logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable, TypeVar

from tritonclient.utils import InferenceServerException

log = logging.getLogger("littlebig.client")
T = TypeVar("T")

# Statuses a server answers with while it cannot serve now (gRPC, HTTP).
RETRY_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "502", "503", "504")
# What a dropped or refused connection, a model still loading after a restart, and a python-backend stub
# that died while holding the request (Triton answers INTERNAL then) look like.
RETRY_MESSAGES = (
    "failed to connect", "connection refused", "connect failed", "socket closed", "connection reset", "broken pipe",
    "stub process is not healthy", "server not ready", "is not ready", "has no available versions", "unknown model",
    "end of tcp stream", "network is unreachable",
)
# ... of which these say no server answered at all.
UNREACHED = ("failed to connect", "connection refused", "connect failed", "network is unreachable")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = 30.0  # the most one inference may take, its retries included (0: no retries)
    first_delay_s: float = 0.1
    max_delay_s: float = 2.0


def retryable(err: BaseException) -> bool:
    """Whether ``err`` says the server could not answer now (not that the request is wrong)."""
    if isinstance(err, InferenceServerException):
        status = str(err.status() or "")
        if status in RETRY_STATUSES:
            return True
        return any(text in str(err.message() or "").lower() for text in RETRY_MESSAGES)
    return isinstance(err, (ConnectionError, TimeoutError))


def unreached(err: BaseException) -> bool:
    """Whether ``err`` says no server answered (refused, unreachable), not that one failed mid-way."""
    if isinstance(err, ConnectionRefusedError):
        return True
    return isinstance(err, InferenceServerException) and any(text in str(err.message() or "").lower() for text in UNREACHED)


class Retrier:
    """Runs calls under a RetryPolicy; ``retries`` counts the calls sent again. ``reached``: the server has
    answered this client (a refused connection is retried only then: it restarts)."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), reached: bool = False):
        self.policy = policy
        self.retries = 0
        self.reached = reached

    def call(self, send: Callable[[], T], what: str = "inference") -> T:
        deadline, attempt = time.monotonic() + self.policy.deadline_s, 0
        while True:
            try:
                answer = send()
            except Exception as err:
                wait = self._wait(err, what, deadline, attempt)
            else:
                self.reached = True
                return answer
            attempt += 1
            time.sleep(wait)

    async def call_async(self, send: Callable[[], Awaitable[T]], what: str = "inference") -> T:
        deadline, attempt = time.monotonic() + self.policy.deadline_s, 0
        while True:
            try:
                answer = await send()
            except Exception as err:
                wait = self._wait(err, what, deadline, attempt)
            else:
                self.reached = True
                return answer
            attempt += 1
            await asyncio.sleep(wait)

    def _wait(self, err: Exception, what: str, deadline: float, attempt: int) -> float:
        """How long to wait before sending again; re-raises ``err`` when it is not worth another attempt."""
        wait = min(self.policy.first_delay_s * 2**attempt, self.policy.max_delay_s)
        if not retryable(err) or (unreached(err) and not self.reached) or time.monotonic() + wait > deadline:
            raise err
        self.retries += 1
        log.warning("littlebig: %s failed (%s); sending it again in %.2f s (retry %d)", what, _short(err), wait, self.retries)
        return wait


def _short(err: Exception) -> str:
    text = f"{err.status()} {err.message()}" if isinstance(err, InferenceServerException) else f"{type(err).__name__}: {err}"
    return text.splitlines()[0][:160] if text else type(err).__name__
