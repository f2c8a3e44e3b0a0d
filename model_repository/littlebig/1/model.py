"""Little-Big gate: a Triton Python-backend (BLS) model serving a cascade of K >= 2 stages.

For all requests of one execute call: their input rows are concatenated, stage 0 (`little`) runs
once on the whole batch; rows whose gating signal is below its threshold T_0 go to stage 1 in one
more call, those still below T_1 to stage 2, and so on; the last stage (`big`) answers the rest
(paper Eq. 4 and Eq. 7). ROUTE is the index of the stage that answered. With two stages and
ensemble_weight w < 1 an escalated row's answer is (1 - w) * p_little + w * p_big (paper Eq. 8).

Requests that stage 0 answers entirely are sent back at once. The later stages run as one
background task on the stub's event loop, which answers each waiting request as soon as a stage
settles all its rows; execute returns without waiting for it, so this instance takes the next batch
for stage 0 while later stages work. (Since Triton 24.07 a non-decoupled Python model may send its
one final response per request after execute has returned.) Blocking on big instead held
little-answered traffic behind every escalation. All of it runs on the stub's event loop thread:
with BLS calls and response sends from two threads at once (a thread pool for big, or a synchronous
execute that left only big to the loop) tritonserver 2.51 crashed under perf_analyzer load
(signal 11 in libtriton_python.so); this form ran it cleanly. Under sustained load a 2.51 stub can
still die of heap corruption ("double free or corruption"; open upstream: server#8841, #8882),
seen twice here in about 200k overload requests, once with this form and once with batches sent
from the loop whenever escalations were in flight; the backend neither restarts the stub nor fails
its requests, `littlebig serve`'s supervisor restores it.

Self-contained (numpy + triton_python_backend_utils) so the same file runs in the NGC container.
Config parameters: stage_models ("little,stage1,big"; absent: little_model, big_model), thresholds
("T1,T2,...", K-1 values; two stages may write threshold instead), signal (max_softmax, margin,
entropy, mean_abs_margin), task (multiclass, multilabel), stage_macs ("m0,m1,..."; absent:
macs_little, macs_big), ensemble_weight (two stages only), on_big_failure ("fail" or "little"),
child_timeout_ms (bound on each call of a stage; 0: none), metrics_interval_ms (how often the
littlebig_* counters reach /metrics; default 100). Request parameters: `threshold` (two
stages: a number or numeric string in [0, 1]) or `thresholds` ("T1,T2,...") override the config's
for that request, `on_big_failure` overrides the config's; any other request parameter is refused.

Inputs: whatever the config declares (uint8 IMAGE, int64 INPUT_IDS and ATTENTION_MASK, float
features, ...) is forwarded to every stage unchanged. Outputs: CLASS (multi-class) or LABELS
(multi-label: multi-hot at p >= 0.5), CONFIDENCE (the answering stage's gating signal), ROUTE, and
PROBS when asked for.

Errors: a bad request gets INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400); a failing or timed-out
child UNAVAILABLE. Triton counts the gate's error answers as successes in nv_inference_request_*
(the response was delivered); littlebig_requests_total{status="error"} and
littlebig_errors_total{cause=request|little|stage1|...|big} count them.

Reading only what it needs: when every stage answers its top-1 in the graph (CLASS and CONFIDENCE
beside PROBS; config parameter children_top1=1, set by the repository builder) and the signal is
max_softmax, the gate asks a stage for PROBS only when a request asked for PROBS or the ensemble
needs them: two numbers per row instead of C probabilities. Other signals need PROBS. Every call asks
for its outputs in CPU memory, so children on a GPU (TensorRT, onnxruntime-GPU) answer in memory
numpy can read.

Little in the gate (opt-in; config parameters little_onnx, the stage-0 ONNX file relative to the
model repository, and little_intra_op_threads; `littlebig repo --little-in-gate`, python runtime):
stage 0 runs in this process with onnxruntime instead of through a BLS call; while escalations are
in flight it runs in an executor thread, so the event loop keeps calling big and sending their
answers meanwhile. Where little would be another Python-backend model anyway, that saves the whole
hop (the input copied into little's stub, two process round trips); the seconds it spends are
counted in littlebig_in_gate_seconds_total, so the gate's own time can still be told apart. No
child_timeout_ms applies to it (an onnxruntime run cannot be cancelled). onnxruntime is imported
only then: without little_onnx this file needs numpy and the backend utils alone.

Gears (opt-in, two-stage cascades for now): with a config `gears` ladder [[T, expected drop], ...]
from the config T down (written by `littlebig calibrate`, client/gears.py) and `latency_target_ms` > 0,
class Gears drops T to the ladder's last gear once more of its recent answers are late than bursts
at a met p99 target make late (answers the deadline gave count as late; or at once when its oldest
escalation has waited far over the target), and raises it one gear at a time once its latency
estimate is comfortably below the target (hysteresis), deciding at most once per `gear_interval_ms`.
The instances of one server decide from the answers of all of them (PooledObservations, a file in
/dev/shm).
While the target is met it stays in gear 0: the answers are those of the fixed config T. A step down
also settles the backlog: rows already waiting for big whose little signal is >= the new T are
answered at once with little's answer (reporting the new T), instead of behind the backlog that caused
the miss; with one gate instance escalations wait for big in the gate (class Held, one call in flight),
so most of that backlog has not reached big yet. A request that sends its own `threshold`/`thresholds`
is never adapted. A deadline (`gear_deadline_ms`, the builder's default 0.9 x the target) bounds the
wait of each adaptive row: rows still waiting for big that long after their execute started are
answered with little's answer at the highest gear T their signal clears, whatever the gear in force,
so a burst that is over before a miss can be confirmed costs those rows a lower gear's expected drop
instead of the target; rows below the last gear keep waiting for big. Only rows about to miss the
target change. A call to big whose rows the deadline would all answer carries the deadline as its
timeout, and big's queue (configured by the builder to honour it) drops it unexecuted once past it,
so big does not spend a burst on rows already answered. Every answer says in THRESHOLD (FP64 [K-1]
per row) which thresholds applied.

Degraded mode (on_big_failure="little", opt-in): when stage k fails or times out, the rows it was
asked about are answered with stage k-1's answer and ROUTE = K + k - 1 (two stages: 2; counted in
littlebig_fallback_rows_total) instead of an error.
"""

import asyncio
import contextlib
import dataclasses
import glob
import json
import math
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

ROUTE_LITTLE = 0
ROUTE_BIG = 1
ROUTE_LITTLE_FALLBACK = 2  # escalated, big failed, little answered (degraded mode; K stages: K + k)
ON_BIG_FAILURE = ("fail", "little")
REQUEST_PARAMETERS = ("threshold", "thresholds", "on_big_failure")
TASKS = ("multiclass", "multilabel")
SIGNALS = ("max_softmax", "margin", "entropy", "mean_abs_margin")
MULTILABEL_CUT = 0.5
QUEUE_TIMEOUT = "Request timeout expired"  # Triton's error for a call dropped from a queue at its timeout


class RequestError(ValueError):
    """A problem with one request; only that request fails (INVALID_ARG)."""


class ChildError(RuntimeError):
    """A stage failed, timed out or is not loaded (UNAVAILABLE)."""

    dropped = False  # the stage's queue dropped the call at the timeout the gate gave it

    def __init__(self, stage, message):
        super().__init__(f"model '{stage.model}' failed: {message}")
        self.stage = stage


# Gating signals (a copy of littlebig/signals.py; tests/test_contract.py checks they agree): float64 [N].
def max_softmax(probs):
    return probs.max(axis=1).astype(np.float64)


def margin(probs):
    top2 = np.partition(probs.astype(np.float64), -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs):
    p = probs.astype(np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return 1.0 + plogp.sum(axis=1) / np.log(p.shape[1])


def mean_abs_margin(probs):
    return np.abs(probs.astype(np.float64) - 0.5).mean(axis=1)


def stage_roles(count):
    """Metric labels of the stages, as littlebig.contract.stage_models names them."""
    return ("little", *(f"stage{k}" for k in range(1, count - 1)), "big")


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    model: str  # the child model's name
    role: str  # little, stage1, ..., big (metric labels)
    macs: int  # per row, for the live cost metric


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A declared input: forwarded to every stage unchanged."""

    name: str
    dtype: np.dtype
    dims: tuple  # without the batch dim; -1: any size

    def check(self, array):
        if array.dtype != self.dtype:
            raise RequestError(f"input {self.name!r} must be {self.dtype.name}, got {array.dtype}")
        if array.ndim != len(self.dims) + 1 or any(d not in (-1, n) for d, n in zip(self.dims, array.shape[1:])):
            expected = ", ".join(str(d) for d in ("N",) + self.dims)
            raise RequestError(f"input {self.name!r} must have shape [{expected}], got {list(array.shape)}")


@dataclasses.dataclass
class Accepted:
    """A parsed request."""

    tensors: list  # the request's own input pb_utils.Tensors, in declared order
    arrays: list  # their numpy views
    thresholds: tuple  # T_0 .. T_{K-2}
    want_probs: bool
    on_big_failure: str
    pinned: bool = False  # the request sent its own thresholds: gears never change them


@dataclasses.dataclass
class ChildAnswer:
    """One stage's answer on some rows: class (or multi-hot labels), gating signal, PROBS when asked."""

    label: np.ndarray  # int64 [N] (multi-label: int32 [N, C])
    confidence: np.ndarray  # float64 [N]
    probs: np.ndarray | None  # float32 [N, C]

    def rows(self, mask):
        return ChildAnswer(self.label[mask], self.confidence[mask], None if self.probs is None else self.probs[mask])


@dataclasses.dataclass
class Waiting:
    """A request with at least one row for a later stage, answered when its rows are settled."""

    sender: object  # the request's response sender
    rows: slice
    want_probs: bool
    on_big_failure: str


@dataclasses.dataclass
class Answers:
    """Per-row answers of one batch: the latest stage's answer on each row, and which stage gave it."""

    label: np.ndarray
    confidence: np.ndarray
    route: np.ndarray
    probs: np.ndarray | None  # only when some request asked for PROBS (or the ensemble needs them)
    multilabel: bool
    thresholds: np.ndarray  # float64 [N, K-1]: the thresholds that applied to each row

    def fill(self, rows, answer, route):
        self.label[rows] = answer.label
        self.confidence[rows] = answer.confidence
        self.route[rows] = route
        if self.probs is not None and answer.probs is not None:
            if not self.probs.flags.writeable:  # stage 0's output buffer
                self.probs = np.array(self.probs)
            self.probs[rows] = answer.probs

    def response(self, rows, want_probs):
        label = self.label[rows]
        outputs = [
            pb_utils.Tensor("LABELS", label) if self.multilabel else pb_utils.Tensor("CLASS", label.reshape(-1, 1)),
            pb_utils.Tensor("CONFIDENCE", self.confidence[rows].astype(np.float32).reshape(-1, 1)),
            pb_utils.Tensor("ROUTE", self.route[rows].reshape(-1, 1)),
            pb_utils.Tensor("THRESHOLD", self.thresholds[rows]),
        ]
        if want_probs:
            outputs.append(pb_utils.Tensor("PROBS", np.ascontiguousarray(self.probs[rows])))
        return pb_utils.InferenceResponse(output_tensors=outputs)


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


class Held:
    """With gears and one gate instance, escalations wait for big here, one call in flight, instead of
    in big's queue: a step down can still settle their rows before big spends anything on them (the
    call in flight is computed whatever happens), and the open rows of all the escalations held leave
    together in the next call (up to ``max_rows``), as big's own batcher would have taken them. With
    several gate instances each would hold its rows while big takes another instance's call, so held
    rows would miss the batch big takes next: there escalations go to big at once, as without gears."""

    def __init__(self, stage, infer, max_rows):
        self.stage = stage
        self.infer = infer  # async (stage, inputs, want_probs) -> ChildAnswer, raising ChildError
        self.max_rows = max_rows
        self.queue = []  # (escalation, want_probs, future of its answer)
        self.call = None  # the task of the call in flight

    def run(self, escalation, want_probs):
        """A future of big's answer on the escalation's open rows at the time its call leaves (None when
        a step down settled all of them first); the escalation is narrowed to those rows."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((escalation, want_probs, future))
        self._next()
        return future

    def _next(self):
        if self.call is not None:
            return
        batch, rows = [], 0
        while self.queue:
            escalation, want_probs, future = self.queue[0]
            still = escalation.open[escalation.pending]
            if not still.any():
                self.queue.pop(0)
                future.set_result(None)
                continue
            if batch and rows + int(still.sum()) > self.max_rows:
                break
            self.queue.pop(0)
            escalation.narrow(still)
            batch.append((escalation, want_probs, future))
            rows += len(escalation.pending)
        if batch:
            self.call = asyncio.ensure_future(self._call(batch))

    async def _call(self, batch):
        try:
            parts = [escalation.inputs for escalation, _, _ in batch]
            inputs = parts[0] if len(parts) == 1 else [np.concatenate(columns) for columns in zip(*parts)]
            answer = await self.infer(self.stage, inputs, any(want for _, want, _ in batch))
            start = 0
            for escalation, _, future in batch:
                future.set_result(answer.rows(slice(start, start + len(escalation.pending))))
                start += len(escalation.pending)
        except Exception as err:  # noqa: BLE001 - every escalation of the call must hear of it
            failure = err if isinstance(err, ChildError) else ChildError(self.stage, repr(err))
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        finally:
            self.call = None
            self._next()


class LocalStage:
    """Stage 0 run in the gate's own process with onnxruntime (config parameter little_onnx)."""

    def __init__(self, path, intra_op_threads):
        import onnxruntime as ort  # only here: the gate without little_onnx needs no onnxruntime

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Spinning threads would steal the cores big and the other gate instances need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, names, arrays):
        """(outputs by name, seconds spent)."""
        started = time.perf_counter()
        results = self.session.run(names, dict(zip(self.input_names, arrays)))
        return dict(zip(names, results)), time.perf_counter() - started


class Counters:
    """The gate's counters, kept here and handed to Triton's metrics at most once per interval.

    Every pb_utils Metric.increment is a synchronous round trip to the server process; at two to four
    per execution they were a measurable part of the gate's own time. A timer on the stub's event loop
    (the thread of every other BLS call and response send) flushes what has accumulated, so /metrics
    lags the answers by at most the interval and no count is lost.
    """

    def __init__(self, interval_s):
        self.interval_s = interval_s
        self.pending = {}  # metric -> amount not yet handed to Triton
        self.timer = None

    def add(self, metric, amount=1):
        if amount:
            self.pending[metric] = self.pending.get(metric, 0) + amount
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(self.interval_s, self.flush)

    def flush(self):
        self.timer = None
        pending, self.pending = self.pending, {}
        for metric, amount in pending.items():
            metric.increment(amount)


def parse_on_big_failure(value, where):
    if value not in ON_BIG_FAILURE:
        raise RequestError(f"on_big_failure ({where}) must be one of {', '.join(map(repr, ON_BIG_FAILURE))}, got {value!r}")
    return value


def parse_threshold(value, where):
    """T as a float in [0, 1]; numbers and numeric strings are accepted, anything else is refused."""
    if isinstance(value, bool):
        raise RequestError(f"threshold ({where}) must be a number in [0, 1], got {value!r}")
    try:
        threshold = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RequestError(f"threshold ({where}) must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise RequestError(f"threshold ({where}) must be in [0, 1], got {value!r}")
    return threshold


def parse_thresholds(value, count, where):
    """``count`` thresholds from "T1,T2,..." (or one number when count is 1), each as parse_threshold."""
    parts = value.split(",") if isinstance(value, str) else [value]
    if len(parts) != count:
        raise RequestError(
            f"thresholds ({where}) must be {count} comma-separated numbers in [0, 1] (one per stage but the last), got {value!r}"
        )
    return tuple(parse_threshold(part, where) for part in parts)


def config_stages(params):
    """The stages named by the config (stage_models, or little_model and big_model) with their MACs."""
    if params.get("stage_models"):
        models = params["stage_models"].split(",")
    else:
        for key in ("little_model", "big_model"):
            if not params.get(key):
                raise pb_utils.TritonModelException(f"config parameter {key!r} is missing")
        models = [params["little_model"], params["big_model"]]
    if len(models) < 2:
        raise pb_utils.TritonModelException(f"stage_models must name at least two models, got {models}")
    if params.get("stage_macs"):
        macs = [int(m) for m in params["stage_macs"].split(",")]
    else:
        macs = [int(params.get("macs_little", "0")), int(params.get("macs_big", "0"))]
    if len(macs) != len(models):
        raise pb_utils.TritonModelException(f"stage_macs has {len(macs)} values for {len(models)} stages")
    roles = stage_roles(len(models))
    return tuple(Stage(k, model, roles[k], macs[k]) for k, model in enumerate(models))


def config_thresholds(params, count):
    """The config's K-1 thresholds: `thresholds`, or (two stages) `threshold`."""
    if "thresholds" in params and "threshold" in params:
        raise RequestError("config has both 'threshold' and 'thresholds': keep one")
    if "thresholds" in params:
        return parse_thresholds(params["thresholds"], count - 1, "config parameter")
    if count != 2:
        raise RequestError(f"config parameter 'thresholds' is missing ({count - 1} values for {count} stages)")
    return (parse_threshold(params.get("threshold", "0.5"), "config parameter"),)


def config_inputs(config):
    return tuple(
        InputSpec(i["name"], np.dtype(pb_utils.triton_string_to_numpy(i["data_type"])), tuple(int(d) for d in i["dims"]))
        for i in config["input"]
    )


def config_seconds(params, key, default="0"):
    """A config parameter in ms (absent: ``default``), as seconds: a finite number >= 0."""
    text = params.get(key, default)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0.0):
        raise pb_utils.TritonModelException(f"{key} must be a number of ms >= 0 (0: off), got {text!r}")
    return value / 1000.0


def parse_gears(text, threshold):
    """The config's ladder: [[T, expected drop], ...] starting at the config T, T strictly decreasing."""
    try:
        ladder = [(float(t), float(d)) for t, d in json.loads(text)]
    except (ValueError, TypeError) as err:
        raise RequestError(f"config parameter gears must be JSON [[T, drop], ...], got {text!r} ({err})") from None
    thresholds = [t for t, _ in ladder]
    if not ladder or thresholds[0] != threshold:
        raise RequestError(f"config parameter gears must start at the config threshold {threshold}, got {thresholds[:1]}")
    if any(b >= a for a, b in zip(thresholds, thresholds[1:])) or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise RequestError(f"gear thresholds must be in [0, 1] and strictly decreasing, got {thresholds}")
    return ladder


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
        import mmap

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
        import fcntl

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
        import fcntl

        # Explicitly: the mmap holds a duplicate of the descriptor, and with it the lock, until unmapped.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @staticmethod
    def _open_locked(path):
        """The file, created if missing and locked; never one that the last instance just removed."""
        import fcntl

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


def pooled_observations(model_name):
    """The gears' observations shared by this model's instances on this server (the stub's parent
    process is its tritonserver); this instance's own when the shared file cannot be made. Files left by
    servers that are gone are removed."""
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
        pb_utils.Logger.log_warn(f"littlebig gears: each instance decides from its own answers only ({err})")
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


class Gears:
    """Moves T along the calibrated ladder to keep a latency target.

    Signals (Triton does not tell a Python model when a request arrived or how long it queued), from
    ``Observations``: this instance's own, or pooled over the model's instances on this server
    (``PooledObservations``), so that every instance sees every answer and they move together. Each
    answer's time from the start of its execute to its send, plus the instance's last wait for little as
    the estimate of the time spent in the gate's queue (the dynamic batcher hands over everything waiting,
    so a request waits about one execute), and the age of the oldest escalation still waiting for big
    (big's backlog shows there before any answer does). Every ``interval_s`` the answers of the last
    ``HORIZON`` intervals are judged as a p99 target allows: a few of them may be late. Rows the
    deadline answered count as late: they waited that long for big, and an overload the deadline
    absorbs would otherwise look like a met target while big's backlog grows.

    Down only on a miss, and then to the last gear: more than ``LATE_SHARE`` of the last ``HORIZON``
    intervals' answers over the target, or the oldest escalation waiting for more than ``FAR_OVER`` x
    the target (a backlog already built up, before its answers are in). A gate that meets a p99 target
    near its capacity has bursts in which a few answers are late; once load exceeds what gear 0
    sustains, most answers are. A rule on the slowest answers of each interval moved on such bursts and
    changed answers where the fixed T met the target (bench/results/overload_steep). When
    the miss is real, big's queue already holds a backlog that only the fewest escalations drain
    quickly, so half-measures (one gear per interval) let it grow for several more intervals. Up
    slowly: after ``raise_after`` intervals in a row with the horizon's p99 and the oldest escalation
    below ``RAISE_BELOW`` x target, one gear up; ``raise_after`` starts at ``RAISE_AFTER`` and doubles
    (up to ``MAX_RAISE_AFTER``) when a miss follows a climb within ``raise_after`` intervals (the gear
    climbed into could not take the load), and halves back at each climb after one that held. After a
    quiet spell (nothing in flight, nothing answered for an interval) there is no load to shed: back
    to gear 0, ``raise_after`` reset. While the target is met the gear stays 0.
    """

    RAISE_BELOW = 0.5
    RAISE_AFTER = 4
    MAX_RAISE_AFTER = 32
    HORIZON = 4  # intervals of answers judged at each decision
    LATE_SHARE = 0.2
    LATE = 1.01  # x target: what a deadline answer counts as
    FAR_OVER = 2.0

    def __init__(self, ladder, target_s, interval_s, metrics, count, now, seen=None, deadline_s=0.0):
        self.count = count  # Counters.add: counters reach Triton batched, like the gate's own
        self.thresholds = [t for t, _ in ladder]
        self.drops = [d for _, d in ladder]
        self.target_s, self.interval_s = target_s, interval_s
        self.deadline_s = deadline_s  # gear_deadline_ms: how long an adaptive row waits for big (0: no bound)
        self.metrics = metrics  # GearMetrics
        self.seen = seen if seen is not None else Observations()
        self.gear = 0
        self.queue_s = 0.0  # this instance's last wait for little: the estimated gate queue wait
        self.calm = 0  # intervals in a row below RAISE_BELOW x target
        self.raise_after = self.RAISE_AFTER  # calm intervals needed to climb one gear
        self.climbed = self.missed = float("-inf")  # when the gate last climbed, last confirmed a miss
        self.decided = self.accounted = self.began = now

    @property
    def threshold(self):
        return self.thresholds[self.gear]

    @property
    def in_force(self):
        """The cascade's thresholds in this gear (gears move T_0 of a two-stage cascade)."""
        return (self.thresholds[self.gear],)

    def start(self, now):
        """At the start of an execute: maybe change gear; returns when its requests probably arrived."""
        self.decide(now)
        self.began = now
        return now - self.queue_s

    def decide(self, now):
        """Reconsider the gear if an interval has passed since the last decision: this instance's, or
        with pooled observations any instance's (the controller's state is then the pool's, so the
        instances take one decision per interval between them and are always in the same gear)."""
        before = self.gear
        with self.seen.shared(self):
            if now - self.decided >= self.interval_s:
                self._decide(now)
        self.count(self.metrics.seconds[before], now - self.accounted)
        self.accounted = now
        if self.gear != before:
            self.metrics.gear.set(self.gear)
            self.metrics.threshold.set(self.threshold)

    def little_answered(self, now):
        self.queue_s = now - self.began

    def answered(self, started, count, now, late=False):
        """``count`` requests answered; ``late``: by the deadline, which the controller counts as over the
        target (they waited that long for big, so without the deadline they would have been), or an
        overload the deadline absorbs would look like a met target."""
        if count:
            latency = now - started
            self.seen.answered(max(latency, self.LATE * self.target_s) if late else latency, count, now)

    def adapted(self, rows, threshold):
        """``rows`` were answered at gear T ``threshold`` (not pinned; the gear may have moved while little
        ran): the expected accuracy they gave up."""
        drop = self.drops[self.thresholds.index(threshold)]
        if drop:
            self.count(self.metrics.cost, rows * drop)

    def reanswered(self, old_thresholds, new_thresholds):
        """Rows escalated at ``old_thresholds`` and now answered by little at ``new_thresholds`` (gears'
        T): the expected accuracy they gave up beyond what was counted when they arrived."""
        drop = {t: d for t, d in zip(self.thresholds, self.drops)}
        extra = sum(drop[float(new)] - drop.get(float(old), 0.0) for old, new in zip(old_thresholds, new_thresholds))
        if extra > 0:
            self.count(self.metrics.cost, extra)

    def highest_cleared(self, signals):
        """Per row, the highest gear T at or below its signal (NaN below the last gear)."""
        ladder = np.asarray(self.thresholds)
        gear = np.searchsorted(-ladder, -np.asarray(signals, dtype=np.float64), side="left")
        return np.where(gear < len(ladder), ladder[np.minimum(gear, len(ladder) - 1)], np.nan)

    def escalation_started(self, started):
        self.seen.escalation_started(started)

    def escalation_ended(self, started):
        self.seen.escalation_ended(started)

    def _decide(self, now):
        oldest = self.seen.oldest()
        age = now - oldest if oldest is not None else 0.0
        window = self.seen.window(now - self.HORIZON * self.interval_s)
        late = float(np.mean(window > self.target_s)) if len(window) else 0.0
        p99 = float(np.percentile(window, 99)) if len(window) else 0.0
        if oldest is None and now - self.seen.last_answer() > self.interval_s:
            gear = 0  # quiet spell: what the window holds is old news
            self.calm = 0
            self.raise_after = self.RAISE_AFTER
        elif late > self.LATE_SHARE or age > self.FAR_OVER * self.target_s:
            gear = self._missed(now)
        elif max(p99, age) < self.RAISE_BELOW * self.target_s:
            gear = self._calm(now)
        else:
            gear, self.calm = self.gear, 0
        self.gear = gear
        self.decided = now

    def _missed(self, now):
        """A miss: to the last gear."""
        self.calm = 0
        if now - self.climbed < self.raise_after * self.interval_s:
            self.raise_after = min(2 * self.raise_after, self.MAX_RAISE_AFTER)  # the last climb went too far
            self.climbed = float("-inf")  # once per climb
        self.missed = now
        return len(self.thresholds) - 1

    def _calm(self, now):
        """Comfortably under the target: one gear up after ``raise_after`` calm intervals in a row."""
        self.calm += max(int(round((now - self.decided) / self.interval_s)), 1)
        if self.gear == 0 or self.calm < self.raise_after:
            return self.gear
        if self.missed < self.climbed:
            self.raise_after = max(self.raise_after // 2, self.RAISE_AFTER)  # the last climb held
        self.calm, self.climbed = 0, now
        return self.gear - 1


@dataclasses.dataclass
class GearMetrics:
    gear: object  # gauge: the gear in force
    threshold: object  # gauge: its T
    seconds: list  # counters per gear: seconds spent in it
    cost: object  # counter: expected answers lost against the config T (sum of the gears' drops per row)
    settled: object  # counter: rows waiting for big that a step down answered with little's answer
    deadline: object  # counter: rows waiting for big past the deadline answered with little's answer
    dropped: object  # counter: rows of calls that big's queue dropped at their deadline (never computed)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.stages = config_stages(params)
        try:
            self.thresholds = config_thresholds(params, len(self.stages))
            self.on_big_failure = parse_on_big_failure(params.get("on_big_failure", "fail"), "config parameter")
        except RequestError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        self.ensemble_weight = float(params.get("ensemble_weight", "1"))
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise pb_utils.TritonModelException(f"ensemble_weight must be in [0, 1], got {self.ensemble_weight}")
        self.ensemble = self.ensemble_weight != 1.0
        if self.ensemble and len(self.stages) != 2:
            raise pb_utils.TritonModelException("ensemble_weight (paper Eq. 8) needs exactly two stages")
        self.task = params.get("task", "multiclass")
        self.signal = params.get("signal", "mean_abs_margin" if self.task == "multilabel" else "max_softmax")
        if self.task not in TASKS or self.signal not in SIGNALS:
            raise pb_utils.TritonModelException(f"task must be one of {TASKS} and signal one of {SIGNALS}, got {self.task!r}, {self.signal!r}")
        self.signal_of = {"max_softmax": max_softmax, "margin": margin, "entropy": entropy, "mean_abs_margin": mean_abs_margin}[self.signal]
        # Bound on each BLS call, so a stalled child cannot hold a request forever.
        self.child_timeout_s = float(params.get("child_timeout_ms", "30000")) / 1000.0
        # The in-graph top-1 is the max_softmax signal: then PROBS are read only when needed.
        self.children_top1 = params.get("children_top1", "0") == "1" and self.signal == "max_softmax" and self.task == "multiclass"
        self.counters = Counters(float(params.get("metrics_interval_ms", "100")) / 1000.0)
        self.inputs = config_inputs(config)
        self.local = None
        if params.get("little_onnx"):
            # args["model_repository"] is this model's folder; the path is relative to the repository.
            path = os.path.join(os.path.dirname(args["model_repository"]), params["little_onnx"])
            self.local = LocalStage(path, int(params.get("little_intra_op_threads", "0")))
        self._init_metrics(args["model_name"])
        self.gears = self._init_gears(params, args["model_name"], args["model_instance_name"])
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        self.held = Held(self.stages[-1], self._infer, int(config["max_batch_size"]) or 1) if self.gears and instances == 1 else None
        # Escalations still running after their execute returned; a strong reference keeps each task
        # alive until it ends (the event loop holds tasks only weakly). No finalize waits for them:
        # Triton keeps an instance until every response it owes is sent (a reload under load
        # called finalize only after the pending escalation had answered).
        self._escalations = set()
        self._waiting = set()  # with gears: escalations still waiting for big, which a step down may settle
        self._ticker = None  # with gears: the timer that reconsiders the gear while escalations wait

    def finalize(self):
        self.counters.flush()  # the last interval's counts; the timer does not outlive the instance
        if self.gears:
            if self._ticker is not None:
                self._ticker.cancel()
            self.gears.seen.close()

    def _init_metrics(self, model_name):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        families = {
            name: pb_utils.MetricFamily(name=name, description=description, kind=kind)
            for name, description, kind in (
                ("littlebig_requests_total", "Inference requests the gate answered (ok) or refused (error)", counter),
                ("littlebig_rows_total", "Rows answered, by the stage that answered them", counter),
                ("littlebig_macs_total", "Multiply-accumulates spent (each stage on the rows it ran on); "
                 "divided by littlebig_rows_total it is the live cost per row (paper Eq. 5)", counter),
                ("littlebig_threshold", "Threshold in force (config value; requests may override it); "
                 "cascades of more than two stages label it by stage", gauge),
                ("littlebig_errors_total", "Error answers by cause: request (client mistake, INVALID_ARG), "
                 "the stage that failed or timed out (UNAVAILABLE), or gate (its own failure, INTERNAL)", counter),
                ("littlebig_fallback_rows_total", "Rows answered by the previous stage because a stage failed "
                 "(on_big_failure=little, ROUTE = K + k)", counter),
                ("littlebig_in_gate_seconds_total", "Seconds spent running a stage inside the gate's process "
                 "(little_onnx); the rest of the gate's compute time is its own", counter),
            )
        }

        def metric(family, **labels):
            return families[family].Metric(labels={"model": model_name, **labels})

        self.metric_ok = metric("littlebig_requests_total", status="ok")
        self.metric_error = metric("littlebig_requests_total", status="error")
        self.metric_rows = [metric("littlebig_rows_total", route=stage.role) for stage in self.stages]
        self.metric_macs = metric("littlebig_macs_total")
        if len(self.stages) == 2:
            metric("littlebig_threshold").set(self.thresholds[0])
        else:
            for stage, threshold in zip(self.stages, self.thresholds):
                metric("littlebig_threshold", stage=stage.role).set(threshold)
        causes = ["request", "gate"] + [stage.role for stage in self.stages]
        self.metric_errors = {cause: metric("littlebig_errors_total", cause=cause) for cause in causes}
        self.metric_fallback = metric("littlebig_fallback_rows_total")
        self.metric_in_gate_seconds = metric("littlebig_in_gate_seconds_total", stage=self.stages[0].role)
        # Keep the families alive as long as their metrics.
        self._metric_families = families

    def _init_gears(self, params, model_name, instance):
        """Gears when the config has a ladder and a latency target; None (T stays fixed) otherwise."""
        target_s = config_seconds(params, "latency_target_ms")
        if not params.get("gears") or not target_s:
            return None
        if len(self.stages) != 2:
            raise pb_utils.TritonModelException(f"gears apply to two-stage cascades; this one has {len(self.stages)} stages")
        try:
            ladder = parse_gears(params["gears"], self.thresholds[0])
        except RequestError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        families = [
            pb_utils.MetricFamily(name=name, description=description, kind=kind)
            for name, description, kind in (
                ("littlebig_gear", "Gear in force (0: the config T; higher: lower T), per gate instance", gauge),
                ("littlebig_gear_threshold", "T of the gear in force, per gate instance", gauge),
                ("littlebig_gear_seconds_total", "Seconds spent in each gear, per gate instance", counter),
                ("littlebig_gear_accuracy_cost_total", "Expected answers lost against the config T: each row answered "
                 "in a lower gear adds that gear's calibrated drop; divided by littlebig_rows_total it is the "
                 "expected accuracy drop", counter),
                ("littlebig_gear_settled_rows_total", "Rows waiting for big that a step down of the gears answered "
                 "at once with little's answer at the new T", counter),
                ("littlebig_gear_deadline_rows_total", "Rows still waiting for big at the deadline (gear_deadline_ms) "
                 "answered with little's answer at the highest gear T their signal clears", counter),
                ("littlebig_gear_dropped_rows_total", "Rows whose call big's queue dropped at their deadline: the "
                 "deadline answered them and big never computed them", counter),
            )
        ]
        self._gear_families = families  # keep the families alive as long as their metrics

        def metric(family, **labels):
            return family.Metric(labels={"model": model_name, "instance": instance, **labels})

        metrics = GearMetrics(
            metric(families[0]), metric(families[1]),
            [metric(families[2], gear=str(k), threshold=repr(t)) for k, (t, _) in enumerate(ladder)], metric(families[3]),
            metric(families[4]), metric(families[5]), metric(families[6]),
        )
        metrics.gear.set(0)
        metrics.threshold.set(self.thresholds[0])
        interval_s = config_seconds(params, "gear_interval_ms", "500")
        if not interval_s:
            raise pb_utils.TritonModelException(f"gear_interval_ms must be a number of ms > 0 with gears, got {params['gear_interval_ms']!r}")
        return Gears(ladder, target_s, interval_s, metrics, self.counters.add, time.monotonic(),
                     pooled_observations(model_name), config_seconds(params, "gear_deadline_ms"))

    def _parse_inputs(self, request):
        tensors, arrays = [], []
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise RequestError(f"missing input {spec.name!r}")
            array = tensor.as_numpy()
            spec.check(array)
            tensors.append(tensor)
            arrays.append(array)
        counts = {spec.name: len(array) for spec, array in zip(self.inputs, arrays)}
        if len(set(counts.values())) > 1:
            raise RequestError(f"inputs must have the same number of rows, got {counts}")
        if len(arrays[0]) == 0:
            raise RequestError(f"input {self.inputs[0].name!r} has no rows: send at least one row")
        return tensors, arrays

    def _parse_thresholds(self, parameters, default):
        if "threshold" in parameters and "thresholds" in parameters:
            raise RequestError("send either 'threshold' or 'thresholds', not both")
        if "thresholds" in parameters:
            return parse_thresholds(parameters["thresholds"], len(self.stages) - 1, "request parameter")
        if "threshold" in parameters:
            if len(self.stages) != 2:
                raise RequestError(
                    f"request parameter 'threshold' is for two-stage cascades; this one has {len(self.stages)} "
                    f"stages: send 'thresholds' with {len(self.stages) - 1} values"
                )
            return (parse_threshold(parameters["threshold"], "request parameter"),)
        return default

    def _parse_request(self, request, default_thresholds):
        tensors, arrays = self._parse_inputs(request)
        parameters = json.loads(request.parameters() or "{}")
        unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
        if unknown:
            raise RequestError(
                f"unknown request parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_PARAMETERS)}"
            )
        thresholds = self._parse_thresholds(parameters, default_thresholds)
        on_big_failure = self.on_big_failure
        if "on_big_failure" in parameters:
            on_big_failure = parse_on_big_failure(parameters["on_big_failure"], "request parameter")
        pinned = "threshold" in parameters or "thresholds" in parameters
        return Accepted(tensors, arrays, thresholds, "PROBS" in request.requested_output_names(), on_big_failure, pinned)

    def _wanted(self, want_probs):
        top1 = ["CLASS", "CONFIDENCE"] if self.children_top1 else []
        return top1 + (["PROBS"] if want_probs or not top1 else [])

    async def _infer(self, stage, inputs, want_probs, queue_s=None):
        """``inputs``: numpy batches, or a request's own input tensors (passed on without a copy);
        ``queue_s``: how long the call may wait in the stage's queue (default: child_timeout_ms)."""
        if stage.index == 0 and self.local is not None:
            return await self._infer_local(stage, inputs, want_probs)
        tensors = [x if isinstance(x, pb_utils.Tensor) else pb_utils.Tensor(s.name, x) for s, x in zip(self.inputs, inputs)]
        outputs = self._wanted(want_probs)
        # The request's own timeout is passed to Triton (its schedulers may drop a call queued past it);
        # wait_for bounds the wait whatever the child does (a stub stuck while executing).
        request = pb_utils.InferenceRequest(
            model_name=stage.model,
            requested_output_names=outputs,
            inputs=tensors,
            timeout=int((self.child_timeout_s if queue_s is None else max(queue_s, 1e-3)) * 1e6),
            # GPU children answer in GPU memory by default, which as_numpy() cannot read.
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        try:
            if self.child_timeout_s > 0:
                response = await asyncio.wait_for(request.async_exec(), self.child_timeout_s)
            else:
                response = await request.async_exec()
        except asyncio.TimeoutError:
            raise ChildError(stage, f"no answer within {self.child_timeout_s:g} s (child_timeout_ms)") from None
        except Exception as err:  # noqa: BLE001 - e.g. the model is not loaded
            raise ChildError(stage, str(err)) from None
        if response.has_error():
            err = ChildError(stage, response.error().message())
            err.dropped = queue_s is not None and QUEUE_TIMEOUT in response.error().message()
            raise err
        return self._child_answer(lambda name: pb_utils.get_output_tensor_by_name(response, name).as_numpy(), want_probs)

    async def _infer_local(self, stage, inputs, want_probs):
        arrays = [x.as_numpy() if isinstance(x, pb_utils.Tensor) else x for x in inputs]
        names = self._wanted(want_probs)
        try:
            if self._escalations:
                # An executor thread, so the loop keeps calling big and sending escalated answers while
                # little runs (onnxruntime releases the GIL); no BLS call or send happens on that thread.
                outputs, seconds = await asyncio.get_running_loop().run_in_executor(None, self.local.run, names, arrays)
            else:  # nothing else needs the loop: the two thread handoffs (~0.4 ms) are saved
                outputs, seconds = self.local.run(names, arrays)
        except Exception as err:  # noqa: BLE001 - onnxruntime's errors
            raise ChildError(stage, f"in the gate's process: {err}") from None
        self.counters.add(self.metric_in_gate_seconds, seconds)
        return self._child_answer(outputs.__getitem__, want_probs)

    def _child_answer(self, output, want_probs):
        """The stage's answer from ``output(name)``, its output arrays."""
        if self.children_top1:  # copies: the answers are updated in place for escalated rows
            probs = output("PROBS") if want_probs else None
            return ChildAnswer(output("CLASS")[:, 0].astype(np.int64), output("CONFIDENCE")[:, 0].astype(np.float64), probs)
        return self._answer_of(output("PROBS"))

    def _answer_of(self, probs):
        """Class (or multi-hot labels) and gating signal from a stage's probabilities."""
        if self.task == "multilabel":
            label = (probs >= MULTILABEL_CUT).astype(np.int32)
        else:
            label = probs.argmax(axis=1).astype(np.int64)
        return ChildAnswer(label, self.signal_of(probs), probs)

    def _unsure(self, stage, answer, thresholds):
        """Rows the stage leaves to the next one: signal < T_k (float64, so T means exactly the number sent)."""
        if stage.index == len(self.stages) - 1:
            return np.zeros(len(answer.confidence), dtype=bool)
        return answer.confidence < thresholds[:, stage.index]

    def _count(self, response):
        self.counters.add(self.metric_error if response.has_error() else self.metric_ok)
        return response

    def _send(self, sender, response):
        # A non-decoupled model may send one final response per request through the request's
        # sender instead of returning it; it leaves at once, so it does not wait for later stages.
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # noqa: BLE001 - that request is lost; the others sent with it still leave
            pb_utils.Logger.log_error(f"littlebig: sending a response failed: {err!r}")
            if not response.has_error():  # an error answer was counted by its cause already
                self.counters.add(self.metric_errors["gate"])
            self.counters.add(self.metric_error)
            return
        self._count(response)

    def _error(self, err):
        """The error answer for a RequestError (INVALID_ARG), a ChildError (UNAVAILABLE), or the gate's
        own failure (INTERNAL)."""
        message = str(err)
        if isinstance(err, RequestError):
            cause, code = "request", pb_utils.TritonError.INVALID_ARG
        elif isinstance(err, ChildError):
            cause, code = err.stage.role, pb_utils.TritonError.UNAVAILABLE
        else:
            cause, code, message = "gate", pb_utils.TritonError.INTERNAL, f"the gate failed: {err!r}"
        self.counters.add(self.metric_errors[cause])
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _accept(self, requests, thresholds):
        """Parse every request (``thresholds``: for those that send none of their own): (accepted ones,
        responses with the refusals filled in)."""
        responses = [None] * len(requests)
        accepted = []
        for index, request in enumerate(requests):
            try:
                accepted.append((index, self._parse_request(request, thresholds)))
            except RequestError as err:
                responses[index] = self._error(err)
        return accepted, responses

    def _batch_inputs(self, accepted):
        """Stage 0's inputs: one request's own tensors (no copy), or every input concatenated."""
        if len(accepted) == 1:
            return accepted[0][1].tensors, accepted[0][1].arrays
        arrays = [np.concatenate([a.arrays[i] for _, a in accepted]) for i in range(len(self.inputs))]
        return arrays, arrays

    async def execute(self, requests):
        gears = self.gears
        started = self._gears_start() if gears else None
        applied = gears.in_force if gears else self.thresholds  # a tick may move the gear while little runs
        accepted, responses = self._accept(requests, applied)
        if not accepted:
            return [self._count(r) for r in responses]

        counts = [len(a.arrays[0]) for _, a in accepted]
        ends = np.cumsum(counts)
        rows_of = [slice(end - n, end) for end, n in zip(ends, counts)]
        first_inputs, arrays = self._batch_inputs(accepted)
        thresholds = np.repeat(np.asarray([a.thresholds for _, a in accepted], dtype=np.float64), counts, axis=0)
        keep_probs = self.ensemble or any(a.want_probs for _, a in accepted)
        first = self.stages[0]
        try:
            answer = await self._infer(first, first_inputs, keep_probs)
        except ChildError as err:
            for index, _ in accepted:
                responses[index] = self._error(err)
            if gears:
                gears.answered(started, len(accepted), time.monotonic())
            return [self._count(r) for r in responses]
        if gears:
            gears.little_answered(time.monotonic())
            gears.adapted(sum(n for n, (_, a) in zip(counts, accepted) if not a.pinned), applied[0])

        route = np.zeros(len(answer.confidence), dtype=np.int32)
        answers = Answers(answer.label, answer.confidence, route, answer.probs if keep_probs else None, self.task == "multilabel",
                          thresholds)
        unsure = self._unsure(first, answer, thresholds)
        pending = np.flatnonzero(unsure)
        self.counters.add(self.metric_rows[0], len(route) - len(pending))
        self.counters.add(self.metric_macs, len(route) * first.macs)
        waiting = []  # the requests with a row for a later stage
        for (index, request), rows in zip(accepted, rows_of):
            if unsure[rows].any():
                waiting.append(Waiting(requests[index].get_response_sender(), rows, request.want_probs, request.on_big_failure))
            else:
                responses[index] = answers.response(rows, request.want_probs)
        if gears:
            gears.answered(started, len(accepted) - len(waiting), time.monotonic())
        if not waiting:
            return [self._count(r) for r in responses]  # one message back for the whole batch

        # Everything already decided leaves now; the rest is answered by a background task.
        for index, response in enumerate(responses):
            if response is not None:
                self._send(requests[index].get_response_sender(), response)
        # Fancy indexing copies the rows out of the requests' input buffers, which Triton may free
        # once execute returns.
        adaptive = np.repeat([not a.pinned for _, a in accepted], counts)[pending]
        self._launch(Escalation([x[pending] for x in arrays], pending, thresholds[pending], waiting, unsure, answers, adaptive), started)
        if gears and gears.threshold < applied[0]:
            self._shed(gears.threshold)  # stepped down while little ran: this batch's rows too
        return None

    def _launch(self, escalation, started):
        """The later stages, as a task on the stub's event loop (execute returns without waiting for it)."""
        later = self._escalate(escalation)
        if self.gears:
            escalation.started, escalation.observed = started, True
            self.gears.escalation_started(started)
            self._waiting.add(escalation)
            self._arm_ticker()
            if self.gears.deadline_s:
                delay = max(started + self.gears.deadline_s - time.monotonic(), 0.0)
                escalation.deadline = asyncio.get_running_loop().call_later(delay, self._expire, escalation)
            later = self._observed(later, escalation, len(escalation.waiting))
        task = asyncio.create_task(later)
        self._escalations.add(task)
        task.add_done_callback(self._escalations.discard)

    def _gears_start(self):
        """The gears' decision at the start of an execute; a step down settles what it can of the backlog."""
        before = self.gears.gear
        started = self.gears.start(time.monotonic())
        self._after_decision(before)
        return started

    def _after_decision(self, before):
        if self.gears.gear > before:
            self._shed(self.gears.threshold)

    def _arm_ticker(self):
        if self._ticker is None and self._waiting:
            self._ticker = asyncio.get_running_loop().call_later(self.gears.interval_s, self._tick)

    def _tick(self):
        """While escalations wait for big the gears reconsider every interval even when no request
        arrives here (the pooled view may show a miss in other instances' answers), so a step down
        settles this instance's backlog without waiting for its next execute. On the stub's event loop,
        like every BLS call and response send."""
        self._ticker = None
        if self._waiting:
            before = self.gears.gear
            self.gears.decide(time.monotonic())
            self._after_decision(before)
            self._arm_ticker()

    def _shed(self, threshold):
        """The gears just stepped down to ``threshold``: rows waiting for big whose little signal is >=
        it are answered now with little's answer (Eq. 4 at the T they report), so each waiting request
        whose rows are all settled leaves at once instead of behind big's backlog. Big still answers the
        call it was sent; its answer on those rows is dropped. Rows of pinned requests keep their T."""
        for escalation in list(self._waiting):
            signals = escalation.answers.confidence[escalation.pending]
            self._answer_early(escalation, np.where(signals >= threshold, threshold, np.nan), self.gears.metrics.settled)

    def _expire(self, escalation):
        """An escalation's deadline (gear_deadline_ms after its execute started): its rows still waiting
        for big are answered now with little's answer at the highest gear T their signal clears (Eq. 4 at
        the T they report; the gears' budget holds at every gear), so a burst that big has not caught up
        with costs those rows that gear's expected drop instead of the latency target. Rows below the last
        gear keep waiting for big."""
        if escalation.deadline is not None:
            escalation.deadline.cancel()  # when called before its timer (a dropped call, a late start)
            escalation.deadline = None
        if escalation in self._waiting:
            signals = escalation.answers.confidence[escalation.pending]
            self._answer_early(escalation, self.gears.highest_cleared(signals), self.gears.metrics.deadline, late=True)

    def _drop_after_s(self, escalation, stage):
        """Seconds to the escalation's deadline (<= 0: past it) when every row of it still open would be
        answered at the deadline anyway (adaptive, clearing the last gear; big is the last stage): big's
        queue may drop the call then instead of big computing it (the builder lets big's queue honour a
        call's timeout below the child timeout). None otherwise: the call waits up to child_timeout_ms."""
        if not (self.gears and self.gears.deadline_s) or stage is not self.stages[-1]:
            return None
        if self.child_timeout_s and self.gears.deadline_s >= self.child_timeout_s:
            return None  # big's queue would drop it at the child timeout, not at the deadline
        pending = escalation.pending
        answerable = escalation.adaptive & (escalation.answers.confidence[pending] >= self.gears.thresholds[-1])
        if not (answerable | ~escalation.open[pending]).all():
            return None
        return escalation.started + self.gears.deadline_s - time.monotonic()

    def _answer_early(self, escalation, thresholds, metric, late=False):
        """Little answers the escalation's open, adaptive pending rows whose ``thresholds`` (per pending
        row; NaN: not this one) is set, at that T; the requests whose rows are all settled leave now.
        ``late``: the gears count them as late answers (the deadline's: big would have been late)."""
        answers, pending = escalation.answers, escalation.pending
        settle = escalation.open[pending] & escalation.adaptive & ~np.isnan(thresholds)
        if not settle.any():
            return
        rows = pending[settle]
        self.gears.reanswered(answers.thresholds[rows, 0], thresholds[settle])
        answers.thresholds[rows, 0] = thresholds[settle]
        escalation.open[rows] = False
        self.counters.add(self.metric_rows[0], len(rows))
        self.counters.add(metric, len(rows))
        done = self._responses(escalation, answers)
        for wait, response in done:
            self._send(wait.sender, response)
        escalation.early += len(done)
        self.gears.answered(escalation.started, len(done), time.monotonic(), late)
        if not escalation.waiting:
            self._unobserve(escalation)  # nothing of it waits for big any more

    def _unobserve(self, escalation):
        if escalation.observed:
            escalation.observed = False
            self.gears.escalation_ended(escalation.started)

    async def _observed(self, later, escalation, count):
        """The escalation, with its requests' latency told to the gears (those a step down answered
        were told then)."""
        try:
            await later
        finally:
            self._waiting.discard(escalation)
            self._unobserve(escalation)
            if escalation.deadline is not None:
                escalation.deadline.cancel()
            self.gears.answered(escalation.started, count - escalation.early, time.monotonic())

    async def _escalate(self, escalation):
        """Run the later stages, each on the rows the previous one left unsure, answering each
        waiting request as soon as all its rows are settled. Whatever fails (not a stage: the gate's
        own code, a send), every request still waiting gets an answer: nothing awaits this task."""
        try:
            await self._run_stages(escalation)
        except Exception as err:  # noqa: BLE001 - answered below, logged, counted (cause gate)
            pb_utils.Logger.log_error(f"littlebig: escalation failed: {err!r}")
            failed, escalation.waiting = escalation.waiting, []
            for wait in failed:
                self._send(wait.sender, self._error(err))

    async def _run_stages(self, escalation):
        answers = escalation.answers
        for stage in self.stages[1:]:
            if not escalation.waiting:
                return  # every request answered (by the previous stage, or early by a step down): no call
            want_probs = self.ensemble or any(wait.want_probs for wait in escalation.waiting)
            try:
                if self.held is not None and stage is self.held.stage:
                    answer = await self.held.run(escalation, want_probs)
                    if answer is None:  # a step down settled every row first
                        return
                else:
                    drop_after_s = self._drop_after_s(escalation, stage)
                    if drop_after_s is not None and drop_after_s <= 0.0:
                        self._expire(escalation)  # past its deadline before the call: little answers every row
                        return
                    answer = await self._infer(stage, escalation.inputs, want_probs, drop_after_s)
            except ChildError as err:
                if err.dropped:  # none of its rows needed big: the deadline answers them
                    self.counters.add(self.gears.metrics.dropped, len(escalation.pending))
                    self._expire(escalation)
                while escalation.waiting:  # each leaves once its answer is built (if one fails, _escalate answers the rest)
                    response = self._fallback(escalation.waiting[0], answers, escalation.open, stage, err)
                    self._send(escalation.waiting.pop(0).sender, response)
                return
            for wait, response in self._settle(stage, answer, escalation, answers):
                self._send(wait.sender, response)

    def _settle(self, stage, answer, escalation, answers):
        """Record a stage's answer on the pending rows still open (a step down of the gears may have
        settled some meanwhile); narrow the escalation to the rows it leaves unsure. Returns (waiting,
        response) of the requests it settled."""
        pending = escalation.pending
        if self.ensemble:  # Eq. 8 (two stages): the blend decides the class and the confidence
            answer = self._answer_of((1.0 - self.ensemble_weight) * answers.probs[pending] + self.ensemble_weight * answer.probs)
        still = escalation.open[pending]
        unsure = self._unsure(stage, answer, escalation.thresholds) & still
        answers.fill(pending[still], answer if still.all() else answer.rows(still), stage.index)
        escalation.open[pending[still & ~unsure]] = False
        self.counters.add(self.metric_rows[stage.index], int((still & ~unsure).sum()))
        self.counters.add(self.metric_macs, len(pending) * stage.macs)
        responses = self._responses(escalation, answers)
        if escalation.waiting:  # copies only what the next stage needs
            escalation.narrow(unsure)
        return responses

    @staticmethod
    def _responses(escalation, answers):
        """(wait, response) of the waiting requests whose rows are all settled, which leave the escalation;
        if building one fails they all stay, still owed an answer."""
        done = escalation.leave()
        try:
            return [(wait, answers.response(wait.rows, wait.want_probs)) for wait in done]
        except Exception:
            escalation.waiting = done + escalation.waiting
            raise

    def _fallback(self, wait, answers, open_rows, stage, err):
        """A stage failed: an error, or (on_big_failure=little) the previous stage's answer on the
        rows still open, with ROUTE = K + (that stage's index)."""
        if wait.on_big_failure != "little":
            return self._error(err)
        rows = wait.rows
        fallback = open_rows[rows]
        route = np.where(fallback, len(self.stages) + stage.index - 1, answers.route[rows]).astype(np.int32)
        self.counters.add(self.metric_fallback, int(fallback.sum()))
        probs = None if answers.probs is None else answers.probs[rows]
        return Answers(answers.label[rows], answers.confidence[rows], route, probs, answers.multilabel, answers.thresholds[rows]).response(
            slice(None), wait.want_probs
        )
