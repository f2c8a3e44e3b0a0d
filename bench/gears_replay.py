"""Replays the fixed gate's recorded answers through the gate's gear controller, offline.

`bench/overload.py --traces` records every answer of every run (send time, latency). A fixed-T run
shows the latencies a gate that never moves would see, so replaying it through the gate's own
``Gears`` class (imported from the gate package, as the tests do) tells whether and when the
controller would have left gear 0: on runs where the fixed T met the target that is a false alarm
(answers that need not have changed), on overloaded runs the sooner the better. Controller constants
can be overridden to compare variants on the same traces (`--set LATE_SHARE=0.1`); the live effect of a
variant still needs `bench/overload.py`.

The replay sees each answer's whole latency (send to answer), more than the gate sees, and takes
the oldest request still unanswered as the oldest escalation waiting for big. It is a first filter,
not a verdict: a variant that looked two decisions ahead on a growing backlog moved in none of the 11
replayed runs where the fixed T met the target, and live it moved in all five 1.0x rounds (that run's
record, rejected_lead_forecast.json, is in git history; docs/gears.md lists it under what did not work).

    .venv/bin/python bench/gears_replay.py runs/overload/traces.json runs/overload/overload.json --set LATE_SHARE=0.1
"""

from __future__ import annotations

import argparse
import heapq
import json
import types
from pathlib import Path

import numpy as np

from littlebig.gate.gears import Gears

def gears_class(overrides: dict[str, float]):
    """The gate's controller with some constants overridden."""
    return type("Replayed", (Gears,), dict(overrides))


class _Gauge:
    def set(self, value):
        pass


def replay(trace: dict, cls, ladder: list[tuple[float, float]], target_s: float, interval_s: float) -> list[float]:
    """Seconds in each gear over the run, had the controller been driving with these latencies."""
    metrics = types.SimpleNamespace(gear=_Gauge(), threshold=_Gauge(), seconds=list(range(len(ladder))), cost=-1)
    gears = cls(ladder, target_s, interval_s, metrics, lambda metric, amount: None, 0.0)
    sent = trace["send_s"]
    done = [s + ms / 1000.0 for s, ms in zip(sent, trace["latency_ms"])]
    events = sorted([(s, 0, i) for i, s in enumerate(sent)] + [(d, 1, i) for i, d in enumerate(done)])
    outstanding, answered = [], set()  # heap of (send time, index); answered ones are dropped lazily
    seconds, last, gear = [0.0] * len(ladder), 0.0, 0
    for t, kind, i in events:
        seconds[gear] += t - last
        last = t
        if kind == 1:
            answered.add(i)
            gears.answered(sent[i], 1, t)
            continue
        while outstanding and outstanding[0][1] in answered:
            heapq.heappop(outstanding)
        gears.seen.waiting = [outstanding[0][0]] if outstanding else []
        gears.start(t)
        gear = gears.gear
        heapq.heappush(outstanding, (sent[i], i))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", help="traces.json from bench/overload.py --traces")
    parser.add_argument("overload", help="overload.json of the same run (ladder and target)")
    parser.add_argument("--interval-ms", type=float, default=None, help="default: the run's gear_interval_ms (500)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a Gears constant")
    args = parser.parse_args()
    overrides = {name: float(value) for name, value in (s.split("=", 1) for s in args.set)}
    unknown = sorted(name for name in overrides if not name.isupper() or not hasattr(Gears, name))
    if unknown:  # a constant the controller no longer has would change nothing, silently
        parser.error(f"no Gears constant {', '.join(unknown)}")
    cls = gears_class(overrides)
    result = json.loads(Path(args.overload).read_text())
    ladder = [(g["threshold"], g["drop"]) for g in result["ladder"]["gears"]]
    target_ms = result["target_ms"]
    interval_ms = args.interval_ms or result.get("gear_interval_ms", 500.0)
    print(f"controller {cls.__mro__[1].__name__} with {overrides or 'the gate file constants'}, deciding every "
          f"{interval_ms:.0f} ms; target p99 <= {target_ms:.0f} ms")
    print(f"{'load':>5} {'round':>5} {'fixed p99':>9} {'met':>4}  would-be seconds per gear")
    met_target = {(r["round"], r["load"], r["variant"]): r["met_target"] for r in result["runs"]}
    alarms = met = 0
    for trace in json.loads(Path(args.traces).read_text()):
        if trace["variant"] != "fixed":
            continue
        p99 = float(np.percentile(trace["latency_ms"], 99))
        ok = met_target[(trace["round"], trace["load"], "fixed")]
        seconds = replay(trace, cls, ladder, target_ms / 1000.0, interval_ms / 1000.0)
        met += ok
        alarms += ok and sum(seconds[1:]) > 0
        print(f"{trace['load']:5.1f} {trace['round']:5d} {p99:7.0f} ms {'yes' if ok else 'no':>4}  "
              f"{' '.join(f'{s:5.1f}' for s in seconds)}")
    print(f"runs where the fixed T met the target: {met}; the controller would have left gear 0 in {alarms} of them")


if __name__ == "__main__":
    main()
