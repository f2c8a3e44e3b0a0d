"""What the gears decide from: the gate's answers (time, latency, count) and its escalations still
waiting for big, as one instance sees them (Observations) or pooled over a model's instances on one
server through a small memory-mapped file in /dev/shm (PooledObservations). numpy and the OS only."""

import contextlib
import fcntl
import glob
import math
import mmap
import os

import numpy as np


class Observations:
    """What the gears decide from, as one gate instance sees it: its answers (time, latency, count)
    and the start times of its escalations still waiting for big."""

    def __init__(self):
        self.answers = []  # (answered at, latency s, count)
        self.waiting = []  # start times of escalations waiting for big

    def answered(self, latency, count, now):
        self.answers.append((now, latency, count))

    def escalation_started(self, started):
        self.waiting.append(started)

    def escalation_ended(self, started):
        self.waiting.remove(started)

    def window(self, since):
        """Latencies (s) of the answers given since ``since``, one per request."""
        self.answers = [a for a in self.answers if a[0] >= since]
        return np.repeat([a[1] for a in self.answers], [a[2] for a in self.answers])

    def oldest(self):
        """Start time of the oldest escalation still waiting for big; None when none waits."""
        return min(self.waiting) if self.waiting else None

    def last_answer(self):
        return self.answers[-1][0] if self.answers else float("-inf")

    def shared(self, gears):
        """The controller's state while it decides: this instance's own."""
        return contextlib.nullcontext()

    def close(self):
        pass


class PooledObservations(Observations):
    """The gears' observations pooled over a model's instances on one server: each instance (a stub
    process of its own) keeps its answers and its oldest waiting escalation in its own slot of a small
    memory-mapped file in /dev/shm, and reads every live slot when it decides. So every instance decides
    from all answers and all escalations (one instance alone sees half of them with two instances, and
    they used to sit in different gears), and each can still decide without the others.

    Row 0 holds the gears controller's state (``shared``): the instances take one decision per interval
    between them and are always in the same gear. Rows 1.. are the slots (float64): pid, start of the
    oldest waiting escalation (inf: none), last answer, answers written, then a ring of (answered at,
    latency s, count). Times are time.monotonic(), one clock for every process on the host. A slot whose
    pid is gone is free, so a dead stub's slot is ignored."""

    SLOTS = 16
    RING = 1024
    HEADER = 4
    STATE = ("gear", "calm", "raise_after", "climbed", "missed", "decided")  # the controller's, in row 0
    COUNTS = ("gear", "calm", "raise_after")

    def __init__(self, path):
        super().__init__()
        self.path = path
        width = self.HEADER + 3 * self.RING
        size = (1 + self.SLOTS) * width * 8
        fd = self._open_locked(path)  # one instance at a time sizes the file and claims a slot
        self._inode = os.fstat(fd).st_ino
        try:
            found = os.fstat(fd).st_size
            if found == 0:
                os.ftruncate(fd, size)  # zeros: every slot free
            elif found != size:  # another version's layout, maybe mapped by live instances: leave it
                raise OSError(f"{path} holds {found} bytes, not the {size} of this layout")
            self.map = mmap.mmap(fd, size)
            self.board = np.frombuffer(self.map, dtype=np.float64).reshape(1 + self.SLOTS, width)
            free = [k for k in range(1, 1 + self.SLOTS) if not _alive(int(self.board[k, 0]))]
            if not free:
                raise OSError(f"all {self.SLOTS} slots of {path} are taken")
            self.slot = free[0]
            self.board[self.slot] = 0.0  # nothing of a previous holder's ring counts
            self.board[self.slot, : self.HEADER] = (os.getpid(), math.inf, -math.inf, 0)
        finally:
            self._unlock(fd)
        self.lock = os.open(path, os.O_RDWR)  # its own open file: held only while deciding (shared)
        self.mine = self.board[self.slot]
        self.ring = self.mine[self.HEADER :].reshape(self.RING, 3)

    def answered(self, latency, count, now):
        written = int(self.mine[3])
        self.ring[written % self.RING] = (-math.inf, latency, count)
        self.ring[written % self.RING, 0] = now  # last: a reader never takes a half-written entry as new
        self.mine[3] = written + 1
        self.mine[2] = now

    def escalation_started(self, started):
        super().escalation_started(started)
        self.mine[1] = min(self.waiting)

    def escalation_ended(self, started):
        super().escalation_ended(started)
        self.mine[1] = min(self.waiting) if self.waiting else math.inf

    def _live(self):
        return [k for k in range(1, 1 + self.SLOTS) if k == self.slot or _alive(int(self.board[k, 0]))]

    def window(self, since):
        rings = self.board[self._live(), self.HEADER :].reshape(-1, 3)
        new = rings[rings[:, 0] >= since]
        return np.repeat(new[:, 1], new[:, 2].astype(np.int64))

    def oldest(self):
        oldest = float(self.board[self._live(), 1].min())
        return None if oldest == math.inf else oldest

    def last_answer(self):
        return float(self.board[self._live(), 2].max())

    @contextlib.contextmanager
    def shared(self, gears):
        """While the controller decides, under the file's lock, its state is the pool's: the state the
        last decision of any instance left (none yet: this instance's), written back after."""
        lock = self.lock  # close() (finalize, another thread) may set it to None meanwhile
        if lock is None:  # closed: a tick after finalize decides alone
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = self.board[0]
            if state[0]:
                for name, value in zip(self.STATE, state[1:]):
                    setattr(gears, name, int(value) if name in self.COUNTS else float(value))
                gears.gear = min(gears.gear, len(gears.thresholds) - 1)  # a reload may have shortened the ladder
            yield
            state[1 : 1 + len(self.STATE)] = [getattr(gears, name) for name in self.STATE]
            state[0] = 1.0
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile: closing released the lock
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self):
        """Free the slot; the last instance to leave removes the file. A call to big may still end after
        finalize (its requests answered early): its bookkeeping then writes to a private copy, not to a
        slot the next instance may already have claimed."""
        os.close(self.lock)
        self.lock = None
        fd = self._open_locked(self.path)
        try:
            self.mine[: self.HEADER] = (0, math.inf, -math.inf, 0)
            if os.fstat(fd).st_ino == self._inode and not any(_alive(int(pid)) for pid in self.board[1:, 0]):
                os.unlink(self.path)
        finally:
            self._unlock(fd)
        self.mine = self.mine.copy()
        self.ring = self.mine[self.HEADER :].reshape(self.RING, 3)

    @staticmethod
    def _unlock(fd):
        # Explicitly: the mmap holds a duplicate of the descriptor, and with it the lock, until unmapped.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @staticmethod
    def _open_locked(path):
        """The file, created if missing and locked; never one that the last instance just removed."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)


SHARED_MEMORY = "/dev/shm"



def pooled_observations(model_name, warn):
    """The gears' observations shared by this model's instances on this server (the stub's parent
    process is its tritonserver); this instance's own when the shared file cannot be made (said through
    ``warn``). Files left by servers that are gone are removed."""
    for stale in glob.glob(os.path.join(SHARED_MEMORY, "littlebig-gears-*")):
        server = os.path.basename(stale).split("-")[2]
        if server.isdigit() and not _alive(int(server)):
            try:
                os.unlink(stale)
            except OSError:
                pass
    path = os.path.join(SHARED_MEMORY, f"littlebig-gears-{os.getppid()}-{model_name}")
    try:
        return PooledObservations(path)
    except OSError as err:
        warn(f"littlebig gears: each instance decides from its own answers only ({err})")
        return Observations()


def _alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

