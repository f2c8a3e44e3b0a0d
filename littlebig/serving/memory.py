"""Sample the memory of a server process and everything it started (Triton's python-backend stubs).

The figure is the summed resident set size (RSS) of the process and its descendants: pages shared
between processes (libraries) count once per process, so it overstates the true footprint a little,
the same way for every configuration it compares.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import psutil

from littlebig.errors import UserError


def tree_rss(pid: int) -> int:
    """Summed RSS in bytes of ``pid`` and its descendants; processes that exit meanwhile are skipped."""
    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


@dataclasses.dataclass(frozen=True)
class Sample:
    time: float  # time.monotonic()
    rss: int  # bytes


class MemorySampler:
    """Samples ``tree_rss(pid)`` every ``interval_s`` on a background thread while in a ``with`` block."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        if not psutil.pid_exists(pid):
            raise UserError(f"no process with pid {pid}")
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(Sample(time.monotonic(), tree_rss(self.pid)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(Sample(time.monotonic(), tree_rss(self.pid)))

    def peak(self, start: float = float("-inf"), end: float = float("inf")) -> int:
        """Highest RSS seen over ``start`` .. ``end`` (monotonic seconds): the samples taken in it and the
        last one before and first one after it, so a window shorter than the interval (or one the
        sampling thread was starved through) still has a figure; 0 only when nothing was sampled."""
        before = [s for s in self.samples if s.time < start][-1:]
        inside = [s for s in self.samples if start <= s.time <= end]
        after = [s for s in self.samples if s.time > end][:1]
        return max((s.rss for s in before + inside + after), default=0)
