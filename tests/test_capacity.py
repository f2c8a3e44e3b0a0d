"""`littlebig plan`: replicas for a rate from a bench.json (no server needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from littlebig.cli import main
from littlebig.client.capacity import PlanError, load_bench, plan

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "throughput" / "bench_at_T.json"


def run(concurrency, big, little, gate, p99):
    return {
        "concurrency": concurrency,
        "escalation": 0.1,
        "achieved_fraction": 0.8,
        "big": {"throughput": big, "p99_ms": p99},
        "little": {"throughput": little, "p99_ms": p99},
        "gate": {"throughput": gate, "p99_ms": p99},
    }


BENCH = {"runs": [run(1, 50.0, 200.0, 120.0, 10.0), run(8, 100.0, 400.0, 250.0, 200.0)]}


def test_replicas_from_each_configurations_best_level():
    result = plan(BENCH, 1000, utilisation=1.0)
    assert (result.cascade.concurrency, result.cascade.replicas) == (8, 4)  # 1000 / 250
    assert (result.big.concurrency, result.big.replicas) == (8, 10)  # 1000 / 100
    assert result.escalation == 0.1 and result.measured_escalation
    assert result.replicas_saved == pytest.approx(0.6)


def test_utilisation_latency_budget_and_gpus():
    derated = plan(BENCH, 1000, utilisation=0.5)
    assert (derated.cascade.replicas, derated.big.replicas) == (8, 20)
    budget = plan(BENCH, 1000, utilisation=1.0, max_p99_ms=50)
    assert (budget.cascade.concurrency, budget.cascade.replicas, budget.big.replicas) == (1, 9, 20)
    shared = plan(BENCH, 1000, utilisation=1.0, replicas_per_gpu=4)
    assert (shared.cascade.gpus, shared.big.gpus) == (1, 3)


def test_another_escalation_share_is_re_estimated_from_the_models_throughputs():
    # S*(0.5) at concurrency 8 = (1/100) / (1/400 + 0.5/100) = 4/3; x big 100 x achieved 0.8 = 106.7 img/s
    result = plan(BENCH, 1000, utilisation=1.0, escalation=0.5)
    assert result.cascade.throughput == pytest.approx(0.8 * (4 / 3) * 100)
    assert result.cascade.replicas == 10 and not result.measured_escalation


def test_the_recorded_bench_run():
    bench = load_bench(RESULTS)
    result = plan(bench, 1000)
    gate_peak = max(r["gate"]["throughput"] for r in bench["runs"])
    big_peak = max(r["big"]["throughput"] for r in bench["runs"])
    assert result.cascade.replicas == math.ceil(1000 / (0.7 * gate_peak))
    assert result.big.replicas == math.ceil(1000 / (0.7 * big_peak))
    assert result.cascade.replicas < result.big.replicas


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": 0}, "rate must be a positive"),
        ({"rate": 10, "utilisation": 0}, r"utilisation must be in \(0, 1\]"),
        ({"rate": 10, "escalation": 1.5}, r"escalation share must be in \[0, 1\]"),
        ({"rate": 10, "max_p99_ms": 5}, "no measured level has p99 <= 5"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(PlanError, match=message):
        plan(BENCH, **kwargs)


def test_a_file_that_is_not_a_bench_json_is_named(tmp_path):
    broken = tmp_path / "bench.json"
    broken.write_text(json.dumps({"runs": [{"concurrency": 1, "big": {}}]}))
    with pytest.raises(PlanError, match="lacks escalation, achieved_fraction, big.throughput"):
        load_bench(broken)


def test_cli_prints_the_plan(capsys):
    main(["plan", "--bench", str(RESULTS.parent / "bench_at_T.json"), "--rate", "500"])
    out = capsys.readouterr().out
    assert "cascade" in out and "big alone" in out and "fewer replicas than big alone" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--bench", str(RESULTS.parent / "missing.json"), "--rate", "500"])
    assert exit_info.value.code == 2
