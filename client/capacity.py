"""Replicas (and GPUs) needed for a request rate, from the throughputs `littlebig bench` measured.

For each configuration (the cascade behind the gate, big alone) one replica's capacity is its
throughput at the concurrency level it serves best (optionally only levels whose p99 latency meets a
budget), derated by the target utilisation; replicas = ceil(rate / capacity), GPUs =
ceil(replicas / replicas per GPU). The cascade's throughput is the gate's, measured with the
escalation share p seen during the bench. With another expected p (say, from production metrics)
it is re-estimated from the two models' own throughputs: S*(p) x big x the achieved fraction of
S* measured at that level (how close this gate came to the ideal).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from littlebig.errors import UserError

from .benchmark import ideal_speedup


class PlanError(UserError):
    """The bench file or the planning options cannot give a plan."""


@dataclasses.dataclass(frozen=True)
class Level:
    """One measured concurrency level of one configuration."""

    concurrency: int
    throughput: float  # images per second on one replica
    p99_ms: float


@dataclasses.dataclass(frozen=True)
class Sizing:
    name: str
    concurrency: int
    throughput: float  # per replica, before derating
    p99_ms: float
    replicas: int
    gpus: int


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    rate: float
    utilisation: float
    escalation: float  # p the cascade's sizing assumes
    measured_escalation: bool  # True: the gate's measured throughput; False: re-estimated for p
    cascade: Sizing
    big: Sizing

    @property
    def replicas_saved(self) -> float:
        return 1.0 - self.cascade.replicas / self.big.replicas


def _levels(bench: dict, model: str, escalation: float | None) -> list[Level]:
    levels = []
    for row in bench["runs"]:
        result = row[model]
        throughput = result["throughput"]
        if model == "gate" and escalation is not None:
            s_star = ideal_speedup(row["little"]["throughput"], row["big"]["throughput"], escalation)
            throughput = row["achieved_fraction"] * s_star * row["big"]["throughput"]
        levels.append(Level(int(row["concurrency"]), float(throughput), float(result["p99_ms"])))
    return levels


def _size(name: str, levels: list[Level], rate: float, utilisation: float, per_gpu: int, max_p99_ms: float | None) -> Sizing:
    allowed = [lv for lv in levels if max_p99_ms is None or lv.p99_ms <= max_p99_ms]
    if not allowed:
        best = min(lv.p99_ms for lv in levels)
        raise PlanError(f"{name}: no measured level has p99 <= {max_p99_ms} ms (the lowest is {best:.0f} ms)")
    level = max(allowed, key=lambda lv: lv.throughput)
    replicas = max(1, math.ceil(rate / (level.throughput * utilisation) - 1e-9))
    return Sizing(name, level.concurrency, level.throughput, level.p99_ms, replicas, math.ceil(replicas / per_gpu))


def load_bench(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"bench file {path} does not exist (write one with `littlebig bench --out DIR`)")
    try:
        bench = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlanError(f"{path} is not JSON: {err}") from None
    runs = bench.get("runs") if isinstance(bench, dict) else None
    if not runs:
        raise PlanError(f"{path} holds no measured runs: not a bench.json from `littlebig bench`")
    for row in runs:
        missing = [k for k in ("concurrency", "escalation", "achieved_fraction") if k not in row]
        missing += [f"{m}.{k}" for m in ("big", "little", "gate") for k in ("throughput", "p99_ms") if k not in row.get(m, {})]
        if missing:
            raise PlanError(f"{path}: a run lacks {', '.join(missing)}: not a bench.json from `littlebig bench`")
    return bench


def plan(
    bench: dict,
    rate: float,
    *,
    utilisation: float = 0.7,
    replicas_per_gpu: int = 1,
    escalation: float | None = None,
    max_p99_ms: float | None = None,
) -> CapacityPlan:
    if not (rate > 0 and math.isfinite(rate)):
        raise PlanError(f"rate must be a positive number of images per second, got {rate}")
    if not 0.0 < utilisation <= 1.0:
        raise PlanError(f"utilisation must be in (0, 1], got {utilisation}")
    if replicas_per_gpu < 1:
        raise PlanError(f"replicas per GPU must be >= 1, got {replicas_per_gpu}")
    if escalation is not None and not 0.0 <= escalation <= 1.0:
        raise PlanError(f"escalation share must be in [0, 1], got {escalation}")
    measured = escalation is None
    cascade = _size("cascade", _levels(bench, "gate", escalation), rate, utilisation, replicas_per_gpu, max_p99_ms)
    big = _size("big alone", _levels(bench, "big", None), rate, utilisation, replicas_per_gpu, max_p99_ms)
    if measured:
        escalation = next(float(r["escalation"]) for r in bench["runs"] if int(r["concurrency"]) == cascade.concurrency)
    return CapacityPlan(rate, utilisation, escalation, measured, cascade, big)


def format_plan(p: CapacityPlan) -> str:
    source = "measured in the bench" if p.measured_escalation else "re-estimated from little's and big's throughputs"
    lines = [
        f"rate {p.rate:g} img/s at {p.utilisation:.0%} utilisation; escalation share p = {p.escalation:.3f} ({source})",
        f"{'':<10} {'concurrency':>11} {'img/s/replica':>13} {'p99 ms':>7} {'replicas':>8} {'GPUs':>5}",
    ]
    for s in (p.cascade, p.big):
        lines.append(f"{s.name:<10} {s.concurrency:>11} {s.throughput:>13.1f} {s.p99_ms:>7.0f} {s.replicas:>8} {s.gpus:>5}")
    lines.append(f"the cascade needs {p.replicas_saved:.0%} fewer replicas than big alone")
    return "\n".join(lines)
