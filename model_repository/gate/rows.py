"""Row bookkeeping of one execute: the stages' answers, the batch's answers so far, and the escalation
that carries the unsure rows and the requests waiting for them to later stages. numpy only."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    model: str  # the model's name on the server
    role: str  # little, stage1, ..., big (metric labels)
    macs: int  # per row, for the live cost metric


class ChildError(RuntimeError):
    """A stage failed, timed out or is not loaded (UNAVAILABLE)."""

    dropped = False  # the stage's queue dropped the call at the timeout the gate gave it

    def __init__(self, stage, message):
        super().__init__(f"model '{stage.model}' failed: {message}")
        self.stage = stage


@dataclasses.dataclass
class Accepted:
    """A parsed request."""

    arrays: list  # numpy views of its inputs, in declared order
    thresholds: tuple  # T_0 .. T_{K-2}
    want_probs: bool
    on_big_failure: str
    pinned: bool = False  # the request sent its own thresholds: gears never change them
    first: dict = None  # stage 0's answer handed over (LITTLE_CLASS, ...) by output name


@dataclasses.dataclass
class ChildAnswer:
    """One stage's answer on some rows: class (or multi-hot labels, or a mask), gating signal, PROBS when asked."""

    label: np.ndarray  # int64 [N] (multi-label: int32 [N, C]; segmentation: int32 [N, H, W])
    confidence: np.ndarray  # float64 [N]
    probs: np.ndarray | None  # float32 [N, C]

    def rows(self, mask):
        return ChildAnswer(self.label[mask], self.confidence[mask], None if self.probs is None else self.probs[mask])


@dataclasses.dataclass
class Answers:
    """Per-row answers of one batch: the latest stage's answer on each row, and which stage gave it."""

    label: np.ndarray
    confidence: np.ndarray
    route: np.ndarray
    probs: np.ndarray | None  # only when some request asked for PROBS (or the ensemble weight needs them)
    task: str  # multiclass, multilabel or segmentation: which output carries ``label`` (ANSWER_OF_TASK)
    thresholds: np.ndarray  # float64 [N, K-1]: the thresholds that applied to each row

    def fill(self, rows, answer, route):
        self.label[rows] = answer.label
        self.confidence[rows] = answer.confidence
        self.route[rows] = route
        if self.probs is not None and answer.probs is not None:
            if not self.probs.flags.writeable:  # stage 0's output buffer
                self.probs = np.array(self.probs)
            self.probs[rows] = answer.probs


@dataclasses.dataclass
class Waiting:
    """A request with at least one row for a later stage, answered when its rows are settled."""

    sender: object  # the request's response sender
    rows: slice
    want_probs: bool
    on_big_failure: str


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: the gate keeps a set of them
class Escalation:
    """The rows still unsure after a stage (copied out of the requests) and the requests waiting."""

    inputs: list  # numpy arrays of the pending rows, in declared input order
    pending: np.ndarray  # their row indices in the batch
    thresholds: np.ndarray  # float64 [len(pending), K-1]
    waiting: list
    open: np.ndarray  # bool [N]: the row still waits for a later stage
    answers: Answers  # the batch's answers so far
    adaptive: np.ndarray  # bool [len(pending)]: the row's request sent no thresholds (gears may settle it)
    started: float = 0.0  # when its execute started (the gears' latency clock)
    observed: bool = False  # the gears count it among the escalations waiting for big
    early: int = 0  # waiting requests answered before big (a step down of the gears, the deadline)
    deadline: object = None  # the timer of its deadline (gear_deadline_ms)
    audit: object = None  # the batch's part in the audit (audit.AuditBatch), when covered

    def leave(self):
        """The waiting requests whose rows are all settled, no longer waiting."""
        done = [wait for wait in self.waiting if not self.open[wait.rows].any()]
        self.waiting = [wait for wait in self.waiting if self.open[wait.rows].any()]
        return done

    def narrow(self, keep):
        """Only the rows ``keep`` (bool over pending) still go on."""
        if not keep.all():
            self.inputs = [x[keep] for x in self.inputs]
            self.pending, self.thresholds, self.adaptive = self.pending[keep], self.thresholds[keep], self.adaptive[keep]


@dataclasses.dataclass
class Batch:
    """The requests of one execute: the refusals, the accepted ones, their rows and thresholds, and
    stage 0's answer on those rows (or why there is none)."""

    requests: list
    responses: list  # per request: its response once decided (refusals at once), else None
    accepted: list  # (index, Accepted)
    applied: tuple  # the thresholds for requests that send none of their own
    first: ChildAnswer | None = None
    failure: ChildError | None = None

    def __post_init__(self):
        self.counts, self.rows_of, end = [], [], 0
        for _, accepted in self.accepted:
            count = len(accepted.arrays[0])
            self.counts.append(count)
            self.rows_of.append(slice(end, end + count))
            end += count
        per_request = np.array([a.thresholds for _, a in self.accepted], dtype=np.float64).reshape(len(self.accepted), len(self.applied))
        self.thresholds = np.repeat(per_request, self.counts, axis=0)  # float64 [N, K-1]
        self.keep_probs = any(a.want_probs for _, a in self.accepted)

    def arrays(self):
        """Every input, the rows of all accepted requests (one request's own views; else concatenated)."""
        if len(self.accepted) == 1:
            return self.accepted[0][1].arrays
        return [np.concatenate(columns) for columns in zip(*(a.arrays for _, a in self.accepted))]

    def first_output(self, name):
        """Stage 0's output ``name`` as the ensemble handed it over, all rows, copied out of the requests."""
        return np.concatenate([a.first[name] for _, a in self.accepted])
