"""The options of a repository build: runtime, batching, instances, thresholds, gears, queue bounds."""

from __future__ import annotations

import dataclasses
import math

from littlebig.gate.config import GateConfig

from .facts import RepositoryError

RUNTIMES = ("python", "onnxruntime", "tensorrt", "torch")


@dataclasses.dataclass(frozen=True)
class RepositoryOptions:
    runtime: str = "python"
    max_batch_size: int = 64
    threshold: float = 0.5
    # K stages: T_0 .. T_{K-2} (stage k answers a row when its signal >= T_k); None: (threshold,) for two.
    thresholds: tuple[float, ...] | None = None
    # Gating signal (model_repository/gate/signals.py); None: max_softmax, or mean_abs_margin for multi-label models.
    signal: str | None = None
    ensemble_weight: float = GateConfig.ensemble_weight
    # Two gate instances: while one waits for little's answer, the other gathers the next batch, so
    # little always has work queued (measured on the 2-core CPU server: gate/little at T=0 0.95 -> 0.98).
    gate_instances: int = 2
    little_instances: int = 1
    big_instances: int = 1  # and every later stage's (stage1 ...), as the delay and nice below
    # Dynamic-batching queue delays: how long a model waits for more requests to fill a batch.
    gate_queue_delay_us: int = 0
    little_queue_delay_us: int = 0
    big_queue_delay_us: int = 0
    # onnxruntime threads per python-runtime instance (0: onnxruntime's default, one per core).
    intra_op_threads: int = 0
    # CPU priority increment (nice) of big's python-runtime instances: on a CPU server the requests
    # little answers go first and escalated rows wait for idle cycles. On the 2-core server at
    # concurrency 32 it cut little-answered p50 minus little alone's from ~+50 ms to ~+14 ms; the
    # escalated requests pay (p50 ~460 vs ~400 ms). Big alone is as fast at 19 as at 0 (nothing
    # competes with it). Ignored by the native runtimes.
    big_nice: int = 19
    # Degraded mode: "little" answers escalated rows with little's answer (ROUTE=2) when big fails.
    on_big_failure: str = GateConfig.on_big_failure
    # Bound on each call of the gate to little or big (a stalled child fails the call instead of hanging it).
    child_timeout_ms: int = int(GateConfig.child_timeout_ms)
    # Gears (client/gears.py): the ladder as the gate's JSON parameter [[T, drop], ...], starting at
    # `threshold`, and the latency the gate keeps by moving along it (0: gears off, T stays fixed).
    gears: str | None = None
    latency_target_ms: float = 0.0
    gear_interval_ms: int = int(GateConfig.gear_interval_ms)  # the gate reconsiders its gear at most this often
    # An adaptive row still waiting for big this long is answered by little at the highest gear T its
    # signal clears (None: 0.9 x the target, leaving room to send the answer; 0: rows wait for big).
    gear_deadline_ms: float | None = None
    # Triton's queue policy on the gate: beyond max_queue_size waiting requests (0: no bound), or after
    # waiting queue_timeout_ms (0: no bound), a request is refused at once with UNAVAILABLE.
    max_queue_size: int = 0
    queue_timeout_ms: int = 0
    # Where little runs: inside the gate's process (python runtime only), or as the ensemble's step before
    # the gate. None: inside the gate with the python runtime, where every stage is a Python model and a
    # step would add a second Python hop per request; a step with the native runtimes. The `little`
    # model is served either way (calibration, the supervisor's canary, clients ask it directly).
    little_in_gate: bool | None = None
    # The torch runtime's stage instances on GPUs (KIND_GPU, one per GPU Triton sees and per count);
    # without, on the CPU. The other runtimes choose for themselves.
    gpu: bool = False
    # The audit (docs/operating.md#the-audit): this share of the rows little answers also goes to big after
    # its answer left (0: off), at most audit_in_flight calls per gate instance, each dropped from big's
    # queue after audit_timeout_ms; audit_promise: the drop against big the live bound is checked against.
    audit_rate: float = GateConfig.audit_rate
    audit_in_flight: int = GateConfig.audit_in_flight
    audit_timeout_ms: float = GateConfig.audit_timeout_ms
    audit_promise: float = GateConfig.audit_promise

    @property
    def in_gate(self) -> bool:
        return self.runtime == "python" if self.little_in_gate is None else self.little_in_gate

    def deadline_ms(self) -> float:
        """The gate's gear_deadline_ms: the one given, else 0.9 x the latency target."""
        return float(self.gear_deadline_ms if self.gear_deadline_ms is not None else 0.9 * self.latency_target_ms)

    def validate(self) -> None:
        """The builder's own options; what the gate takes (thresholds, gears, timeouts, ...) GateConfig checks."""
        if self.runtime not in RUNTIMES:
            raise RepositoryError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.max_batch_size < 1:
            raise RepositoryError(f"max batch size must be >= 1, got {self.max_batch_size}")
        for name in ("gate_instances", "little_instances", "big_instances"):
            if getattr(self, name) < 1:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 1")
        if not 0 <= self.big_nice <= 19:
            raise RepositoryError(f"big nice must be in 0..19, got {self.big_nice}")
        if self.gpu and self.runtime != "torch":
            raise RepositoryError(f"--gpu places the torch runtime's instances; --runtime {self.runtime} chooses its own device "
                                  "(onnxruntime: a GPU where there is one; tensorrt: the GPU)")
        if self.little_in_gate and self.runtime != "python":
            raise RepositoryError(
                f"--little-in-gate runs little with onnxruntime inside the gate and needs --runtime python; with "
                f"--runtime {self.runtime} little is a native Triton model the ensemble runs"
            )
        for name in ("gate_queue_delay_us", "little_queue_delay_us", "big_queue_delay_us"):
            if getattr(self, name) < 0:
                raise RepositoryError(f"{name.replace('_', ' ')} must be >= 0 (0: no wait), got {getattr(self, name)}")
        for name in ("max_queue_size", "queue_timeout_ms"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise RepositoryError(f"{name.replace('_', ' ')} must be a finite number >= 0 (0: none), got {getattr(self, name)}")
